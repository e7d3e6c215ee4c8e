"""bench/gpu_check.py without ComfyUI (CI has none): it imports, parses its arguments, stops with a message
naming COMFYUI_DIR, and its pure parts (cases, settings, core's inputs, time guard, table) hold together.
The run itself is tests/integration/test_gpu_check.py's (COMFYUI_DIR)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from comfyui_lora_trainer.bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_imports_without_comfyui_or_torch_at_module_level():
    # the module's own imports are the standard library's: ComfyUI and torch come in when it runs
    code = ("import sys, importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('gpu_check', {str(ROOT / 'bench' / 'gpu_check.py')!r})\n"
            "m = sys.modules['gpu_check'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "assert 'torch' not in sys.modules and 'comfy' not in sys.modules, sorted(sys.modules)\n"
            "print(len(m.CASES))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len(gpu_check.CASES)


def test_arguments_and_their_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFYUI_DIR", str(tmp_path))
    args = gpu_check.parse_args([])
    assert (args.toy, args.device, args.dtype, args.steps, args.budget) == (False, None, None, 6, 420.0)
    assert Path(args.comfyui) == tmp_path
    assert args.json == gpu_check.HERE / "results" / "gpu_check.json"
    assert gpu_check.parse_args(["--toy"]).json.name == "gpu_check_toy.json"
    args = gpu_check.parse_args(["--toy", "--device", "cpu", "--json", str(tmp_path / "r.json"), "--steps", "3",
                                 "--budget", "30", "--dtype", "bf16", "--only", "flux", "--threads", "1"])
    assert (args.toy, args.device, args.json, args.steps, args.budget, args.dtype, args.only, args.threads) == \
        (True, "cpu", tmp_path / "r.json", 3, 30.0, "bf16", "flux", 1)
    for bad in (["--device", "tpu"], ["--steps", "1"], ["--dtype", "fp16"]):
        with pytest.raises(SystemExit) as stop:
            gpu_check.parse_args(bad)
        assert stop.value.code == 2


@pytest.mark.parametrize("where", ["unset", "not a checkout"])
def test_without_comfyui_it_exits_naming_comfyui_dir(where, tmp_path, monkeypatch, capsys):
    if where == "unset":
        monkeypatch.delenv("COMFYUI_DIR", raising=False)
    else:
        monkeypatch.setenv("COMFYUI_DIR", str(tmp_path))  # no main.py there
    assert gpu_check.main(["--toy", "--device", "cpu", "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "COMFYUI_DIR" in err and err.startswith("error: ")
    assert not (tmp_path / "r.json").exists()


def test_run_as_a_module_without_comfyui_exits_2_with_the_message(tmp_path):
    importable = tmp_path / "path"
    importable.mkdir()
    (importable / "comfyui_lora_trainer").symlink_to(ROOT)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(importable)}
    done = subprocess.run([sys.executable, "-m", "comfyui_lora_trainer.bench.gpu_check", "--toy", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "COMFYUI_DIR" in done.stderr


def test_cases_cover_both_families_with_and_without_checkpointing():
    assert {c.family for c in gpu_check.CASES} == {"sdxl", "flux"}
    for family in ("sdxl", "flux"):
        assert {c.checkpointing for c in gpu_check.CASES if c.family == family} == {True, False}
    families = [c.family for c in gpu_check.CASES]
    assert families == sorted(families, key=families.index)  # grouped: one model per family
    case = gpu_check.Case("sdxl", 1024, True)
    assert case.pixels(False) == 1024 and case.pixels(True) == 1024 // gpu_check.TOY_SCALE
    assert case.name() == "sdxl 1024px b1 r16 ckpt" and case.name(True) == "sdxl 256px b1 r16 ckpt"


def test_toy_configs_keep_the_real_layout_and_text_widths():
    for family in ("sdxl", "flux"):
        full, toy = gpu_check.FULL_CONFIGS[family], gpu_check.TOY_CONFIGS[family]
        assert set(toy) == set(full)
    sdxl = gpu_check.TOY_CONFIGS["sdxl"]
    assert (sdxl["context_dim"], sdxl["adm_in_channels"]) == (2048, 2816)  # CLIP-L+G context, pooled + sizes
    assert len(sdxl["transformer_depth"]) == sum(sdxl["num_res_blocks"]) == len(sdxl["channel_mult"])
    assert len(sdxl["transformer_depth_output"]) == sum(n + 1 for n in sdxl["num_res_blocks"])
    flux = gpu_check.TOY_CONFIGS["flux"]
    assert (flux["context_in_dim"], flux["vec_in_dim"], flux["guidance_embed"]) == (4096, 768, True)
    assert flux["hidden_size"] == flux["num_heads"] * sum(flux["axes_dim"])
    full = gpu_check.FULL_CONFIGS["flux"]
    assert full["hidden_size"] == full["num_heads"] * sum(full["axes_dim"])


def test_settings_are_train_loras_fields_and_core_gets_the_same_values_as_lists():
    from comfyui_lora_trainer.training.config import TrainConfig

    case = gpu_check.Case("flux", 512, False)
    values = gpu_check.settings(case, 6, "bf16")
    config = TrainConfig(**values)  # every name is a TrainConfig field, every value in range
    assert (config.steps, config.rank, config.gradient_checkpointing, config.training_dtype) == (6, 16, False, "bf16")
    core = gpu_check.core_inputs(values)
    assert all(isinstance(v, list) and len(v) == 1 for v in core.values())
    assert {k: v[0] for k, v in core.items() if k in values} == values
    assert core["grad_accumulation_steps"] == [1] and core["bypass_mode"] == [False]
    assert core["existing_lora"] == ["[None]"] and core["algorithm"] == ["LoRA"]


def test_the_time_guard_stops_new_cases_after_the_budget():
    now = [100.0]
    clock = gpu_check.Clock(420.0, now=lambda: now[0])
    assert clock.may_start()
    now[0] = 519.0
    assert clock.may_start() and clock.elapsed() == pytest.approx(419.0)
    now[0] = 520.0
    assert not clock.may_start()
    skipped: list[str] = []
    entry = gpu_check.guarded(clock, lambda: pytest.fail("no new case after the budget"), skipped, "late ours")
    assert "time budget" in entry["skipped"] and skipped == ["late ours"]


def test_a_run_likely_to_end_past_the_limit_does_not_start():
    now = [0.0]
    clock = gpu_check.Clock(420.0, limit=450.0, now=lambda: now[0])
    entry = gpu_check.guarded(clock, lambda: now.__setitem__(0, now[0] + 90.0) or {"ok": 1}, [], "a", "flux ours")
    assert entry == {"ok": 1} and clock.took["flux ours"] == 90.0
    now[0] = 350.0
    assert clock.may_start("flux ours") and clock.may_start("flux core")  # 350 + 90 ≤ 450
    now[0] = 370.0
    why = clock.refusal("flux ours")
    assert why is not None and "would end past 450 s" in why
    assert clock.may_start("flux core") and clock.may_start()  # no earlier run of that kind: only the budget


def test_a_failing_run_is_recorded_not_raised():
    clock = gpu_check.Clock(420.0)

    def boom():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    entry = gpu_check.guarded(clock, boom, [], "oom case")
    assert entry["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "boom" in entry["traceback"]


def test_seconds_per_step_leave_the_first_step_out():
    times = iter([5.0, 6.0, 7.0, 8.0])
    probe = gpu_check.Probe(cuda=False, now=lambda: next(times))
    for value in (0, 1, 2, 2, 3, 4):  # 0: ours before its first step; a repeated value is no new step
        probe.progress(value, 4, None, node_id=None)
    assert probe.step_times == [5.0, 6.0, 7.0, 8.0]
    assert probe.seconds_per_step() == pytest.approx(1.0)  # (8 − 5) / 3: from the end of the first step
    assert gpu_check.Probe(cuda=False).seconds_per_step() is None


def test_markdown_table_shows_numbers_errors_and_skips():
    report = {"device": "NVIDIA H100", "torch": "2.x", "dtype": "bf16", "memory": "cuda max_memory_allocated",
              "steps": 6, "cases": [
                  {"name": "sdxl 1024px b1 r16 ckpt",
                   "ours": {"peak_mib": 9000.0, "s_per_step": 0.5, "estimate_mib": 8800.0, "estimate_over_peak": 0.978},
                   "core": {"peak_mib": 12000.0, "s_per_step": 0.7}},
                  {"name": "flux 512px b1 r16 no-ckpt", "ours": {"error": "OutOfMemoryError: ..."},
                   "core": {"skipped": "time budget: 421 s had passed"}}]}
    table = gpu_check.markdown(report)
    assert "| sdxl 1024px b1 r16 ckpt | 9000.0 | 0.500 | 8800.0 | 0.978 | 12000.0 | 0.700 |" in table
    assert "| flux 512px b1 r16 no-ckpt | error | error | error | error | skipped | skipped |" in table
    assert table.splitlines()[0].startswith("NVIDIA H100 · torch 2.x · bf16")
