"""Train LoRA trains SDXL and SD3 models in a real ComfyUI (CPU, tiny random-weight models).

One server for the module (`comfy_families` below) holds:
- **SDXL**, built in-process: ComfyUI's detection loads only the full SDXL architecture
  (`supported_models.SDXL` matches model_channels 320, transformer_depth [0, 0, 2, 2, 10, 10]), so
  a toy-width SDXL cannot be a file. The test-only node ITTinySDXLLoader (it_family_nodes.py,
  make_sdxl.py) builds ComfyUI's `supported_models.SDXL` config with a toy UNet (width 32, two
  levels, ADM input 2816 = pooled 1280 + six size embeddings), `comfy.model_base.SDXL` from it and a
  ModelPatcher, as UNETLoader would after reading a file. Latents come from the tiny SD1.5
  checkpoint's 4-channel VAE (CheckpointLoaderSimple), conditioning from ITSDXLConditioning: a
  2048-wide context, a 1280-wide `pooled_output` and the width/height/crop/target values that
  SDXL's `encode_adm` turns into the model's `y` input.
- **SD3 / SD3.5**, from a file: make_sd3.py's MMDiT (hidden 128, 2 joint blocks, RMS q/k norms,
  16-channel latents), which core's UNETLoader detects as SD3 (flow, shift 3); the 16-channel VAE
  is make_flux.py's; ITSD3Conditioning gives a 4096-wide context and a 2048-wide pooled output.

For each family, one fp32 training of the demo images at 64 px (SDXL 30 steps, SD3 60): the loss
falls, the saved file loads in core's LoraLoaderModelOnly with every key matched and changes a
sample, and the base model samples bit-identically (latent and pixels) before and after (the probe
trick of test_flux.py: LoraLoaderModelOnly at strength 0 with a fresh file name re-runs the sampler
on the cached, trained-on model object). The pooled output and (SDXL) the size values reach the model
while training: with the same seed, a training's first loss equals the main run's when the
conditioning is the same and differs when only the pooled output or only the sizes differ.
Each training prints its step rate and the server's extra peak RSS (run with -s to see them).
Skips unless COMFYUI_DIR is set.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
DEMO_IMAGES = HERE.parents[1] / "assets" / "demo_images"

SD3_MODEL = "tiny_sd3.safetensors"  # make_sd3.py, linked into models/diffusion_models
VAE16 = "tiny_flux_vae.safetensors"  # make_flux.py's 16-channel VAE, linked into models/vae
SIZE = 64  # px → 8×8 latents
DATASET = "it_families_dataset"
STEPS = 30
TRAIN = {"steps": STEPS, "learning_rate": 5e-3, "batch_size": 1, "rank": 8, "optimizer": "AdamW",
         "loss_function": "MSE", "seed": 1, "lora_dtype": "bf16", "existing_lora": "[None]",
         "training_dtype": "fp32", "train_norms": True, "train_biases": True, "gradient_checkpointing": False}
FAMILIES = ("sdxl", "sd3")
# The tiny MMDiT's flow loss is noisy step to step (a fresh noise level each step): in 30 steps its
# first-5 → last-5 mean fell by only about a quarter (1.48 → 1.12), too close to the 0.8 bar, so
# it trains longer.
FAMILY_STEPS = {"sdxl": STEPS, "sd3": 60}
# bf16 autocast with gradient checkpointing: its first steps track the fp32 run's
BF16 = {"training_dtype": "bf16", "gradient_checkpointing": True}
BF16_STEPS = 10
TRAIN_NODE, SAVE_NODE, PLOT_NODE = "5", "6", "7"
SAMPLE_IMAGE, SAMPLE_LATENT = "8", "9"
LORA_NOT_LOADED = "lora key not loaded"
_probe_ids = itertools.count()


# ---- the server --------------------------------------------------------------------------
def _cached_sd3(comfy_dir: Path, python: str) -> Path:
    """make_sd3.py's file, built once per version of make_sd3.py and make_flux.py (it imports it)."""
    digest = hashlib.sha256(b"".join((HERE / f).read_bytes() for f in ("make_sd3.py", "make_flux.py"))).hexdigest()[:10]
    cache = Path(os.environ.get("COMFYUI_IT_CACHE", "~/.cache/comfyui-lora-trainer-it")).expanduser()
    path = cache / f"tiny_sd3-{digest}" / SD3_MODEL
    if not path.exists():
        done = subprocess.run([python, str(HERE / "make_sd3.py"), str(path.parent)], cwd=comfy_dir,
                              env=dict(os.environ, COMFYUI_DIR=str(comfy_dir)), capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"make_sd3.py failed:\n{done.stdout}\n{done.stderr}")
    return path


@pytest.fixture(scope="module")
def comfy_families(tmp_path_factory: pytest.TempPathFactory):
    """A ComfyUI server of its own: the tiny SD1.5 checkpoint (for its VAE), make_sd3.py's model,
    make_flux.py's VAE and the test-only nodes of it_family_nodes.py."""
    server = sys.modules["lora_trainer_it_server"]  # loaded by conftest.py
    comfy_dir, python = server.comfyui_or_skip()
    _, vae16 = server.cached_flux(comfy_dir, python)
    base = tmp_path_factory.mktemp("comfyui_families_base")
    server.make_base_dir(base, server.cached_checkpoint(comfy_dir, python), {
        f"models/diffusion_models/{SD3_MODEL}": _cached_sd3(comfy_dir, python),
        f"models/vae/{VAE16}": vae16,
        "custom_nodes/it_family_nodes.py": HERE / "it_family_nodes.py",
    })
    client = server.start_server(comfy_dir, python, base)
    try:
        yield client
    finally:
        server.stop(client.process)


# ---- graphs ------------------------------------------------------------------------------
def conditioning(family: str, seed: int, pooled_seed: int | None = None, size: int = SIZE) -> dict:
    pooled_seed = seed if pooled_seed is None else pooled_seed
    if family == "sd3":
        return {"class_type": "ITSD3Conditioning", "inputs": {"seed": seed, "pooled_seed": pooled_seed, "tokens": 77}}
    return {"class_type": "ITSDXLConditioning",
            "inputs": {"seed": seed, "pooled_seed": pooled_seed, "tokens": 77, "width": size, "height": size,
                       "crop_w": 0, "crop_h": 0, "target_width": SIZE, "target_height": SIZE}}


def loaders(family: str) -> dict:
    """Node "1" gives the MODEL, node "v" the VAE (for SDXL: output 2 of the SD1.5 checkpoint)."""
    if family == "sd3":
        return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": SD3_MODEL, "weight_dtype": "default"}},
                "v": {"class_type": "VAELoader", "inputs": {"vae_name": VAE16}}}
    return {"1": {"class_type": "ITTinySDXLLoader", "inputs": {"seed": 0}},
            "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}}}


def vae(family: str) -> list:
    return ["v", 0] if family == "sd3" else ["ckpt", 2]


def train_graph(family: str, prefix: str, cond: dict, steps: int | None = None, **settings) -> dict:
    """Model + VAE, the demo images → VAEEncode, conditioning → Train LoRA (TRAIN, then `settings`)
    → Save LoRA (`full`, with norm and bias differences) and Plot Loss Graph."""
    steps = FAMILY_STEPS[family] if steps is None else steps
    return {
        **loaders(family),
        "2": {"class_type": "LoRATrainer_LoadImageSetFromFolder",
              "inputs": {"folder": DATASET, "resize_method": "Crop", "width": SIZE, "height": SIZE}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": vae(family)}},
        "c": cond,
        TRAIN_NODE: {"class_type": "LoRATrainer_TrainLoRA",
                     "inputs": {"model": ["1", 0], "latents": ["3", 0], "positive": ["c", 0], **TRAIN, "steps": steps,
                                **settings}},
        SAVE_NODE: {"class_type": "LoRATrainer_SaveLoRA",
                    "inputs": {"lora": [TRAIN_NODE, 1], "prefix": prefix, "steps": [TRAIN_NODE, 3], "format": "full"}},
        PLOT_NODE: {"class_type": "LoRATrainer_PlotLossGraph",
                    "inputs": {"loss": [TRAIN_NODE, 2], "filename_prefix": f"it_{family}_loss/graph"}},
    }


def sample_graph(family: str, lora_name: str, strength: float, tag: str) -> dict:
    """Core's LoraLoaderModelOnly, KSampler (2 steps, euler/simple, cfg 1) from an empty latent of
    the family's channels; saves the decoded image and the latent itself."""
    empty = ({"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
             if family == "sd3" else
             {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}})
    return {
        **loaders(family),
        "2": {"class_type": "LoraLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": strength}},
        "c": conditioning(family, 0),
        "n": conditioning(family, 1),
        "5": empty,
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["2", 0], "positive": ["c", 0], "negative": ["n", 0], "latent_image": ["5", 0],
                         "seed": 7, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                         "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": vae(family)}},
        SAMPLE_IMAGE: {"class_type": "SaveImage",
                       "inputs": {"images": ["7", 0], "filename_prefix": f"it_{family}_samples/{tag}"}},
        SAMPLE_LATENT: {"class_type": "SaveLatent",
                        "inputs": {"samples": ["6", 0], "filename_prefix": f"it_{family}_latents/{tag}"}},
    }


class Sample(NamedTuple):
    pixels: np.ndarray
    latent: np.ndarray
    log: str


def sample(comfy, family: str, lora_name: str, strength: float, tag: str) -> Sample:
    from safetensors.numpy import load_file

    mark = len(comfy.log())
    outputs = comfy.run(sample_graph(family, lora_name, strength, tag))["outputs"]
    image = outputs[SAMPLE_IMAGE]["images"][0]
    with Image.open(comfy.output_dir / image["subfolder"] / image["filename"]) as img:
        pixels = np.asarray(img.convert("RGB")).copy()
    saved = outputs[SAMPLE_LATENT]["latents"][0]
    latent = load_file(str(comfy.output_dir / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    return Sample(pixels, latent, comfy.log(mark))


def sample_base(comfy, family: str, tag: str) -> Sample:
    probe = f"it_families_probe_{next(_probe_ids)}.safetensors"
    (comfy.loras_dir / probe).write_bytes(b"")
    return sample(comfy, family, probe, 0.0, tag)


def model_loads(comfy) -> int:
    """How often the server has built a model so far (model_base logs this once per model)."""
    return comfy.log().count("model weight dtype")


# ---- fixtures ----------------------------------------------------------------------------
class Trained(NamedTuple):
    saved: str
    losses: list[float]
    log: str
    seconds_per_step: float | None  # tqdm's rate at the last step
    extra_peak_mib: float | None  # the server's peak RSS over its RSS before the training
    baseline: Sample
    base_after: Sample
    loads_before: int
    loads_after: int
    probes: dict[str, list[float]]  # first losses of 2-step trainings: same / pooled / size
    bf16: list[float]  # the losses of a BF16_STEPS-step training in bf16 with gradient checkpointing


@pytest.fixture(scope="module")
def families(comfy_families) -> dict[str, Trained]:
    comfy, server = comfy_families, sys.modules["lora_trainer_it_server"]
    folder = comfy.input_dir / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("circle", "stripes", "sunset"):
        shutil.copy(DEMO_IMAGES / f"{name}.png", folder / f"{name}.png")
    runs = {}
    for family in FAMILIES:
        baseline = sample_base(comfy, family, "baseline")
        loads = model_loads(comfy)
        steps = FAMILY_STEPS[family]
        run = server.run_measured(comfy, train_graph(family, f"loras/it_{family}", conditioning(family, 0)), steps,
                                  f"{family} fp32", images="3 × 64 px", batch=1, rank=8, training_dtype="fp32",
                                  gradient_checkpointing=False)
        bf16 = server.run_measured(comfy, train_graph(family, f"loras/it_{family}_bf16", conditioning(family, 0),
                                                      BF16_STEPS, **BF16), BF16_STEPS, f"{family} bf16+checkpointing",
                                   images="3 × 64 px", batch=1, rank=8, training_dtype="bf16",
                                   gradient_checkpointing=True)
        probes = {"same": conditioning(family, 0), "pooled": conditioning(family, 0, pooled_seed=5)}
        if family == "sdxl":
            probes["size"] = conditioning(family, 0, size=1024)
        probe_losses = {}
        for what, cond in probes.items():
            probe = comfy.run(train_graph(family, f"loras/it_{family}_probe_{what}", cond, steps=2), timeout=600)
            probe_losses[what] = probe["outputs"][PLOT_NODE]["loss"]
        runs[family] = Trained(run.entry["outputs"][SAVE_NODE]["text"][0], run.entry["outputs"][PLOT_NODE]["loss"],
                               run.log, run.seconds_per_step, run.extra_peak_mib, baseline,
                               sample_base(comfy, family, "base_after"), loads, model_loads(comfy), probe_losses,
                               bf16.entry["outputs"][PLOT_NODE]["loss"])
        losses = runs[family].losses
        print(f"\n{family}: loss first 5 {np.mean(losses[:5]):.4f} -> last 5 {np.mean(losses[-5:]):.4f}; "
              f"{run.seconds_per_step} s/step ({steps} steps, 3 images 64 px, batch 1, fp32, rank 8); "
              f"server extra peak RSS {run.extra_peak_mib} MiB; bf16 + checkpointing {bf16.seconds_per_step} s/step, "
              f"{bf16.extra_peak_mib} MiB; probes {probe_losses}")
    return runs


def lora_name(saved: str) -> str:
    assert saved.startswith("loras/"), saved
    return saved[len("loras/"):]


# ---- tests -------------------------------------------------------------------------------
def test_models_are_the_families_comfyui_says(comfy_families, families):
    log = comfy_families.log()
    assert "model_type FLOW" in log, "UNETLoader did not load the tiny MMDiT as a flow model"
    info = comfy_families.object_info()
    assert SD3_MODEL in info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert {"ITTinySDXLLoader", "ITSDXLConditioning", "ITSD3Conditioning"} <= set(info)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_runs_and_the_loss_falls(comfy_families, families, family):
    run = families[family]
    losses = run.losses
    steps = FAMILY_STEPS[family]
    assert len(losses) == steps and all(np.isfinite(losses)), losses
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    assert last < 0.8 * first, f"{family}: loss did not fall: first 5 mean {first:.4f}, last 5 mean {last:.4f}: {losses}"
    assert re.fullmatch(rf"loras/it_{family}_{steps}_steps_\d{{5}}_\.safetensors", run.saved), run.saved
    assert (comfy_families.output_dir / run.saved).is_file()
    assert run.seconds_per_step > 0, "Train LoRA logged no s/step line"


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_with_gradient_checkpointing_tracks_fp32(families, family):
    run = families[family]
    assert len(run.bf16) == BF16_STEPS and all(np.isfinite(run.bf16)), run.bf16
    np.testing.assert_allclose(run.bf16, run.losses[:BF16_STEPS], rtol=0.05,
                               err_msg=f"{family}: bf16 autocast with checkpointing strays from fp32")


@pytest.mark.parametrize("family", FAMILIES)
def test_file_names_the_family(comfy_families, families, family):
    """The saved file says which base it is for (kohya's ss_base_model_version, nodes/families.py)."""
    from safetensors import safe_open

    with safe_open(str(comfy_families.output_dir / families[family].saved), "np") as f:
        metadata = f.metadata()
    want = {"sdxl": "sdxl_base_v1-0", "sd3": "sd3"}[family]
    assert metadata.get("ss_base_model_version") == want, metadata


@pytest.mark.parametrize("family", FAMILIES)
def test_pooled_output_and_sizes_reach_the_model_while_training(families, family):
    """Same seed, so the same images, noise and timesteps at step 1: the first loss repeats when the
    conditioning repeats, and moves when only the pooled output (SDXL and SD3: the model's `y`
    input) or only SDXL's size values (encode_adm's six embeddings, also in `y`) change."""
    run = families[family]
    probes = run.probes
    assert probes["same"][0] == pytest.approx(run.losses[0], rel=1e-6, abs=0), (
        f"{family}: the same training's first loss does not repeat: {probes['same'][0]} vs {run.losses[0]}")
    for what in ("pooled", "size") if family == "sdxl" else ("pooled",):
        assert abs(probes[what][0] - run.losses[0]) > 1e-4 * abs(run.losses[0]), (
            f"{family}: changing the {what} conditioning changed no loss: it did not reach the model")


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_loads_in_core_with_every_key_and_changes_the_sample(comfy_families, families, family):
    run = families[family]
    with_lora = sample(comfy_families, family, lora_name(run.saved), 1.0, "with_lora")
    log = with_lora.log + run.log
    assert LORA_NOT_LOADED not in log, [line for line in log.splitlines() if LORA_NOT_LOADED in line][:5]
    assert not np.array_equal(with_lora.latent, run.baseline.latent), f"{family}: the LoRA changed no latent"
    assert not np.array_equal(with_lora.pixels, run.baseline.pixels), f"{family}: the LoRA changed no pixel"


@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_is_bit_identical_after_training(families, family):
    run = families[family]
    assert run.loads_after == run.loads_before, "the model was rebuilt meanwhile: the check would prove nothing"
    assert np.array_equal(run.base_after.latent, run.baseline.latent), f"{family}: the base model's latent changed"
    assert np.array_equal(run.base_after.pixels, run.baseline.pixels), f"{family}: the base model's image changed"
