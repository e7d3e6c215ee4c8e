"""The bases users have, in a real ComfyUI: its own fp8 and quantized op classes (in-process, CPU).

Skips unless COMFYUI_DIR is set (conftest.py). quantized_check.py runs in ComfyUI's Python and
trains our adapters on `comfy.ops.mixed_precision_ops` Linear layers whose weight is a
QuantizedTensor (float8_e4m3fn and int8_tensorwise, both run on the CPU) and on `comfy.ops.manual_cast`
layers stored in fp8 (e4m3fn, e5m2; Conv2d, GroupNorm with a weight difference, Linear).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(comfy_python) -> dict:
    comfy_dir, python = comfy_python
    run = subprocess.run([python, str(Path(__file__).with_name("quantized_check.py")), str(comfy_dir), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def comfy_python():
    server = sys.modules["lora_trainer_it_server"]
    try:
        comfy_dir = server.comfyui_dir()
    except server.NoComfyUI as why:
        pytest.skip(str(why))
    return comfy_dir, server.comfyui_python(comfy_dir)


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "int8_tensorwise"])
@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr"])
def test_quantized_linear_trains_through_its_forward_and_stays_bit_identical(results, fmt, algorithm):
    r = results[f"quantized-{fmt}-{algorithm}"]
    assert r["weight_type"] == "QuantizedTensor"  # ComfyUI's layer really holds a quantized weight
    assert r["error"] is None and r["adapters"] == 2  # both Linear layers (no nn.Linear subclass) served
    assert r["last"] < 0.8 * r["first"], r
    assert r["unchanged"]  # codes, scale and comfy_quant entry byte for byte


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "int8_tensorwise"])
def test_dora_on_a_quantized_weight_is_refused_naming_the_layer(results, fmt):
    r = results[f"quantized-{fmt}-dora"]
    assert r["error"].startswith("layer 0: its weight is a QuantizedTensor (quantized)"), r
    assert "use lora, loha or lokr" in r["error"] and r["unchanged"]


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("algorithm", ["lora", "dora"])
def test_manual_cast_fp8_layers_train_and_stay_bit_identical(results, dtype, algorithm):
    """DoRA reads the fp8 weight cast to fp32; the GroupNorm trains a weight difference on its fp8 weight."""
    r = results[f"manual_cast-{dtype}-{algorithm}"]
    assert r["error"] is None and r["adapters"] == 3, r
    assert r["last"] < 0.5 * r["first"], r
    assert r["unchanged"]
