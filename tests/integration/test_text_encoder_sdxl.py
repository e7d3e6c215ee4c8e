"""Text-encoder LoRA for SDXL in a real ComfyUI: LoRA Text Encoder trains CLIP-L and CLIP-G with the UNet.

An SDXL cannot be a file here (ComfyUI's detection loads only the full architecture, test_families.py), so
both halves are built in the server by test-only nodes (it_family_nodes.py): ITTinySDXLLoader's toy SDXL
UNet (context 2048, ADM input 2816) and ITTinySDXLClip's `comfy.sd.CLIP` of ComfyUI's own SDXLClipModel and
SDXLTokenizer at full width (CLIP-L 768, CLIP-G 1280 with its 1280 projection) and three layers each (SDXL
encodes from the penultimate layer; SDClipModel refuses fewer than three for that). The images are the demo
images at 64 px with their .txt captions through Load Captioned Image Set (with that CLIP), their latents
from the tiny SD1.5 checkpoint's VAE; Train LoRA (fp32, seed 1) has LoRA Text Encoder in its options.

- The file: kohya's `lora_te1_` (CLIP-L) and `lora_te2_` (CLIP-G) keys for every layer's six projections
  with down/up/alpha, `lora_unet_` keys in kohya's original (SGM) naming, `ss_text_encoder_lr`,
  `ss_base_model_version` sdxl_base_v1-0. Both encoders trained: every up matrix is non-zero but CLIP-L's
  last layer's, which stays exactly zero as in any SDXL text-encoder LoRA: SDXL reads CLIP-L's penultimate
  hidden state and drops its pooled output, so nothing reaches that layer (CLIP-G's last layer trains
  through the pooled output, the model's ADM input).
- Core's LoraLoader (model and CLIP, strength 1/1) reads every key of it; a prompt encoded by the LoRA'd
  CLIP samples, and that CLIP encodes the prompt differently from the base CLIP.
- At step 0 the loss equals the run's without the text encoder, bit for bit: the captions encoded anew
  through the adapted CLIPs (penultimate layers, CLIP-G's pooled output into `y`) are CLIPTextEncode's.
- The base CLIP is bit-identical after training: ITClipDigest (its weights and an encoding of a caption)
  gives the same sha256 before and after, on the same CLIP object (built once: ComfyUI's cache keeps it).
Skips unless COMFYUI_DIR is set. Run with -s to see the losses.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
DEMO_IMAGES = HERE.parents[1] / "assets" / "demo_images"

SIZE = 64  # px → 8×8 latents
DATASET = "it_te_sdxl_dataset"
STEPS = 8
TE_LR = 1e-3
TRAIN = {"batch_size": 1, "steps": STEPS, "learning_rate": 2e-3, "rank": 8, "optimizer": "AdamW",
         "loss_function": "MSE", "seed": 1, "training_dtype": "fp32", "lora_dtype": "bf16",
         "existing_lora": "[None]"}
TRAIN_NODE, SAVE_NODE, PLOT_NODE = "5", "6", "7"
CLIP_LAYERS = 3  # it_family_nodes.py CLIP_LAYERS
CLIP_BUILT = "ITTinySDXLClip: built a toy SDXL CLIP"  # it_family_nodes.py CLIP_BUILT
MODULES = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
PROMPT = "a house in lrtstyle"
DIGEST_TEXT = "a red circle on a blue background, lrtstyle"  # the circle's caption
LORA_NOT_LOADED = "lora key not loaded"
CORE_NOT_LOADED = "NOT LOADED"  # comfy/sd.py load_lora_for_models: a loaded key no model or CLIP took


# ---- the server --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def comfy_sdxl_te(tmp_path_factory: pytest.TempPathFactory):
    """A ComfyUI server of its own: the tiny SD1.5 checkpoint (for its VAE), the test-only nodes of
    it_family_nodes.py and the demo dataset (images and captions)."""
    server = sys.modules["lora_trainer_it_server"]  # loaded by conftest.py
    comfy_dir, python = server.comfyui_or_skip()
    base = tmp_path_factory.mktemp("comfyui_te_sdxl_base")
    server.make_base_dir(base, server.cached_checkpoint(comfy_dir, python),
                         {"custom_nodes/it_family_nodes.py": HERE / "it_family_nodes.py"})
    folder = base / "input" / DATASET
    folder.mkdir(parents=True)
    for name in ("circle", "stripes", "sunset"):
        for ext in ("png", "txt"):
            shutil.copy(DEMO_IMAGES / f"{name}.{ext}", folder / f"{name}.{ext}")
    client = server.start_server(comfy_dir, python, base)
    try:
        yield client
    finally:
        server.stop(client.process)


# ---- graphs ------------------------------------------------------------------------------
def loaders() -> dict:
    """"1": the toy SDXL MODEL, "clip": the toy SDXL CLIP (seed 0 each: one cached object per server),
    "ckpt": the SD1.5 checkpoint, for its VAE (output 2)."""
    return {"1": {"class_type": "ITTinySDXLLoader", "inputs": {"seed": 0}},
            "clip": {"class_type": "ITTinySDXLClip", "inputs": {"seed": 0}},
            "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}}}


def train_graph(prefix: str, text_encoder: bool = True) -> dict:
    """Load Captioned Image Set (the toy CLIP) → VAEEncode → Train LoRA with LoRA Text Encoder in its options
    (`text_encoder` False: without) → Save LoRA and Plot Loss Graph."""
    g = {
        **loaders(),
        "c": {"class_type": "LoRATrainer_LoadCaptionedImageSet", "inputs": {
            "folder": DATASET, "clip": ["clip", 0], "resize_method": "Stretch", "width": SIZE, "height": SIZE}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["c", 0], "vae": ["ckpt", 2]}},
        "te": {"class_type": "LoRATrainer_TextEncoder", "inputs": {"clip": ["clip", 0], "text_encoder_lr": TE_LR}},
        TRAIN_NODE: {"class_type": "LoRATrainer_TrainLoRA", "inputs": {
            "model": ["1", 0], "latents": ["3", 0], "positive": ["c", 1], **TRAIN, "options": ["te", 0]}},
        SAVE_NODE: {"class_type": "LoRATrainer_SaveLoRA", "inputs": {
            "lora": [TRAIN_NODE, 1], "prefix": prefix, "steps": [TRAIN_NODE, 3], "format": "portable"}},
        PLOT_NODE: {"class_type": "LoRATrainer_PlotLossGraph", "inputs": {
            "loss": [TRAIN_NODE, 2], "filename_prefix": "it_te_sdxl_loss/graph"}},
    }
    if not text_encoder:
        del g["te"], g[TRAIN_NODE]["inputs"]["options"]
    return g


class Digest(NamedTuple):
    digest: str  # of both
    weights: str
    encoding: str


def digest_of(outputs: dict, node: str) -> Digest:
    ui = outputs[node]
    return Digest(ui["text"][0], ui["weights"][0], ui["encoding"][0])


def clip_digest(comfy) -> Digest:
    """ITClipDigest of the toy CLIP (DIGEST_TEXT)."""
    g = {"clip": loaders()["clip"],
         "d": {"class_type": "ITClipDigest", "inputs": {"clip": ["clip", 0], "text": DIGEST_TEXT}}}
    return digest_of(comfy.run(g, timeout=600)["outputs"], "d")


def core_graph(lora_name: str, strength_model: float, strength_clip: float, tag: str) -> dict:
    """Core's LoraLoader applying the file to the toy model and CLIP; PROMPT (negative "") encoded by the
    LoRA'd CLIP, KSampler (2 steps, cfg 2), decoded by the SD1.5 VAE, saved; ITClipDigest of the LoRA'd CLIP."""
    return {
        **loaders(),
        "2": {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["clip", 0], "lora_name": lora_name, "strength_model": strength_model,
            "strength_clip": strength_clip}},
        "p": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 1]}},
        "n": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "e": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "k": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["p", 0], "negative": ["n", 0], "latent_image": ["e", 0], "seed": 7,
            "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "v": {"class_type": "VAEDecode", "inputs": {"samples": ["k", 0], "vae": ["ckpt", 2]}},
        "s": {"class_type": "SaveImage", "inputs": {"images": ["v", 0], "filename_prefix": f"it_te_sdxl/{tag}"}},
        "d": {"class_type": "ITClipDigest", "inputs": {"clip": ["2", 1], "text": DIGEST_TEXT}},
    }


def listed_name(saved: str) -> str:
    """Save LoRA's path relative to the output folder → its name in the `loras` lists."""
    assert saved.startswith("loras/"), saved
    return saved[len("loras/"):]


# ---- the run -----------------------------------------------------------------------------
class Trained(NamedTuple):
    saved: str  # relative to the output folder: loras/…
    losses: list[float]
    log: str  # the server's log while training
    before: Digest
    after: Digest
    builds_before: int  # CLIP builds when the digest before was taken
    builds_after: int  # … and when the digest after was
    unet_only: list[float]  # the losses of the same run without the text encoder


@pytest.fixture(scope="module")
def trained(comfy_sdxl_te) -> Trained:
    comfy = comfy_sdxl_te
    before = clip_digest(comfy)
    builds_before = comfy.log().count(CLIP_BUILT)
    mark = len(comfy.log())
    entry = comfy.run(train_graph("loras/it_te_sdxl"), timeout=1200)
    log = comfy.log(mark)
    after = clip_digest(comfy)
    builds_after = comfy.log().count(CLIP_BUILT)
    unet_only = comfy.run(train_graph("loras/it_te_sdxl_unet_only", text_encoder=False), timeout=1200)
    run = Trained(entry["outputs"][SAVE_NODE]["text"][0], entry["outputs"][PLOT_NODE]["loss"], log, before, after,
                  builds_before, builds_after, unet_only["outputs"][PLOT_NODE]["loss"])
    print(f"\nsdxl text encoder: {STEPS} steps, losses {[round(x, 4) for x in run.losses]}; saved {run.saved}")
    return run


def file_of(comfy, saved: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a saved file."""
    with safe_open(str(comfy.output_dir / saved), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# ---- tests -------------------------------------------------------------------------------
def test_the_text_encoder_trains_both_clips(trained):
    assert "the text encoder trains too (clip_l and clip_g" in trained.log, trained.log[-3000:]
    assert len(trained.losses) == STEPS and all(np.isfinite(trained.losses)), trained.losses
    # step 0 (adapters at zero): the captions encoded anew, CLIP-G's pooled output and the size values it
    # goes into the model's `y` with, equal Load Captioned Image Set's encoding bit for bit
    assert trained.losses[0] == trained.unet_only[0] and trained.losses[1:] != trained.unet_only[1:]


def test_the_file_holds_both_text_encoders_in_kohyas_names(comfy_sdxl_te, trained):
    tensors, metadata = file_of(comfy_sdxl_te, trained.saved)
    te_layers = {k.split(".")[0] for k in tensors if k.startswith("lora_te")}
    want = {f"lora_te{n}_text_model_encoder_layers_{i}_{m}" for n in (1, 2) for i in range(CLIP_LAYERS)
            for m in MODULES}
    assert te_layers == want, (sorted(te_layers - want)[:5], sorted(want - te_layers)[:5])
    te_keys = {f"{layer}.{s}" for layer in want for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert {k for k in tensors if k.startswith("lora_te")} == te_keys
    # CLIP-L's last layer: SDXL takes CLIP-L's penultimate hidden state and no pooled output from it
    untrained = {f"lora_te1_text_model_encoder_layers_{CLIP_LAYERS - 1}_{m}" for m in MODULES}
    zero = sorted(layer for layer in want if not tensors[f"{layer}.lora_up.weight"].any())
    assert zero == sorted(untrained), f"up matrices all zero: {zero}"
    for n in (1, 2):  # both encoders trained
        assert any(tensors[f"lora_te{n}_text_model_encoder_layers_0_{m}.lora_up.weight"].any() for m in MODULES)

    unet = [k for k in tensors if not k.startswith("lora_te")]
    assert unet and all(k.startswith("lora_unet_") for k in unet), [k for k in unet if "lora_unet_" not in k][:5]
    assert any(k.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_")) for k in unet), unet[:5]
    assert not any(part in k for k in unet for part in ("down_blocks", "up_blocks", "mid_block")), unet[:5]
    assert metadata["lora_trainer.naming"] == "kohya-original", metadata.get("lora_trainer.naming")
    assert metadata["ss_text_encoder_lr"] == "0.001", metadata["ss_text_encoder_lr"]
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0", metadata["ss_base_model_version"]


def test_core_loraloader_reads_every_key_and_the_lorad_clip_samples(comfy_sdxl_te, trained):
    comfy = comfy_sdxl_te
    name = listed_name(trained.saved)
    assert name in comfy.object_info("LoraLoader")["input"]["required"]["lora_name"][0]
    mark = len(comfy.log())
    outputs = comfy.run(core_graph(name, 1.0, 1.0, "with_lora"), timeout=600)["outputs"]
    log = comfy.log(mark)
    for bad in (LORA_NOT_LOADED, CORE_NOT_LOADED):
        assert bad not in log, [line for line in log.splitlines() if bad in line][:5]
    image = outputs["s"]["images"][0]
    assert (comfy.output_dir / image["subfolder"] / image["filename"]).is_file()
    lorad = digest_of(outputs, "d")
    assert lorad.encoding != trained.before.encoding, "the LoRA'd CLIP encodes the caption as the base CLIP does"


def test_the_base_clip_is_bit_identical_after_training(trained):
    assert trained.builds_after == trained.builds_before == 1, (
        f"the toy CLIP was built {trained.builds_before} then {trained.builds_after} times: the digests would not "
        "be of the CLIP that trained")
    assert trained.after == trained.before, f"before {trained.before}, after {trained.after}"
