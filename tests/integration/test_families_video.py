"""Train LoRA trains a Wan 2.1 video model in a real ComfyUI (CPU, a tiny random-weight Wan 2.1 T2V).

The server (`comfy_wan`, below) has its own base folder with make_wan.py's file: ComfyUI's own
`WanModel` at the smallest width detection allows (dim 128, 1 head, 1 block), saved so core's
UNETLoader detects it as WAN21_T2V (flow, shift 8). There is no VAE and no text encoder: the
test-only nodes (it_video_nodes.py) give the video latents (two LATENTs of (1, 16, T, 8, 8), T = 3
and 2, smooth drifting patterns standing in for VAE-encoded frames) and an umT5-shaped context.
Train LoRA takes the two video LATENTs unchanged (5-D, different frame counts: same-shape groups).

One training runs for the module; it shows: the loss falls; every layer of the model gets a trained
adapter (the Conv3d patch embedding included); the saved file loads in core's LoraLoaderModelOnly
with every key matched and changes a sample (KSampler on core's EmptyHunyuanLatentVideo, the latent
Wan workflows use); the base model samples bit-identically before and after (the probe trick of
test_flux.py). The step rate (tqdm) and the server's peak RSS go to the console (pytest -s).
Skips unless COMFYUI_DIR is set.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
WAN_MODEL = "tiny_wan21_t2v.safetensors"  # make_wan.WAN_NAME
STEPS = 30
TRAIN = {"steps": STEPS, "learning_rate": 5e-3, "batch_size": 2, "rank": 8, "optimizer": "AdamW",
         "loss_function": "MSE", "seed": 1, "lora_dtype": "fp32", "training_dtype": "fp32",
         "gradient_checkpointing": False, "existing_lora": "[None]"}
TRAIN_NODE, SAVE_NODE, PLOT_NODE, SAMPLE_LATENT = "5", "6", "7", "9"
LORA_NOT_LOADED = "lora key not loaded"
_probe_ids = itertools.count()


def _server():
    return sys.modules["lora_trainer_it_server"]  # conftest.py loads server.py under this name


def cached_wan(comfy_dir: Path, python: str) -> Path:
    """Build the tiny Wan model once per version of make_wan.py (the cache of server.cached_flux)."""
    script = HERE / "make_wan.py"
    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:10]
    cache = Path(os.environ.get("COMFYUI_IT_CACHE", "~/.cache/comfyui-lora-trainer-it")).expanduser()
    path = cache / f"tiny_wan-{digest}" / WAN_MODEL
    if not path.exists():
        done = subprocess.run([python, str(script), str(path.parent)], cwd=comfy_dir,
                              env=dict(os.environ, COMFYUI_DIR=str(comfy_dir)), capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"make_wan.py failed:\n{done.stdout}\n{done.stderr}")
    return path


@pytest.fixture(scope="module")
def comfy_wan(tmp_path_factory: pytest.TempPathFactory):
    """A ComfyUI server of its own with models/diffusion_models/tiny_wan21_t2v.safetensors and the
    test-only nodes of it_video_nodes.py."""
    server = _server()
    try:
        comfy_dir = server.comfyui_dir()
    except server.NoComfyUI as why:
        pytest.skip(str(why))
    python = server.comfyui_python(comfy_dir)
    base = tmp_path_factory.mktemp("comfyui_wan_base")
    server.make_base_dir(base, None, {f"models/diffusion_models/{WAN_MODEL}": cached_wan(comfy_dir, python),
                                      "custom_nodes/it_video_nodes.py": HERE / "it_video_nodes.py"})
    started = time.monotonic()
    client = server.start_server(comfy_dir, python, base)
    try:
        print(f"\nComfyUI up at {client.url} after {time.monotonic() - started:.1f} s (base {base})")
        yield client
    finally:
        server.stop(client.process)


# ---- graphs ------------------------------------------------------------------------------
def train_graph(prefix: str) -> dict:
    """UNETLoader, two video LATENTs (3 and 2 frames) and a Wan-shaped caption → Train LoRA → Save
    LoRA (format full: norms and biases train too, so every weight shows whether gradients reached
    it) and Plot Loss Graph."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": WAN_MODEL, "weight_dtype": "default"}},
        "3": {"class_type": "ITVideoLatents", "inputs": {"seed": 0, "frames": "3,2", "width": 64, "height": 64}},
        "4": {"class_type": "ITWanConditioning", "inputs": {"seed": 0, "tokens": 16}},
        TRAIN_NODE: {"class_type": "LoRATrainer_TrainLoRA",
                     "inputs": {"model": ["1", 0], "latents": ["3", 0], "positive": ["4", 0], **TRAIN,
                                "train_norms": True, "train_biases": True}},
        SAVE_NODE: {"class_type": "LoRATrainer_SaveLoRA",
                    "inputs": {"lora": [TRAIN_NODE, 1], "prefix": prefix, "steps": [TRAIN_NODE, 3], "format": "full"}},
        PLOT_NODE: {"class_type": "LoRATrainer_PlotLossGraph",
                    "inputs": {"loss": [TRAIN_NODE, 2], "filename_prefix": "it_wan_loss/graph"}},
    }


def sample_graph(lora_name: str, strength: float, tag: str) -> dict:
    """Core's LoraLoaderModelOnly on the tiny Wan, KSampler (2 steps, euler/simple, cfg 1) from
    core's EmptyHunyuanLatentVideo (64×64, 9 frames → (1, 16, 3, 8, 8)); saves the latent."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": WAN_MODEL, "weight_dtype": "default"}},
        "2": {"class_type": "LoraLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": strength}},
        "c": {"class_type": "ITWanConditioning", "inputs": {"seed": 0, "tokens": 16}},
        "n": {"class_type": "ITWanConditioning", "inputs": {"seed": 1, "tokens": 16}},
        "5": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9, "batch_size": 1}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["2", 0], "positive": ["c", 0], "negative": ["n", 0], "latent_image": ["5", 0],
                         "seed": 7, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                         "denoise": 1.0}},
        SAMPLE_LATENT: {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"it_wan_latents/{tag}"}},
    }


class Sample(NamedTuple):
    latent: np.ndarray  # float32 (1, 16, 3, 8, 8)
    log: str


def sample(comfy, lora_name: str, strength: float, tag: str) -> Sample:
    from safetensors.numpy import load_file

    mark = len(comfy.log())
    saved = comfy.run(sample_graph(lora_name, strength, tag))["outputs"][SAMPLE_LATENT]["latents"][0]
    latent = load_file(str(comfy.output_dir / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    return Sample(latent, comfy.log(mark))


def sample_base(comfy, tag: str) -> Sample:
    """The cached base model: LoraLoaderModelOnly at strength 0 with a fresh (empty) file re-runs the sampler."""
    probe = f"it_wan_probe_{next(_probe_ids)}.safetensors"
    (comfy.loras_dir / probe).write_bytes(b"")
    return sample(comfy, probe, 0.0, tag)


def model_loads(comfy) -> int:
    return comfy.log().count("model weight dtype")


def peak_rss_mib(pid: int) -> float:
    """The server's peak resident memory so far (VmHWM), MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024


# ---- fixture -----------------------------------------------------------------------------
class Module(NamedTuple):
    baseline: Sample
    loads: int
    entry: dict
    saved: str  # loras/it_wan_30_steps_00001_.safetensors
    losses: list[float]
    log: str
    base_after: Sample


@pytest.fixture(scope="module")
def wan(comfy_wan) -> Module:
    baseline = sample_base(comfy_wan, "baseline")
    assert "model_type FLOW" in comfy_wan.log(), "UNETLoader did not load the tiny model as a flow model"
    loads = model_loads(comfy_wan)
    mark, rss_before = len(comfy_wan.log()), peak_rss_mib(comfy_wan.process.pid)
    started = time.monotonic()
    entry = comfy_wan.run(train_graph("loras/it_wan"), timeout=600)
    seconds, log = time.monotonic() - started, comfy_wan.log(mark)
    rss_after = peak_rss_mib(comfy_wan.process.pid)
    losses = entry["outputs"][PLOT_NODE]["loss"]
    rates = re.findall(rf"{STEPS}/{STEPS} \[[^,\]]*,\s*([\d.]+(?:it/s|s/it))", log)
    print(f"\nwan2.1 t2v: loss first 5 {np.mean(losses[:5]):.4f} -> last 5 {np.mean(losses[-5:]):.4f}; "
          f"rate {rates[-1] if rates else '?'}; graph {seconds:.1f} s; server peak RSS {rss_before:.0f} -> "
          f"{rss_after:.0f} MiB")
    return Module(baseline, loads, entry, entry["outputs"][SAVE_NODE]["text"][0], losses, log,
                  sample_base(comfy_wan, "base_after"))


# ---- tests -------------------------------------------------------------------------------
def test_tiny_wan_is_listed_and_detected_as_wan21_t2v(comfy_wan, wan):
    assert WAN_MODEL in comfy_wan.object_info()["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert "ITVideoLatents" in comfy_wan.object_info() and "EmptyHunyuanLatentVideo" in comfy_wan.object_info()
    assert wan.baseline.latent.shape == (1, 16, 3, 8, 8)


def test_video_latents_train_and_the_loss_falls(comfy_wan, wan):
    losses = wan.losses
    assert len(losses) == STEPS and all(np.isfinite(losses)), losses
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    assert last < 0.8 * first, f"loss did not fall: first 5 mean {first:.4f}, last 5 mean {last:.4f}: {losses}"
    assert re.fullmatch(rf"loras/it_wan_{STEPS}_steps_\d{{5}}_\.safetensors", wan.saved), wan.saved
    assert "Train LoRA: 2 images, one caption for every image" in wan.log


def test_every_layer_of_the_wan_model_trains(comfy_wan, wan):
    """Every weight has a LoRA (lora_up/down, .diff for other weights, .diff_b for biases) and every
    one moved from zero: gradients reached the Conv3d patch embedding, the attention and the head."""
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(comfy_wan.base_dir / "models" / "diffusion_models" / WAN_MODEL), "np") as f:
        model_keys = list(f.keys())
    lora = load_file(str(comfy_wan.output_dir / wan.saved))
    expected = []
    # Wan's modulation tables (`blocks.N.modulation`, `head.modulation`) are bare parameters of a block,
    # not a layer's weight: adapters wrap layers, so they get none (they stay the base's)
    tables = [k for k in model_keys if k.endswith(".modulation")]
    assert tables == ["blocks.0.modulation", "head.modulation"], tables
    for key in model_keys:
        if key in tables:
            continue
        module, kind = key.rsplit(".", 1)
        prefix = "lora_unet_" + module.replace(".", "_")
        if kind == "bias":
            expected.append(prefix + ".diff_b")
        elif prefix + ".lora_up.weight" in lora:
            expected += [prefix + ".lora_up.weight", prefix + ".lora_down.weight"]
        else:
            expected.append(prefix + ".diff")
    missing = [k for k in expected if k not in lora]
    assert not missing, f"no LoRA for {missing}"
    untrained = [k for k in expected if not torch.any(lora[k] != 0)]
    assert not untrained, f"adapters still at zero (no gradient reached them): {untrained}"
    assert not any(k.startswith(("lora_unet_blocks_0.", "lora_unet_head.")) for k in lora)  # no table adapters
    assert lora["lora_unet_patch_embedding.lora_down.weight"].dim() == 5  # the Conv3d's (rank, 16, 1, 2, 2)
    assert "lora_unet_blocks_0_self_attn_q.lora_up.weight" in lora
    assert "lora_unet_blocks_0_cross_attn_k.lora_up.weight" in lora


def test_saved_lora_loads_in_core_with_every_key_and_changes_the_sample(comfy_wan, wan):
    name = wan.saved[len("loras/"):]
    with_lora = sample(comfy_wan, name, 1.0, "with_lora")
    log = with_lora.log + wan.log
    assert LORA_NOT_LOADED not in log, [line for line in log.splitlines() if LORA_NOT_LOADED in line][:5]
    assert not np.array_equal(with_lora.latent, wan.baseline.latent), "the LoRA changed no latent"


def test_base_model_is_bit_identical_after_training(comfy_wan, wan):
    assert np.array_equal(wan.base_after.latent, wan.baseline.latent), "the base model's sample changed"
    assert model_loads(comfy_wan) == wan.loads, "the diffusion model was reloaded: the check would prove nothing"
