"""bench/gpu_check.py's toy run on the CPU (`--toy --device cpu`): ComfyUI in the bench's process, SDXL and
Flux at toy width, our Train LoRA and core's TrainLoraNode on the same cases; then the JSON it writes.

Run once per module with ComfyUI's Python (the package on PYTHONPATH under its import name, from this
checkout), one torch thread. Each case is checked on its own: both trainers' peaks and seconds per step,
and our memory estimate within 10 % of our measured live-bytes peak (the failure message gives every
number). Core's TrainLoraNode may fail a case (its Flux blocks' in-place adds without checkpointing); the
error must then be recorded, and core must train at least one case of each family. Skips unless
COMFYUI_DIR is set. About two minutes on two shared cores, most of it our estimate's fake-tensor steps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

FAMILIES = {"sdxl": "SDXL", "flux": "Flux"}  # family → the config class ComfyUI detects for the full config
TOLERANCE = 0.10


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    server = sys.modules["lora_trainer_it_server"]
    comfy_dir, python = server.comfyui_or_skip()
    root = tmp_path_factory.mktemp("gpu_check")
    importable = server.importable_pack(root)
    out = root / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(importable), "COMFYUI_DIR": str(comfy_dir), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    done = subprocess.run([python, "-m", "comfyui_lora_trainer.bench.gpu_check", "--toy", "--device", "cpu",
                           "--threads", "1", "--json", str(out)], env=env, cwd=root, capture_output=True, text=True,
                          timeout=900)
    took = time.monotonic() - started
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    data = json.loads(out.read_text())
    print(f"\ngpu_check --toy --device cpu: {took:.0f} s\n" + done.stdout[done.stdout.find("| case"):])
    return data


def _case(report: dict, name: str) -> dict:
    return next(c for c in report["cases"] if c["name"] == name)


def _names() -> list[str]:
    from comfyui_lora_trainer.bench.gpu_check import CASES

    return [c.name(toy=True) for c in CASES]


def test_the_report_says_what_it_measured(report):
    assert report["toy"] is True and report["memory"] == "live bytes (cpu)" and report["dtype"] == "fp32"
    assert report["device"].startswith("cpu") and report["torch"]
    assert report["complete"] and report["skipped"] == [] and report["elapsed_s"] < report["budget_s"]
    assert [c["name"] for c in report["cases"]] == _names()
    for family, detected in FAMILIES.items():
        info = report["families"][family]
        assert info["params"] > 0 and info["weights_mib"] > 0, info
        # the full-size config (the GPU run's) is the one ComfyUI detects for real files of the family
        assert info["full_config_detected_as"] == detected, info


@pytest.mark.parametrize("name", _names())
def test_ours_trains_every_case_with_a_peak_a_speed_and_an_estimate(report, name):
    ours = _case(report, name)["ours"]
    assert "error" not in ours, ours.get("traceback", ours)
    assert ours["peak_mib"] > 0 and ours["s_per_step"] > 0 and ours["steps_seen"] == report["steps"], ours
    assert ours["estimate_source"] == "sampler", ours  # our sampler computes it before training
    assert ours["estimate"]["batch"][0] == 1 and ours["estimate_mib"] == pytest.approx(
        ours["estimate"]["total_mib"] - ours["estimate"]["weights_mib"])  # on the CPU: all above the weights


def test_core_trains_each_family_and_records_what_it_cannot(report):
    for family in FAMILIES:
        cases = [c for c in report["cases"] if c["family"] == family]
        trained = [c["core"] for c in cases if "error" not in c["core"]]
        assert trained, [c["core"].get("error") for c in cases]
        for core in trained:
            assert core["peak_mib"] > 0 and core["s_per_step"] > 0 and core["steps_seen"] == report["steps"], core
        for case in cases:
            if "error" in case["core"]:
                assert case["core"]["error"] and case["core"]["traceback"], case["core"]


@pytest.mark.parametrize("name", _names())
def test_our_estimate_is_within_10_percent_of_our_live_bytes_peak(report, name):
    ours = _case(report, name)["ours"]
    if "error" in ours:
        pytest.fail(f"ours failed: {ours['error']}")
    numbers = (f"{name}: estimate (step, above the weights) {ours['estimate_mib']:.2f} MiB, measured live-bytes peak "
               f"{ours['peak_mib']:.2f} MiB (ratio {ours['estimate_over_peak']:.3f}); held when train() began "
               f"{ours.get('held_at_train_mib', float('nan')):.2f} MiB, the step alone "
               f"{ours.get('measured_step_mib', float('nan')):.2f} MiB (estimate/step "
               f"{ours.get('estimate_step_over_measured_step', float('nan')):.3f}); parts {ours['estimate']}")
    assert abs(ours["estimate_over_peak"] - 1) <= TOLERANCE, numbers
