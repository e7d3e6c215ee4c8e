"""Train LoRA trains a Flux model in a real ComfyUI (CPU, a tiny random-weight Flux-dev model).

Flux's blocks update their activations in place (`img += ...` in the double and single blocks);
these tests prove that training still works end to end through ComfyUI's own loaders and sampler.
The server (`comfy_flux`, conftest.py) has its own base folder with make_flux.py's files: a
Flux-dev-layout diffusion model (hidden 256, 2 heads, 1 double + 1 single block, guidance embedding)
that core's UNETLoader detects as Flux, and a 16-channel VAE for core's VAELoader. There is no text
encoder: the test-only node ITFluxConditioning (it_flux_nodes.py) gives a seeded T5-shaped context and
CLIP-shaped pooled vector, and core's FluxGuidance adds the guidance value.

Four trainings (fp32 and bf16, gradient checkpointing off and on) of the demo images at 64 px run once
for the module; for each: the loss falls, the engine reports its in-place guard on (and the blocks
checkpointed when asked), every layer of the model gets a trained adapter, the saved file loads in
core's LoraLoaderModelOnly with every key matched and changes a sample. Checkpointing changes no
number, bf16 tracks fp32, and the base model samples bit-identically (pixels and latent)
before and after each training (the probe trick of test_nodes.py: core's LoraLoaderModelOnly at
strength 0 with a fresh file name re-runs the sampler on the cached, trained-on model object).
Skips unless COMFYUI_DIR is set.
"""
from __future__ import annotations

import itertools
import re
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DEMO_IMAGES = ROOT / "assets" / "demo_images"

FLUX_MODEL = "tiny_flux.safetensors"  # server.FLUX_MODEL_NAME, linked in by the comfy_flux fixture
FLUX_VAE = "tiny_flux_vae.safetensors"  # server.FLUX_VAE_NAME
SIZE = 64  # px → 8×8×16 latents → 16 image tokens after Flux's 2×2 patches
DATASET = "it_flux_dataset"
STEPS = 30
# A step takes ~0.05 s on 2 idle CPU cores; at this rate the loss falls by about a third in 30 steps.
TRAIN = {"steps": STEPS, "learning_rate": 5e-3, "batch_size": 1, "rank": 8, "optimizer": "AdamW",
         "loss_function": "MSE", "seed": 1, "lora_dtype": "bf16", "existing_lora": "[None]"}
CASES = {  # id -> (training_dtype, gradient_checkpointing)
    "fp32": ("fp32", False),
    "fp32-checkpointing": ("fp32", True),
    "bf16": ("bf16", False),
    "bf16-checkpointing": ("bf16", True),
}
TRAIN_NODE, SAVE_NODE, PLOT_NODE = "5", "6", "7"
SAMPLE_IMAGE, SAMPLE_LATENT = "8", "9"
LORA_NOT_LOADED = "lora key not loaded"
_probe_ids = itertools.count()


# ---- graphs ------------------------------------------------------------------------------
def conditioning(seed: int) -> dict:
    return {"class_type": "ITFluxConditioning", "inputs": {"seed": seed, "tokens": 64, "scale": 1.0}}


def train_graph(training_dtype: str, gradient_checkpointing: bool, prefix: str) -> dict:
    """UNETLoader + VAELoader, the demo images → VAEEncode, conditioning → FluxGuidance → Train LoRA
    → Save LoRA and Plot Loss Graph (the node ids of example_workflows/api/train_lora.json). Norm and
    bias differences train too (off by default) and the file is `full`, so every weight of the model
    shows whether gradients reached it."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_MODEL, "weight_dtype": "default"}},
        "v": {"class_type": "VAELoader", "inputs": {"vae_name": FLUX_VAE}},
        "2": {"class_type": "LoRATrainer_LoadImageSetFromFolder",
              "inputs": {"folder": DATASET, "resize_method": "Crop", "width": SIZE, "height": SIZE}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["v", 0]}},
        "c": conditioning(0),
        "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["c", 0], "guidance": 3.5}},
        TRAIN_NODE: {"class_type": "LoRATrainer_TrainLoRA",
                     "inputs": {"model": ["1", 0], "latents": ["3", 0], "positive": ["4", 0], **TRAIN,
                                "training_dtype": training_dtype, "train_norms": True, "train_biases": True,
                                "gradient_checkpointing": gradient_checkpointing}},
        SAVE_NODE: {"class_type": "LoRATrainer_SaveLoRA",
                    "inputs": {"lora": [TRAIN_NODE, 1], "prefix": prefix, "steps": [TRAIN_NODE, 3], "format": "full"}},
        PLOT_NODE: {"class_type": "LoRATrainer_PlotLossGraph",
                    "inputs": {"loss": [TRAIN_NODE, 2], "filename_prefix": "it_flux_loss/graph"}},
    }


def sample_graph(lora_name: str, strength: float, tag: str) -> dict:
    """Core's LoraLoaderModelOnly on the tiny Flux, KSampler (2 steps, euler/simple, cfg 1) from an
    empty 16-channel latent; saves the decoded image and the latent itself."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_MODEL, "weight_dtype": "default"}},
        "v": {"class_type": "VAELoader", "inputs": {"vae_name": FLUX_VAE}},
        "2": {"class_type": "LoraLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": strength}},
        "c": conditioning(0),
        "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["c", 0], "guidance": 3.5}},
        "n": conditioning(1),
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["2", 0], "positive": ["4", 0], "negative": ["n", 0], "latent_image": ["5", 0],
                         "seed": 7, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                         "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["v", 0]}},
        SAMPLE_IMAGE: {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"it_flux_samples/{tag}"}},
        SAMPLE_LATENT: {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"it_flux_latents/{tag}"}},
    }


class Sample(NamedTuple):
    pixels: np.ndarray  # uint8 H×W×3
    latent: np.ndarray  # float32 (1, 16, 8, 8), the sampler's output before decoding
    log: str  # the server log while it ran


def sample(comfy, lora_name: str, strength: float, tag: str) -> Sample:
    from safetensors.numpy import load_file

    mark = len(comfy.log())
    outputs = comfy.run(sample_graph(lora_name, strength, tag))["outputs"]
    image = outputs[SAMPLE_IMAGE]["images"][0]
    with Image.open(comfy.output_dir / image["subfolder"] / image["filename"]) as img:
        pixels = np.asarray(img.convert("RGB")).copy()
    saved = outputs[SAMPLE_LATENT]["latents"][0]
    latent = load_file(str(comfy.output_dir / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    return Sample(pixels, latent, comfy.log(mark))


def sample_base(comfy, tag: str) -> Sample:
    """A sample from the cached base model: LoraLoaderModelOnly at strength 0 returns the model
    without reading the (empty) file; the fresh name makes ComfyUI re-run the sampler."""
    probe = f"it_flux_probe_{next(_probe_ids)}.safetensors"
    (comfy.loras_dir / probe).write_bytes(b"")
    return sample(comfy, probe, 0.0, tag)


def model_loads(comfy) -> int:
    """How often the server has built a diffusion model so far (model_base logs this once per model)."""
    return comfy.log().count("model weight dtype")


def assert_same_sample(got: Sample, want: Sample, what: str) -> None:
    assert np.array_equal(got.latent, want.latent), f"{what}: the base model's latent changed"
    assert np.array_equal(got.pixels, want.pixels), f"{what}: the base model's image changed"


# ---- fixtures ----------------------------------------------------------------------------
class Trained(NamedTuple):
    entry: dict
    saved: str  # relative to the output folder: loras/it_flux_<case>_30_steps_00001_.safetensors
    losses: list[float]
    log: str  # the server log while it trained
    base_after: Sample  # a base-model sample taken right after this training
    loads: int  # diffusion-model loads when that sample was taken


class Module(NamedTuple):
    baseline: Sample  # a base-model sample taken before anything trained
    loads: int
    runs: dict[str, Trained]


@pytest.fixture(scope="module")
def flux(comfy_flux) -> Module:
    """Samples the base model, then runs the four trainings one after another (a base sample after each)."""
    folder = comfy_flux.input_dir / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("circle", "stripes", "sunset"):
        shutil.copy(DEMO_IMAGES / f"{name}.png", folder / f"{name}.png")

    baseline = sample_base(comfy_flux, "baseline")
    assert "model_type FLUX" in comfy_flux.log(), "UNETLoader did not load the tiny model as Flux"
    loads = model_loads(comfy_flux)
    runs = {}
    for case, (dtype, checkpointing) in CASES.items():
        measured = sys.modules["lora_trainer_it_server"].run_measured(
            comfy_flux, train_graph(dtype, checkpointing, f"loras/it_flux_{case}"), STEPS, f"flux {case}",
            images="3 × 64 px", batch=1, rank=8, training_dtype=dtype, gradient_checkpointing=checkpointing)
        entry, log = measured.entry, measured.log
        runs[case] = Trained(entry, entry["outputs"][SAVE_NODE]["text"][0], entry["outputs"][PLOT_NODE]["loss"],
                             log, sample_base(comfy_flux, f"base_after_{case}"), model_loads(comfy_flux))
        print(f"\n{case}: {summary(runs[case])}")  # shown with pytest -s
    return Module(baseline, loads, runs)


def summary(run: Trained) -> str:
    """Loss means of the first and last 5 steps and tqdm's rate at the end (e.g. '12.3it/s')."""
    rates = re.findall(rf"{STEPS}/{STEPS} \[[^,\]]*,\s*([\d.]+(?:it/s|s/it))", run.log)
    losses = run.losses
    return (f"loss first 5 {np.mean(losses[:5]):.4f} -> last 5 {np.mean(losses[-5:]):.4f} "
            f"(first {losses[0]:.4f}, last {losses[-1]:.4f}), {rates[-1] if rates else '?'}")


def lora_name(saved: str) -> str:
    assert saved.startswith("loras/"), saved
    return saved[len("loras/"):]


# ---- tests -------------------------------------------------------------------------------
def test_tiny_flux_files_are_listed_by_core_loaders(comfy_flux):
    info = comfy_flux.object_info()
    assert FLUX_MODEL in info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert FLUX_VAE in info["VAELoader"]["input"]["required"]["vae_name"][0]
    assert "ITFluxConditioning" in info and "FluxGuidance" in info


@pytest.mark.parametrize("case", CASES)
def test_training_runs_and_the_loss_falls(comfy_flux, flux, case):
    run = flux.runs[case]
    losses = run.losses
    assert len(losses) == STEPS and all(np.isfinite(losses)), losses
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    assert last < 0.8 * first, f"{case}: loss did not fall: first 5 mean {first:.4f}, last 5 mean {last:.4f}: {losses}"
    assert re.fullmatch(rf"loras/it_flux_{case}_{STEPS}_steps_\d{{5}}_\.safetensors", run.saved), run.saved
    assert (comfy_flux.output_dir / run.saved).is_file()
    graph = run.entry["outputs"][PLOT_NODE]["images"][0]
    assert (comfy_flux.output_dir / graph["subfolder"] / graph["filename"]).is_file()
    assert re.search(rf"Train LoRA:.*{STEPS}/{STEPS}.*loss=\d", run.log), "no loss on the console progress bar"


@pytest.mark.parametrize("case", CASES)
def test_training_went_through_the_in_place_guard_and_checkpointing(flux, case):
    """The engine's log line (training/checkpointing.py, after step 1): Flux's blocks write in place
    into tensors saved for backward, so the guard must be on; with gradient_checkpointing the blocks
    must really have run checkpointed (the losses alone cannot tell, they are equal either way)."""
    line = re.search(r"Train LoRA: gradient checkpointing: (\d+) of (\d+) patched blocks ran checkpointed; "
                     r"in-place guard (\w+)", flux.runs[case].log)
    assert line, f"{case}: no checkpointing/guard line in the server log"
    ran, patched, guard = int(line[1]), int(line[2]), line[3]
    assert guard == "on", f"{case}: {line[0]}"
    if CASES[case][1]:
        assert ran == patched > 0, f"{case}: {line[0]}"
    else:
        assert ran == patched == 0, f"{case}: {line[0]}"


@pytest.mark.parametrize("case", CASES)
def test_every_layer_of_the_flux_model_trains(comfy_flux, flux, case):
    """Every weight of the model has a LoRA (lora_up/down for Linear layers, .diff for the RMSNorm
    scales, .diff_b for biases) and every one moved from its zero init: gradients reached the double
    and single blocks, whose in-place updates need the saved-tensor guard."""
    torch = pytest.importorskip("torch")  # the LoRA is bf16, which numpy cannot hold
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(comfy_flux.base_dir / "models" / "diffusion_models" / FLUX_MODEL), "np") as f:
        model_keys = list(f.keys())
    lora = load_file(str(comfy_flux.output_dir / flux.runs[case].saved))
    expected = sys.modules["lora_trainer_it_server"].expected_lora_keys(model_keys, lora)
    missing = [k for k in expected if k not in lora]
    assert not missing, f"{case}: no LoRA for {missing}"
    untrained = [k for k in expected if not torch.any(lora[k] != 0)]
    assert not untrained, f"{case}: adapters still at zero (no gradient reached them): {untrained}"
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in expected)
    assert any(k.startswith("lora_unet_single_blocks_0_linear1") for k in expected)


@pytest.mark.parametrize("case", CASES)
def test_saved_lora_loads_in_core_with_every_key_and_changes_the_sample(comfy_flux, flux, case):
    run = flux.runs[case]
    name = lora_name(run.saved)
    assert name in comfy_flux.object_info("LoraLoaderModelOnly")["input"]["required"]["lora_name"][0]
    with_lora = sample(comfy_flux, name, 1.0, f"with_lora_{case}")
    log = with_lora.log + run.log
    assert LORA_NOT_LOADED not in log, [line for line in log.splitlines() if LORA_NOT_LOADED in line][:5]
    assert not np.array_equal(with_lora.latent, flux.baseline.latent), f"{case}: the LoRA changed no latent"
    assert not np.array_equal(with_lora.pixels, flux.baseline.pixels), f"{case}: the LoRA changed no pixel"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gradient_checkpointing_changes_no_number(flux, dtype):
    off, on = flux.runs[dtype].losses, flux.runs[f"{dtype}-checkpointing"].losses
    np.testing.assert_allclose(on, off, rtol=1e-4, err_msg=f"{dtype}: checkpointing changed the losses")


def test_bf16_tracks_fp32(flux):
    np.testing.assert_allclose(flux.runs["bf16"].losses, flux.runs["fp32"].losses, rtol=0.05,
                               err_msg="bf16 autocast training strays from fp32")


def test_base_model_is_bit_identical_after_training(comfy_flux, flux):
    for case, run in flux.runs.items():
        assert_same_sample(run.base_after, flux.baseline, f"after training {case}")
    assert flux.runs[list(CASES)[-1]].loads == flux.loads, (
        "the diffusion model was reloaded during the module: the check would prove nothing")
    now = sample_base(comfy_flux, "base_at_end")
    assert model_loads(comfy_flux) == flux.loads, "the diffusion model was reloaded"
    assert_same_sample(now, flux.baseline, "at the end")
