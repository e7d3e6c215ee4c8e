"""The bases users have, in a real ComfyUI: its own fp8 and quantized op classes (in-process, CPU).

Skips unless COMFYUI_DIR is set (conftest.py). quantized_check.py runs in ComfyUI's Python and
trains our adapters on `comfy.ops.mixed_precision_ops` Linear layers whose weight is a
QuantizedTensor (float8_e4m3fn and int8_tensorwise, both run on the CPU) and on `comfy.ops.manual_cast`
layers stored in fp8 (e4m3fn, e5m2; Conv2d, GroupNorm with a weight difference, Linear).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    return sys.modules["lora_trainer_it_server"].comfyui_or_skip()


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


# ---- fp8 through ComfyUI's loaders, in a server (the tiny SD1.5 checkpoint's UNet) -----------------
_spec = importlib.util.spec_from_file_location("lora_trainer_it_nodes", Path(__file__).with_name("test_nodes.py"))
nodes_it = sys.modules.get(_spec.name) or importlib.util.module_from_spec(_spec)
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = nodes_it
    _spec.loader.exec_module(nodes_it)
dataset = nodes_it.dataset  # the fixture of test_nodes.py
UNET, UNET_FP8 = "it_tiny_unet.safetensors", "it_tiny_unet_fp8.safetensors"


@pytest.fixture(scope="module")
def unets(comfy) -> None:
    """The checkpoint's UNet as a diffusion model, as stored (fp32) and stored in fp8 (e4m3fn)."""
    import torch
    from safetensors.torch import load_file, save_file

    prefix = "model.diffusion_model."
    sd = {k[len(prefix):]: v for k, v in load_file(str(comfy.base_dir / "models" / "checkpoints" / comfy.checkpoint)).items()
          if k.startswith(prefix)}
    folder = comfy.base_dir / "models" / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / UNET))
    save_file({k: v.to(torch.float8_e4m3fn) if v.dim() >= 2 else v for k, v in sd.items()}, str(folder / UNET_FP8))


def fp8_graph(comfy, unet: str, weight_dtype: str, steps: int, prefix: str) -> dict:
    """train_lora.json (the checkpoint's CLIP and VAE) with Train LoRA's model from UNETLoader."""
    g = nodes_it.train_graph(comfy, prefix=prefix, steps=steps)
    g["u1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": weight_dtype}}
    g[nodes_it.TRAIN_NODE]["inputs"]["model"] = ["u1", 0]
    return g


def fp8_base_sample(comfy, unet: str, weight_dtype: str, tag: str):
    """A sample of UNETLoader's cached model (strength-0 probe through LoraLoaderModelOnly, test_nodes.py)."""
    probe = f"it_fp8_probe_{tag}.safetensors"
    (comfy.loras_dir / probe).write_bytes(b"")
    g = nodes_it.sample_graph(comfy, probe, 0.0, tag)
    g["u1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": weight_dtype}}
    g["2"]["inputs"]["model"] = ["u1", 0]
    return nodes_it.pixels(comfy, comfy.run(g))


@pytest.mark.parametrize("unet,weight_dtype,stored", [(UNET, "fp8_e4m3fn", "float8_e4m3fn"),
                                                      (UNET, "fp8_e5m2", "float8_e5m2"),
                                                      (UNET_FP8, "fp8_e4m3fn", "float8_e4m3fn"),
                                                      (UNET_FP8, "default", "float32")])
def test_fp8_base_trains_and_stays_bit_identical(comfy, dataset, unets, unet, weight_dtype, stored):
    """UNETLoader's weight_dtype fp8, and a UNet file stored in fp8: 30 steps of Train LoRA on CPU, the
    loss falls, and the base (the cached model object training patched) samples exactly as before.
    A file stored in fp8 loaded with weight_dtype "default" is upcast by ComfyUI itself on a CPU
    (model_management.unet_dtype: fp8 is no CPU compute dtype), as the log's dtype shows."""
    mark = len(comfy.log())
    before = fp8_base_sample(comfy, unet, weight_dtype, f"{weight_dtype}_before")
    assert f"model weight dtype torch.{stored}" in comfy.log(mark)  # ComfyUI really built an fp8 model
    entry = sys.modules["lora_trainer_it_server"].run_measured(
        comfy, fp8_graph(comfy, unet, weight_dtype, 30, f"loras/it_fp8_{weight_dtype}"), 30,
        f"sd15 UNet {unet} as {weight_dtype}", images="3 × 64 px", batch=1, training_dtype="fp32").entry
    losses = entry["outputs"][nodes_it.PLOT_NODE]["loss"]
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    after = fp8_base_sample(comfy, unet, weight_dtype, f"{weight_dtype}_after")
    assert np.array_equal(before, after)  # the cached fp8 model object training patched samples as before
