"""The family matrix: Train LoRA's general path trains every family below in a real ComfyUI (CPU, tiny
random-weight models of ComfyUI's own classes), one server for the module.

Families (make_families.SPECS, which says per family how its model is built and why): Z-Image, Lumina2,
Flux.2, Chroma, HiDream, LTX-Video, LTX-2 (video stream only), HunyuanVideo, HunyuanVideo 1.5
(text-to-video: its image channels blank, as sampling gives them) and Wan 2.2 TI2V-5B.
- **From a file** where ComfyUI's detection reads a toy-width model back as built (Flux.2, LTX-Video,
  LTX-2 with LTX's `config` metadata, HunyuanVideo, HunyuanVideo 1.5, Wan 2.2 TI2V-5B): make_families.py
  writes it (checking `comfy.model_detection` on its state dict) and core's UNETLoader loads it.
- **In-process** where detection cannot (Z-Image matches only width 3840; Lumina2 only loads at 4096,
  head dim = sum of its fixed rope axes; Chroma's guidance approximator is fixed at 5120 wide; HiDream
  always builds its full configuration): the test-only ITMatrixModel node (it_matrix_nodes.py) builds the
  family's `comfy.supported_models` class at toy width and returns its ModelPatcher, as UNETLoader would.
There is no VAE and no text encoder: ITMatrixLatents gives latents at the family's channel count (4-D
images or 5-D clips, 8×8 latent pixels), ITMatrixConditioning a context at the family's text-encoder
width plus the keys its model reads (pooled output, attention mask, guidance, Llama layers, frame rate).

Per family: a base sample; one fp32 training (`STEPS`, `FAMILY_STEPS` where the loss falls slowly; two samples, batch 2, format full with norm and
bias differences) through server.run_measured, whose figure (s/step, extra peak RSS) bench/families.py
reports; a bf16 training with gradient checkpointing (`BF16_STEPS`); a base sample again. The tests:
the loss falls; the bf16 losses track fp32's; core's LoraLoaderModelOnly loads the file with every key
matched (no "lora key not loaded") and changes the sample; the base samples bit-identically before and
after (the probe trick of test_families.py: LoraLoaderModelOnly at strength 0 with a fresh, empty file
re-runs the sampler on the cached model); the file names the family and its naming (module paths, which
core maps as `lora_unet_<path>`, musubi-tuner's layout for Wan). Run with -s for the figures.
Skips unless COMFYUI_DIR is set.
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("lora_trainer_it_make_families", HERE / "make_families.py")
make_families = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_families)
SPECS = make_families.SPECS
FAMILIES = tuple(SPECS)

STEPS = 30
# Families whose loss falls slowly on these tiny random models train longer (in 30 steps their first-10 →
# last-10 mean fell by only 6-13%)
FAMILY_STEPS = {"lumina2": 60, "flux2": 60, "hidream": 60, "ltxv": 60, "ltxav": 60}
# The loss falls when the last 10 steps' mean is below this fraction of the first 5's. The tiny random
# models start out predicting about zero, so the flow loss starts at E|noise - x0|² = 1 + var(x0), and it is
# mostly the noise's own variance: a LoRA first learns the clean latents (x0, at about half unit scale
# here: a tenth of the loss) and the noise only slowly, through the whole model. Each run is seeded, so the
# means are fixed; the slowest families (128 channels: Flux.2, LTX) fall by 10-12% in 60 steps, and Wan
# 2.2's loss (48 channels, normalised per channel) drops by a sixth in its first 10 steps, then levels.
FALL = 0.92
# LTX-2 trains its video stream only: no audio latents reach the audio stream (its own layers and each
# block's audio attention, feed-forward and audio↔video cross-attention) or the audio-video gates, and its text connectors run in ComfyUI's conditioning step (LTXAV.extra_conds →
# preprocess_text_embeds), before the model's training forward, so these adapters get no gradient
# HunyuanVideo 1.5's image inputs (vision_in, cond_type_embedding) take part only with an image, and in its
# one double block (no single blocks) the text stream's outputs are never read again (the final layer reads
# the image stream), as Qwen-Image's in test_families_video.py
UNTRAINED = {
    "ltxav": ("lora_unet_audio_", "lora_unet_av_ca_", "lora_unet_video_embeddings_connector_",
              "lora_unet_transformer_blocks_0_audio_", "lora_unet_transformer_blocks_0_video_to_audio_"),
    "hunyuan_video15": ("lora_unet_vision_in_", "lora_unet_cond_type_embedding.",
                        "lora_unet_double_blocks_0_txt_attn_norm_query_norm.", "lora_unet_double_blocks_0_txt_attn_proj.",
                        "lora_unet_double_blocks_0_txt_mlp_"),
}
BF16_STEPS = 8
TRAIN = {"learning_rate": 1e-2, "batch_size": 2, "rank": 8, "optimizer": "AdamW", "loss_function": "MSE",
         "seed": 1, "lora_dtype": "fp32", "training_dtype": "fp32", "gradient_checkpointing": False,
         "existing_lora": "[None]", "train_norms": True, "train_biases": True}
BF16 = {"training_dtype": "bf16", "gradient_checkpointing": True}
TRAIN_NODE, SAVE_NODE, PLOT_NODE, SAMPLE_LATENT = "5", "6", "7", "9"
LORA_NOT_LOADED = "lora key not loaded"
_probe_ids = itertools.count()


def _server():
    return sys.modules["lora_trainer_it_server"]  # conftest.py loads server.py under this name


def cached_models(comfy_dir: Path, python: str) -> Path:
    """The folder of make_families.py's files, built once per version of make_families.py."""
    script = HERE / "make_families.py"
    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:10]
    cache = Path(os.environ.get("COMFYUI_IT_CACHE", "~/.cache/comfyui-lora-trainer-it")).expanduser()
    path = cache / f"tiny_families-{digest}"
    if not all((path / make_families.file_name(f)).exists() for f in make_families.FILE_FAMILIES):
        done = subprocess.run([python, str(script), str(path)], cwd=comfy_dir,
                              env=dict(os.environ, COMFYUI_DIR=str(comfy_dir)), capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"make_families.py failed:\n{done.stdout}\n{done.stderr}")
    return path


@pytest.fixture(scope="module")
def comfy_matrix(tmp_path_factory: pytest.TempPathFactory):
    """A ComfyUI server of its own with make_families.py's files in models/diffusion_models and the
    test-only nodes of it_matrix_nodes.py."""
    server = _server()
    comfy_dir, python = server.comfyui_or_skip()
    built = cached_models(comfy_dir, python)
    base = tmp_path_factory.mktemp("comfyui_matrix_base")
    files = {f"models/diffusion_models/{make_families.file_name(f)}": built / make_families.file_name(f)
             for f in make_families.FILE_FAMILIES}
    server.make_base_dir(base, None, {**files, "custom_nodes/it_matrix_nodes.py": HERE / "it_matrix_nodes.py"})
    client = server.start_server(comfy_dir, python, base)
    try:
        yield client
    finally:
        server.stop(client.process)


# ---- graphs ------------------------------------------------------------------------------
def loader(family: str) -> dict:
    if SPECS[family].file:
        return {"class_type": "UNETLoader", "inputs": {"unet_name": make_families.file_name(family),
                                                       "weight_dtype": "default"}}
    return {"class_type": "ITMatrixModel", "inputs": {"family": family, "seed": 0}}


def conditioning(family: str, seed: int) -> dict:
    return {"class_type": "ITMatrixConditioning", "inputs": {"family": family, "seed": seed}}


def train_graph(family: str, prefix: str, steps: int, **settings) -> dict:
    """The family's model, two latents and one caption → Train LoRA → Save LoRA (format full: norms and
    biases train too) and Plot Loss Graph."""
    return {
        "1": loader(family),
        "3": {"class_type": "ITMatrixLatents", "inputs": {"family": family, "seed": 0, "count": 2, "empty": False}},
        "4": conditioning(family, 0),
        TRAIN_NODE: {"class_type": "LoRATrainer_TrainLoRA",
                     "inputs": {"model": ["1", 0], "latents": ["3", 0], "positive": ["4", 0], **TRAIN,
                                "steps": steps, **settings}},
        SAVE_NODE: {"class_type": "LoRATrainer_SaveLoRA",
                    "inputs": {"lora": [TRAIN_NODE, 1], "prefix": prefix, "steps": [TRAIN_NODE, 3], "format": "full"}},
        PLOT_NODE: {"class_type": "LoRATrainer_PlotLossGraph",
                    "inputs": {"loss": [TRAIN_NODE, 2], "filename_prefix": f"it_matrix_loss/{family}"}},
    }


def sample_graph(family: str, lora_name: str, strength: float, tag: str) -> dict:
    """Core's LoraLoaderModelOnly on the family's model, KSampler (2 steps, euler/simple, cfg 1) from an
    empty latent of the family's shape; saves the latent."""
    return {
        "1": loader(family),
        "2": {"class_type": "LoraLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": strength}},
        "c": conditioning(family, 0),
        "n": conditioning(family, 1),
        "5": {"class_type": "ITMatrixLatents", "inputs": {"family": family, "seed": 0, "count": 1, "empty": True}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["2", 0], "positive": ["c", 0], "negative": ["n", 0], "latent_image": ["5", 0],
                         "seed": 7, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                         "denoise": 1.0}},
        SAMPLE_LATENT: {"class_type": "SaveLatent",
                        "inputs": {"samples": ["6", 0], "filename_prefix": f"it_matrix_latents/{family}_{tag}"}},
    }


class Sample(NamedTuple):
    latent: np.ndarray
    log: str


def sample(comfy, family: str, lora_name: str, strength: float, tag: str) -> Sample:
    from safetensors.numpy import load_file

    mark = len(comfy.log())
    saved = comfy.run(sample_graph(family, lora_name, strength, tag))["outputs"][SAMPLE_LATENT]["latents"][0]
    latent = load_file(str(comfy.output_dir / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    return Sample(latent, comfy.log(mark))


def sample_base(comfy, family: str, tag: str) -> Sample:
    """The cached base model: LoraLoaderModelOnly at strength 0 with a fresh (empty) file re-runs the sampler."""
    probe = f"it_matrix_probe_{next(_probe_ids)}.safetensors"
    (comfy.loras_dir / probe).write_bytes(b"")
    return sample(comfy, family, probe, 0.0, tag)


def model_loads(comfy) -> int:
    """How often the server has built a model so far (model_base logs this once per model)."""
    return comfy.log().count("model weight dtype")


# ---- the trainings -----------------------------------------------------------------------
class Trained(NamedTuple):
    baseline: Sample
    loads_before: int
    saved: str  # loras/it_matrix_<family>_<steps>_steps_00001_.safetensors
    losses: list[float]
    log: str
    bf16: list[float]
    base_after: Sample
    loads_after: int


def _train(comfy, family: str) -> Trained:
    server = _server()
    what = {"family": family, "latents": f"2 × {SPECS[family].channels} ch"
            + (f" × {SPECS[family].frames} frames" if SPECS[family].frames else "") + " × 8 × 8",
            "batch": 2, "rank": 8, "built": "file" if SPECS[family].file else "in-process"}
    baseline = sample_base(comfy, family, "baseline")
    loads = model_loads(comfy)
    steps = FAMILY_STEPS.get(family, STEPS)
    run = server.run_measured(comfy, train_graph(family, f"loras/it_matrix_{family}", steps), steps,
                              f"{family} fp32", **what, training_dtype="fp32", gradient_checkpointing=False)
    bf16 = server.run_measured(comfy, train_graph(family, f"loras/it_matrix_{family}_bf16", BF16_STEPS, **BF16),
                               BF16_STEPS, f"{family} bf16+checkpointing", **what, **BF16)
    losses = run.entry["outputs"][PLOT_NODE]["loss"]
    bf16_losses = bf16.entry["outputs"][PLOT_NODE]["loss"]
    print(f"\n{family} ({what['built']}): loss first 5 {np.mean(losses[:5]):.4f} -> last 10 "
          f"{np.mean(losses[-10:]):.4f}; fp32 {run.seconds_per_step} s/step, +{run.extra_peak_mib} MiB; "
          f"bf16 + checkpointing {bf16.seconds_per_step} s/step, +{bf16.extra_peak_mib} MiB, largest relative "
          f"gap to fp32 {np.max(np.abs(np.subtract(bf16_losses, losses[:BF16_STEPS])) / np.abs(losses[:BF16_STEPS])):.4f}")
    return Trained(baseline, loads, run.entry["outputs"][SAVE_NODE]["text"][0], losses, run.log, bf16_losses,
                   sample_base(comfy, family, "base_after"), model_loads(comfy))


@pytest.fixture(scope="module")
def matrix(comfy_matrix) -> dict[str, Trained | Exception]:
    """Each family's trainings, run when a test first asks for the family (so `-k <family>` trains only
    that one); a family whose graphs fail fails its own tests with the reason, not the others'."""
    return {}


def trained(comfy, matrix: dict, family: str) -> Trained:
    if family not in matrix:
        try:
            matrix[family] = _train(comfy, family)
        except Exception as error:  # noqa: BLE001 — kept to fail each of that family's tests with its reason
            matrix[family] = error
    run = matrix[family]
    if isinstance(run, Exception):
        pytest.fail(f"{family}: the training graphs failed: {run}")
    return run


# ---- tests -------------------------------------------------------------------------------
def test_files_are_the_families_comfyui_detects(comfy_matrix):
    info = comfy_matrix.object_info()
    listed = info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert {make_families.file_name(f) for f in make_families.FILE_FAMILIES} <= set(listed), listed
    assert {"ITMatrixModel", "ITMatrixLatents", "ITMatrixConditioning"} <= set(info)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loss_falls(comfy_matrix, matrix, family):
    run = trained(comfy_matrix, matrix, family)
    assert len(run.losses) == FAMILY_STEPS.get(family, STEPS) and all(np.isfinite(run.losses)), run.losses
    # means over steps: the noise level is drawn anew every step (see FALL)
    first, last = float(np.mean(run.losses[:5])), float(np.mean(run.losses[-10:]))
    assert last < FALL * first, f"{family}: loss did not fall: first 5 mean {first:.4f}, last 10 {last:.4f}: {run.losses}"
    assert (comfy_matrix.output_dir / run.saved).is_file(), run.saved


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_with_gradient_checkpointing_tracks_fp32(comfy_matrix, matrix, family):
    run = trained(comfy_matrix, matrix, family)
    assert len(run.bf16) == BF16_STEPS and all(np.isfinite(run.bf16)), run.bf16
    np.testing.assert_allclose(run.bf16, run.losses[:BF16_STEPS], rtol=0.05,
                               err_msg=f"{family}: bf16 autocast with checkpointing strays from fp32")


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_loads_in_core_with_every_key_and_changes_the_sample(comfy_matrix, matrix, family):
    run = trained(comfy_matrix, matrix, family)
    with_lora = sample(comfy_matrix, family, run.saved[len("loras/"):], 1.0, "with_lora")
    log = with_lora.log + run.log
    assert LORA_NOT_LOADED not in log, [line for line in log.splitlines() if LORA_NOT_LOADED in line][:5]
    assert with_lora.latent.shape == run.baseline.latent.shape
    assert not np.array_equal(with_lora.latent, run.baseline.latent), f"{family}: the LoRA changed no latent"


@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_is_bit_identical_after_training(comfy_matrix, matrix, family):
    run = trained(comfy_matrix, matrix, family)
    assert run.loads_after == run.loads_before, f"{family}: the model was rebuilt meanwhile: the check would prove nothing"
    assert np.array_equal(run.base_after.latent, run.baseline.latent), f"{family}: the base model's sample changed"


@pytest.mark.parametrize("family", FAMILIES)
def test_file_names_the_family_and_its_naming(comfy_matrix, matrix, family):
    """The file says which base it is for (the model's supported_models class, lowercased, where
    nodes/families.py has no kohya name for it) and that its layers are named by their module paths
    (`lora_unet_` + path, dots → underscores: core maps exactly that for every model)."""
    from safetensors import safe_open

    with safe_open(str(comfy_matrix.output_dir / trained(comfy_matrix, matrix, family).saved), "np") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata.get("ss_base_model_version") == SPECS[family].config.lower(), metadata
    assert metadata.get("lora_trainer.naming") == "module-paths", metadata
    assert keys and all(k.startswith("lora_unet_") for k in keys), keys[:5]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_adapter_trains(comfy_matrix, matrix, family):
    """Every adapter in the file moved from zero (lora_up, and the norm and bias differences), but for the
    layers a family's training cannot reach (UNTRAINED: LTX-2's audio stream and text connectors, HunyuanVideo
    1.5's image inputs and dead text outputs), which stay at zero; LTX-2's video stream does train."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    lora = load_file(str(comfy_matrix.output_dir / trained(comfy_matrix, matrix, family).saved))
    moved = {k: bool(torch.any(v != 0)) for k, v in lora.items() if k.endswith((".lora_up.weight", ".diff", ".diff_b"))}
    unreachable = UNTRAINED.get(family, ())
    untrained = sorted(k for k, m in moved.items() if not m and not k.startswith(unreachable))
    assert moved and not untrained, f"{family}: adapters still at zero (no gradient reached them): {untrained}"
    if unreachable:
        assert not any(m for k, m in moved.items() if k.startswith(unreachable)), f"{family}: an unreachable layer trained"
    if family == "ltxav":
        assert moved["lora_unet_transformer_blocks_0_attn1_to_q.lora_up.weight"]
        assert moved["lora_unet_transformer_blocks_0_attn2_to_k.lora_up.weight"]
