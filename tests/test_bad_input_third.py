"""Bad input, third round: what checkpoints, resume, continued files, layer selection, temp files and the
headless commands let through before, on the tiny model and offline. The cases that need a ComfyUI
server (the preview VAEs, ResolutionBucket's captions, core's own LoRA files, torchrun without a GPU)
are in tests/integration/test_bad_input_third.py.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from comfyui_lora_trainer.lora import LoraConfig, inject, resolve_state_dict
from comfyui_lora_trainer.lora import files as lora_files
from comfyui_lora_trainer.lora.files import write_atomically
from comfyui_lora_trainer.nodes.checkpoints import STATES_FOLDER, CheckpointWriter
from comfyui_lora_trainer.nodes.validation import ValidationSet
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import Hooks, train
from comfyui_lora_trainer.training.resume import JSON, TENSORS

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)
CONFIG = TrainConfig(steps=4, batch_size=2, learning_rate=2e-3, save_every=2, **FAST)


def _train(output: Path, config: TrainConfig):
    """train() on the tiny model with a CheckpointWriter on `output`; (result, writer)."""
    model = build_tiny("eps")
    fns = tiny_fns(model, encode_captions(["a ramp"], model.net.config.context_dim))
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    writer = CheckpointWriter(output, config, list(latents.unbind(0)), 1)
    resume = writer.resume()
    return train(model.net, fns, latents, config, hooks=Hooks(save=writer.save), resume=resume), writer


def _state_json(output: Path, relative: str) -> Path:
    return output / STATES_FOLDER / (relative[: -len(".safetensors")] + JSON)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- training states ------------------------------------------------------------------------
@pytest.mark.parametrize("edit, words", [
    (lambda r: r.update(step=10 ** 15), "its step 1000000000000000 disagrees with its 4 losses"),
    (lambda r: r.update(step="4"), "its 'step' entry is \"4\""),
    (lambda r: r.update(config=[]), "its 'config' entry is \\[\\]"),
    (lambda r: r.pop("fingerprint"), "it has no 'fingerprint' entry"),
    (lambda r: r.update(total_steps=1), "its total_steps 1 is fewer than its step 4"),
    (lambda r: r.update(losses=["a"] * 4), "its 'losses' entry"),
])
def test_a_damaged_or_inconsistent_state_is_refused_naming_the_file(tmp_path, edit, words):
    _, writer = _train(tmp_path, CONFIG)
    path = _state_json(tmp_path, writer.written[-1])
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=rf"^resume: {path}.* is damaged \({words}.*pick another training state"):
        _train(tmp_path, replace(CONFIG, steps=6, resume="latest"))
    assert _files(tmp_path) == before  # nothing written, nothing deleted


def test_a_state_past_the_runs_steps_is_refused(tmp_path):
    _, writer = _train(tmp_path, CONFIG)
    with pytest.raises(ValueError, match=r"^resume: the training state .* is at step 4, past this run's steps 3; "
                                         r"set steps to 4 or more"):
        _train(tmp_path, replace(CONFIG, steps=3, resume="latest"))


def test_a_fresh_run_takes_the_next_counter_beside_an_old_runs_state(tmp_path):
    config = replace(CONFIG, checkpoint_prefix="loras/ck")
    _, old = _train(tmp_path, config)
    for relative in old.written:
        (tmp_path / relative).unlink()  # the user deleted the old checkpoint LoRAs, not their states
    states_before = _files(tmp_path / STATES_FOLDER)
    result, new = _train(tmp_path, config)  # resume empty: a fresh run under the same prefix
    assert result.total_steps == 4
    assert new.written == ["loras/ck_2_steps_00002_.safetensors", "loras/ck_4_steps_00002_.safetensors"]
    after = _files(tmp_path / STATES_FOLDER)
    assert {k: v for k, v in after.items() if k in states_before} == states_before  # the old states untouched


def test_keep_last_never_deletes_the_state_resume_named_in_another_prefix(tmp_path):
    _train(tmp_path, replace(CONFIG, checkpoint_prefix="loras/src/ck", steps=2))
    source = _files(tmp_path)
    assert "loras/src/ck_2_steps_00001_.safetensors" in source
    config = replace(CONFIG, steps=8, keep_last=1, checkpoint_prefix="loras/new/ck",
                     resume="loras/src/ck_2_steps_00001_.safetensors")
    _, writer = _train(tmp_path, config)
    after = _files(tmp_path)
    assert {k: after.get(k) for k in source} == source  # every file of the source run is still there, unchanged
    assert writer.written == ["loras/new/ck_8_steps_00001_.safetensors"]
    assert sorted(p.name for p in (tmp_path / "loras/new").iterdir()) == ["ck_8_steps_00001_.safetensors"]


def test_keep_last_keeps_the_checkpoint_resume_named_by_path_in_this_prefix(tmp_path):
    _train(tmp_path, replace(CONFIG, steps=2))
    named = "loras/checkpoints/lora_2_steps_00001_.safetensors"
    _train(tmp_path, replace(CONFIG, steps=8, keep_last=1, resume=named))
    left = sorted(p.name for p in (tmp_path / "loras/checkpoints").iterdir())
    assert left == ["lora_2_steps_00001_.safetensors", "lora_8_steps_00001_.safetensors"]


# ---- continued files --------------------------------------------------------------------------
class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.norm = nn.GroupNorm(2, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.conv(x)).mean((2, 3)))


def test_conv_downs_flattened_to_2d_as_core_saves_them_load_as_the_4d_form():
    torch.manual_seed(0)
    model, x = Convs(), torch.randn(2, 4, 8, 8)
    down, up = torch.randn(3, 4, 3, 3), torch.randn(6, 3, 1, 1)
    four_d = {"lora_unet_conv.lora_down.weight": down, "lora_unet_conv.lora_up.weight": up}
    flat = {"lora_unet_conv.lora_down.weight": down.flatten(1), "lora_unet_conv.lora_up.weight": up.flatten(1)}
    outputs = []
    for sd in (four_d, flat):
        weights = resolve_state_dict(sd, model, label="existing_lora 'core.safetensors'")
        with inject(model, LoraConfig(rank=3, train_norms=False, train_biases=False), weights=weights) as net:
            outputs.append(model(x))
            assert torch.equal(net.weights()["conv"].down, down)
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], model(x))
    with pytest.raises(ValueError, match=r"'lora_unet_conv.lora_down.weight' does not fit layer 'conv'"):
        resolve_state_dict({**flat, "lora_unet_conv.lora_down.weight": torch.zeros(3, 35)}, model)


def test_a_continued_files_differences_are_trained_on_with_train_norms_off(caplog):
    torch.manual_seed(0)
    model = Convs()
    sd = {"lora_unet_conv.lora_down.weight": torch.randn(3, 4, 3, 3), "lora_unet_conv.lora_up.weight": torch.randn(6, 3, 1, 1),
          "lora_unet_conv.diff_b": torch.randn(6), "lora_unet_norm.diff": torch.randn(6),
          "lora_unet_norm.diff_b": torch.randn(6)}
    weights = resolve_state_dict(sd, model)
    config = LoraConfig(rank=3, train_norms=False, train_biases=False, include="conv|norm")
    with caplog.at_level(logging.INFO), inject(model, config, weights=weights) as net:
        exported = net.weights()
        assert any(p.requires_grad and p.shape == (6,) for p in net.parameters())
    assert torch.equal(exported["conv"].diff_b, sd["lora_unet_conv.diff_b"])
    assert torch.equal(exported["norm"].diff, sd["lora_unet_norm.diff"])
    assert torch.equal(exported["norm"].diff_b, sd["lora_unet_norm.diff_b"])
    assert "out" not in exported  # a layer the file does not hold follows train_biases off
    assert "holds 3 weight/bias differences (diff/diff_b); they are trained on with it" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING), inject(model, replace(config, include="conv"), weights=weights) as net:
        assert "norm" not in net.weights()
    assert "1 layers that target / include_layers / exclude_layers leave out (first: norm)" in caplog.text


@pytest.mark.parametrize("selection, named", [
    (dict(include_layers="no_such_layer"), "include_layers 'no_such_layer'"),
    (dict(exclude_layers=".*"), "exclude_layers '.\\*'"),
    (dict(target="attention", include_layers="conv1"), "target 'attention', include_layers 'conv1'"),
])
def test_a_selection_of_no_layer_names_the_inputs(selection, named):
    model = build_tiny("eps")
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    fns = tiny_fns(model, encode_captions(["a ramp"], model.net.config.context_dim))
    with pytest.raises(ValueError, match=rf"^include_layers / exclude_layers / target: (target .all., )?{named} select no layer"):
        train(model.net, fns, torch.randn(2, 4, 16, 16), replace(CONFIG, save_every=0, **selection))
    assert all(torch.equal(v, model.net.state_dict()[k]) for k, v in before.items())


# ---- temp files of a killed write ---------------------------------------------------------------
def test_a_save_removes_only_our_stale_temps_older_than_the_process(tmp_path):
    stale = tmp_path / ".ck_4_steps_00001_.safetensors.0a1b2c3d.tmp"
    fresh = tmp_path / ".lora_2_steps_00001_.safetensors.deadbeef.tmp"  # another process writing right now
    others = [tmp_path / ".x.safetensors.nothex!!.tmp", tmp_path / "notes.tmp", tmp_path / "old.safetensors"]
    for path in (stale, fresh, *others):
        path.write_bytes(b"partial")
    long_ago = lora_files.PROCESS_STARTED - 3600
    for path in (stale, *others):
        os.utime(path, (long_ago, long_ago))
    write_atomically(tmp_path / "new.png", lambda tmp: Path(tmp).write_bytes(b"png"))
    assert not stale.exists() and fresh.exists() and all(p.exists() for p in others)
    assert (tmp_path / "new.png").read_bytes() == b"png"


def test_the_process_start_is_before_this_test():
    assert lora_files.PROCESS_STARTED <= time.time()


# ---- an empty validation set -----------------------------------------------------------------
def test_an_empty_validation_set_names_the_validation_node():
    with pytest.raises(ValueError, match=r"^latents: LoRA Validation Set got no images \(a LATENT of batch 0\)"):
        ValidationSet().execute([{"samples": torch.zeros(0, 4, 8, 8)}], [["c"]], [5], [3])


# ---- the headless commands on a Python without torch or ComfyUI ------------------------------------
def _cli(tmp_path: Path, args: list[str], block_torch: bool) -> subprocess.CompletedProcess:
    """`python -m comfyui_lora_trainer ARGS` in a fresh interpreter (the package loaded by path, as
    tests/conftest.py does); with `block_torch`, `import torch` fails as on a Python without it."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        if {block_torch!r}:
            sys.modules["torch"] = None  # import torch -> ModuleNotFoundError, as without torch
        spec = importlib.util.spec_from_file_location("comfyui_lora_trainer", {str(ROOT / '__init__.py')!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        module = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_lora_trainer"] = module
        spec.loader.exec_module(module)
        from comfyui_lora_trainer.__main__ import main
        sys.exit(main({args!r}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=env)


WORKFLOW = {"1": {"class_type": "LoRATrainer_TrainLoRA", "inputs": {"steps": 10}}}


def test_run_dry_run_needs_no_torch(tmp_path):
    (tmp_path / "wf.json").write_text(json.dumps(WORKFLOW))
    done = _cli(tmp_path, ["run", "wf.json", "--dry-run", "--set", "1.steps=20"], block_torch=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["1"]["1"]["inputs"]["steps"] == 20 and done.stderr == ""


def test_train_and_demo_without_torch_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "wf.json").write_text(json.dumps(WORKFLOW))
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "execution.py").write_text("")
    for args in (["train", "wf.json", "--comfyui", str(comfy)], ["demo", "--steps", "2"]):
        done = _cli(tmp_path, args, block_torch=True)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("error: ") and "torch" in done.stderr


def test_train_without_comfyuis_requirements_or_a_gpu(tmp_path):
    """A checkout whose modules need a package this Python lacks: one line, exit 2. No GPU and no
    `-- --cpu`: ComfyUI gets --cpu (the fake cli_args prints what it was given)."""
    (tmp_path / "wf.json").write_text(json.dumps(WORKFLOW))
    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy").mkdir(parents=True)
    (comfy / "execution.py").write_text("")
    (comfy / "comfy" / "__init__.py").write_text("")
    (comfy / "comfy" / "options.py").write_text("def enable_args_parsing():\n    pass\n")
    (comfy / "comfy" / "cli_args.py").write_text(
        "import sys\nprint('argv:', sys.argv[1:])\nargs = type('A', (), {'cpu': '--cpu' in sys.argv})()\n")
    (comfy / "folder_paths.py").write_text("import a_requirement_not_installed\n")
    done = _cli(tmp_path, ["train", "wf.json", "--comfyui", str(comfy)], block_torch=False)
    assert done.returncode == 2, done.stderr
    assert "note: no GPU found, so ComfyUI runs on the CPU" in done.stderr and "argv: ['--cpu']" in done.stdout
    error = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert error == [f"error: ComfyUI cannot start in this Python: no module named 'a_requirement_not_installed'; "
                     f"run `train` with ComfyUI's Python, or install its requirements (pip install -r {comfy}/"
                     "requirements.txt)"]
    assert "Traceback" not in done.stderr


def test_an_invalid_workflow_json_says_how_to_export_one(tmp_path):
    (tmp_path / "wf.json").write_text("{not json")
    done = _cli(tmp_path, ["run", "wf.json", "--dry-run"], block_torch=True)
    assert done.returncode == 2 and "Workflow > Export (API)" in done.stderr and done.stderr.count("\n") == 1


# ---- ComfyUI core's ResolutionBucket: one list of per-image entries per bucket ---------------------
def _entry(i: int) -> list:
    """One conditioning entry [tensor, options], as a text encode makes it (a CONDITIONING holds a list of them)."""
    return [torch.full((1, 2, 4), float(i)), {"pooled_output": torch.full((1, 4), float(i))}]


def _workflow(source: str) -> dict:
    """An API-format workflow where `source` feeds Train LoRA's positive (node 9)."""
    return {"3": {"class_type": source, "inputs": {}},
            "9": {"class_type": "LoRATrainer_TrainLoRA", "inputs": {"positive": ["3", 1], "latents": ["3", 0]}}}


def test_resolution_buckets_pair_every_image_with_its_own_caption():
    from comfyui_lora_trainer.nodes.conditioning import captions_of, flat_conditioning, source_class
    from comfyui_lora_trainer.training.data import caption_entries

    assert source_class(_workflow("ResolutionBucket"), "9", "positive") == "ResolutionBucket"
    assert source_class(None, None, "positive") is None and source_class(_workflow("X"), "9", "model") is None
    # ResolutionBucket's output: bucket 0 holds images 0, 2, 3 (one size), bucket 1 images 1, 4 (another)
    positive = [[_entry(i) for i in (0, 2, 3)], [_entry(i) for i in (1, 4)]]
    entries, counts = flat_conditioning(captions_of(positive, [3, 2], "ResolutionBucket"))
    per_image = caption_entries(counts, 5)
    assert [float(entries[c[0]][0][0, 0, 0]) for c in per_image] == [0, 2, 3, 1, 4]  # each flat latent: its own
    # one bucket of four: four captions (read as a ConditioningCombine, one combined caption, before)
    entries, counts = flat_conditioning(captions_of([[_entry(i) for i in range(4)]], [4], "ResolutionBucket"))
    assert counts == [1, 1, 1, 1] and [float(e[0][0, 0, 0]) for e in entries] == [0, 1, 2, 3]
    # from any other node the same list is one CONDITIONING of 4 entries: a combined caption, as before
    assert flat_conditioning(captions_of([[_entry(i) for i in range(4)]], [4], "ConditioningCombine"))[1] == [4]


def test_resolution_buckets_that_do_not_match_their_latents_are_refused():
    from comfyui_lora_trainer.nodes.conditioning import captions_of

    with pytest.raises(ValueError, match=r"^positive: ResolutionBucket's bucket 1 has 1 captions for the 2 images"):
        captions_of([[_entry(0)], [_entry(1)]], [1, 2], "ResolutionBucket")
    with pytest.raises(ValueError, match=r"^validation positive: got 1 caption lists from LoadTrainingDataset for 2 "
                                         r"LATENTs"):
        captions_of([[_entry(0), _entry(1)]], [1, 1], "LoadTrainingDataset", "validation positive")


def test_the_validation_set_takes_resolution_buckets():
    latents = [{"samples": torch.zeros(2, 4, 8, 8)}, {"samples": torch.zeros(1, 4, 8, 16)}]
    positive = [[_entry(0), _entry(1)], [_entry(2)]]
    (settings,) = ValidationSet().execute(latents, positive, [5], [3], [_workflow("ResolutionBucket")], ["9"])
    assert settings.source == "ResolutionBucket" and settings.positive == positive
    with pytest.raises(ValueError, match=r"positive: got 2 captions for 3 images"):  # two combined captions
        ValidationSet().execute(latents, positive, [5], [3])
