"""`python -m comfyui_lora_trainer.bench.full_size --quick`: ComfyUI's own models, at toy widths, built
under FakeTensorMode and counted by the training step's memory estimate (bench/full_size.py).

The command runs in ComfyUI's Python (COMFYUI_DIR; COMFYUI_PYTHON or its venv, as the server tests
find them), the pack on PYTHONPATH as `comfyui_lora_trainer` whatever the clone's folder is called,
ComfyUI's folder the working directory. Its JSON must hold every row of the quick grid (a toy Flux
and a toy Wan 2.1: bf16 with checkpointing on and off, fp8 with checkpointing, resident and offloaded,
and both memory levers on the Flux toy) with the levers and switches doing what they are for.
Skips unless COMFYUI_DIR is set (conftest.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[2]
MODELS = ("flux-tiny", "wan-tiny")
# (model, base, checkpointing, offload, lever): the quick grid
SWITCHES = (("bf16", True, False), ("bf16", False, False), ("fp8", True, False), ("fp8", True, True))
ROWS = {(m, base, ckpt, off, "") for m in MODELS for base, ckpt, off in SWITCHES}
ROWS.add(("flux-tiny", "fp8", True, False, "both"))


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    server = sys.modules["lora_trainer_it_server"]  # conftest.py loads server.py under this name
    comfy_dir, python = server.comfyui_or_skip()
    root = tmp_path_factory.mktemp("full_size")
    packages = root / "packages"
    packages.mkdir()
    server._link(PACK_ROOT, packages / "comfyui_lora_trainer")
    out = root / "quick.json"
    pythonpath = os.pathsep.join(filter(None, [str(packages), str(comfy_dir), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath, COMFYUI_DIR=str(comfy_dir), PYTHONUNBUFFERED="1")
    done = subprocess.run([python, "-m", "comfyui_lora_trainer.bench.full_size", "--quick", "--json", str(out)],
                          cwd=comfy_dir, env=env, capture_output=True, text=True, timeout=600)
    print(done.stdout[-4000:])
    assert done.returncode == 0 and out.exists(), \
        f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(out.read_text("utf-8"))


def rows(result: dict) -> dict[tuple, dict]:
    return {(r["model"], r["base"], r["checkpointing"], r["offload"], r["lever"]): r for r in result["rows"]}


def test_every_row_of_the_quick_grid_is_there_with_a_positive_total(quick):
    assert quick["quick"] and quick["complete"]
    assert set(rows(quick)) == ROWS and len(quick["rows"]) == len(ROWS)
    for key, r in rows(quick).items():
        assert r["total_mib"] > 0 and r["step_mib"] > 0, key
        parts = ("weights", "adapters", "gradients", "optimizer", "activations", "transient", "latents and captions")
        assert abs(sum(r[f"{p}_mib"] for p in parts) - r["total_mib"]) < 1e-6 * r["total_mib"] + 1e-9, key
        assert r["adapters_mib"] > 0 and r["optimizer_mib"] > 0, key  # rank-16 adapters, AdamW state
        assert r["sdpa_calls"] > 0, key  # attention through scaled_dot_product_attention
        assert r["rank"] == 16 and r["batch_size"] == 1


def test_checkpointing_lowers_the_saved_activations(quick):
    by = rows(quick)
    for m in MODELS:
        on, off = by[(m, "bf16", True, False, "")], by[(m, "bf16", False, False, "")]
        assert on["activations_mib"] < off["activations_mib"] / 2, (m, on, off)
        assert on["step_mib"] < off["step_mib"], m


def test_offloading_leaves_about_no_weights_resident(quick):
    by = rows(quick)
    for m in MODELS:
        resident, offloaded = by[(m, "fp8", True, False, "")], by[(m, "fp8", True, True, "")]
        assert resident["weights_mib"] > 0
        assert offloaded["weights_mib"] <= 0.05 * resident["weights_mib"], (m, offloaded["weights_mib"])
        assert offloaded["total_mib"] < resident["total_mib"], m


def test_fp8_weights_are_about_half_the_bf16_ones(quick):
    by = rows(quick)
    for m in MODELS:
        bf16, fp8 = by[(m, "bf16", True, False, "")], by[(m, "fp8", True, False, "")]
        assert 0.45 <= fp8["weights_mib"] / bf16["weights_mib"] <= 0.6, (m, fp8["weights_mib"], bf16["weights_mib"])
    checks = {(c["model"], c["base"]): c for c in quick["weights_check"]}
    for m in MODELS:
        assert 1.95 <= checks[(m, "bf16")]["bytes_per_param"] <= 2.1
        assert 0.95 <= checks[(m, "fp8")]["bytes_per_param"] <= 1.1


def test_the_levers_lower_gradients_and_optimizer_state(quick):
    by = rows(quick)
    plain, both = by[("flux-tiny", "fp8", True, False, "")], by[("flux-tiny", "fp8", True, False, "both")]
    assert both["optimizer"] == "AdamW8bit" and both["step_in_backward"]
    assert both["optimizer_mib"] < plain["optimizer_mib"] / 2  # two 8-bit moments against two fp32 ones
    assert both["gradients_mib"] < plain["gradients_mib"]  # each gradient freed as its step runs
    assert both["adapters_mib"] == plain["adapters_mib"]
