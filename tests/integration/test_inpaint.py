"""Inpainting models in a real ComfyUI (CPU): the tiny SD1.5 UNet widened to 9 input channels (4 latent + 1
mask + 4 masked-image channels), which core's UNETLoader detects as an SD1.5 inpainting model, with the
tiny checkpoint's CLIP and VAE.

1. Encode Training Folder with masks and `inpaint` trains it: the loss falls; the condition reaches the
   model (control_dropout 1, every image without its masked image, starts from another loss); without
   `inpaint` the captions carry no image and Train LoRA refuses, naming InpaintModelConditioning.
2. Same rules as core: one image and its mask through core's LoadImage, LoadImageMask and
   InpaintModelConditioning (noise_mask on, so the mask also weighs the loss) train the very LoRA, bit
   for bit, that Encode Training Folder trains from the same file, mask and caption.
3. The LoRA loads in core's LoraLoaderModelOnly with every key matched and changes an inpainting sample
   (InpaintModelConditioning → KSampler), and the base model samples bit-identically after training.
4. The example workflow example_workflows/api/train_inpaint_lora.json runs with the tiny files (its
   checkpoint's model swapped for the inpainting UNet), at 64 px and a few steps.

Skips unless COMFYUI_DIR is set (see conftest.py).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_spec = importlib.util.spec_from_file_location("lora_trainer_it_nodes", Path(__file__).with_name("test_nodes.py"))
it = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = it
_spec.loader.exec_module(it)  # the graph helpers of test_nodes.py

UNET = "it_sd15_inpaint.safetensors"
FOLDER, MASKS, ONE, ONE_MASKS = "it_inpaint/images", "it_inpaint/masks", "it_inpaint/one", "it_inpaint/one_masks"
CAPTION = "a painted wall, lrtstyle"
TRAIN = {"steps": 16, "batch_size": 2, "learning_rate": 3e-3, "training_dtype": "fp32", "lora_dtype": "fp32",
         "seed": 3, "rank": 8, "optimizer": "AdamW", "loss_function": "MSE", "existing_lora": "[None]"}
ENCODE = {"resolution": 64, "bucket_step": 64, "min_side": 64, "max_side": 64, "default_caption": "",
          "masks": "mask folder", "flip": False, "caption_variants": 1, "shuffle_tags": False, "tag_dropout": 0.0,
          "keep_tokens": 0, "seed": 0, "latent_dtype": "fp32", "cache": False, "chunk": 4, "control_folder": ""}


def picture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64] / 64
    channels = [np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    return ((np.stack(channels, -1) * 0.5 + 0.5) * 255).astype(np.uint8)


def mask(seed: int) -> np.ndarray:
    """A white rectangle (the region to paint) on black, aligned to the 8-px latent grid."""
    out = np.zeros((64, 64), np.uint8)
    top, left = 8 * (seed % 3), 8 * (seed % 4)
    out[top:top + 32, left:left + 24] = 255
    return out


@pytest.fixture(scope="module")
def unet(comfy) -> str:
    """The tiny checkpoint's UNet with a 9-channel input conv (the new channels' weights small and seeded)."""
    import torch
    from safetensors.torch import load_file, save_file

    prefix = "model.diffusion_model."
    weights = {k[len(prefix):]: v for k, v in load_file(str(comfy.base_dir / "models" / "checkpoints" /
                                                             comfy.checkpoint)).items() if k.startswith(prefix)}
    conv = weights["input_blocks.0.0.weight"]  # (320, 4, 3, 3)
    extra = torch.randn((conv.shape[0], 5, *conv.shape[2:]), generator=torch.Generator().manual_seed(0)) * 0.05
    weights["input_blocks.0.0.weight"] = torch.cat([conv, extra.to(conv.dtype)], 1).contiguous()
    folder = comfy.base_dir / "models" / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / UNET))
    return UNET


@pytest.fixture(scope="module")
def data(comfy) -> None:
    for folder, masks, seeds in ((FOLDER, MASKS, (1, 2, 3, 4)), (ONE, ONE_MASKS, (5,))):
        (comfy.input_dir / folder).mkdir(parents=True, exist_ok=True)
        (comfy.input_dir / masks).mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            Image.fromarray(picture(seed)).save(comfy.input_dir / folder / f"i{seed}.png")
            (comfy.input_dir / folder / f"i{seed}.txt").write_text(CAPTION, encoding="utf-8")
            # RGB, not greyscale: this ComfyUI's LoadImage decodes through PyAV, which reads a greyscale PNG's
            # white as 254/255 (core's mask would then not be the file's)
            Image.fromarray(np.repeat(mask(seed)[..., None], 3, -1), "RGB").save(comfy.input_dir / masks / f"i{seed}.png")


def loaders(comfy, unet: str) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy.checkpoint}},
            "u": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}}}


def outputs(prefix: str) -> dict:
    return {it.SAVE_NODE: {"class_type": "LoRATrainer_SaveLoRA",
                           "inputs": {"lora": [it.TRAIN_NODE, 1], "prefix": prefix, "steps": [it.TRAIN_NODE, 3]}},
            it.PLOT_NODE: {"class_type": "LoRATrainer_PlotLossGraph",
                           "inputs": {"loss": [it.TRAIN_NODE, 2], "filename_prefix": "it_inpaint_loss/graph"}}}


def encode_graph(comfy, unet: str, prefix: str, folder: str = FOLDER, masks: str = MASKS, inpaint: bool = True,
                 **options) -> dict:
    g = {**loaders(comfy, unet), **outputs(prefix),
         "e": {"class_type": "LoRATrainer_EncodeTrainingFolder",
               "inputs": {"folder": folder, "vae": ["1", 2], "clip": ["1", 1], "mask_folder": masks, "inpaint": inpaint,
                          **ENCODE}},
         "o": {"class_type": "LoRATrainer_TrainingOptions", "inputs": dict(options)},
         it.TRAIN_NODE: {"class_type": "LoRATrainer_TrainLoRA",
                         "inputs": {"model": ["u", 0], "latents": ["e", 0], "positive": ["e", 1], "options": ["o", 0],
                                    **TRAIN}}}
    return g


def core_graph(comfy, unet: str, prefix: str) -> dict:
    """One image and mask through core's own nodes: LoadImage, LoadImageMask, InpaintModelConditioning."""
    return {**loaders(comfy, unet), **outputs(prefix),
            "p": {"class_type": "LoadImage", "inputs": {"image": f"{ONE}/i5.png"}},
            "m": {"class_type": "LoadImageMask", "inputs": {"image": f"{ONE_MASKS}/i5.png", "channel": "red"}},
            "c": {"class_type": "CLIPTextEncode", "inputs": {"text": CAPTION, "clip": ["1", 1]}},
            "i": {"class_type": "InpaintModelConditioning",
                  "inputs": {"positive": ["c", 0], "negative": ["c", 0], "vae": ["1", 2], "pixels": ["p", 0],
                             "mask": ["m", 0], "noise_mask": True}},
            it.TRAIN_NODE: {"class_type": "LoRATrainer_TrainLoRA",
                            "inputs": {"model": ["u", 0], "latents": ["i", 2], "positive": ["i", 0], **TRAIN}}}


def train(comfy, graph: dict) -> tuple[list[float], dict, str]:
    from safetensors.torch import load_file

    entry = comfy.run(graph, timeout=600)
    losses = entry["outputs"][it.PLOT_NODE]["loss"]
    assert len(losses) == TRAIN["steps"] and all(np.isfinite(losses)), losses
    saved = entry["outputs"][it.SAVE_NODE]["text"][0]
    return losses, load_file(str(comfy.output_dir / saved)), saved


def sample(comfy, unet: str, lora: str, strength: float, tag: str) -> np.ndarray:
    """An inpainting sample of the one image: InpaintModelConditioning → KSampler (2 steps) → SaveLatent."""
    from safetensors.numpy import load_file

    g = core_graph(comfy, unet, "unused")
    for node in (it.TRAIN_NODE, it.SAVE_NODE, it.PLOT_NODE):
        del g[node]
    g["l"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["u", 0], "lora_name": lora, "strength_model": strength}}
    g["k"] = {"class_type": "KSampler", "inputs": {"model": ["l", 0], "positive": ["i", 0], "negative": ["i", 1],
                                                 "latent_image": ["i", 2], "seed": 7, "steps": 2, "cfg": 2.0,
                                                 "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    g["s"] = {"class_type": "SaveLatent", "inputs": {"samples": ["k", 0], "filename_prefix": f"it_inpaint_latents/{tag}"}}
    saved = comfy.run(g)["outputs"]["s"]["latents"][0]
    return load_file(str(comfy.output_dir / saved["subfolder"] / saved["filename"]))["latent_tensor"]


def base_sample(comfy, unet: str, tag: str) -> np.ndarray:
    probe = f"it_inpaint_probe_{tag}.safetensors"
    (comfy.loras_dir / probe).write_bytes(b"")  # strength 0: never read; the fresh name re-runs the sampler
    return sample(comfy, unet, probe, 0.0, tag)


@pytest.fixture(scope="module")
def trained(comfy, unet, data) -> dict:
    before = base_sample(comfy, unet, "before")
    runs = {"inpaint": train(comfy, encode_graph(comfy, unet, "loras/it_inpaint")),
            "dropped": train(comfy, encode_graph(comfy, unet, "loras/it_inpaint_dropped", control_dropout=1.0))}
    return {"before": before, "after": base_sample(comfy, unet, "after"), **runs}


def test_inpainting_trains_from_images_and_masks_and_the_masked_image_reaches_the_model(trained):
    losses = trained["inpaint"][0]
    assert float(np.mean(losses[-4:])) < float(np.mean(losses[:4])), losses
    assert trained["dropped"][0][0] != losses[0], (losses[0], trained["dropped"][0][0])


def test_without_inpaint_it_is_refused_naming_inpaint_model_conditioning(comfy, unet, data):
    graph = encode_graph(comfy, unet, "loras/it_inpaint_refused", inpaint=False)
    error = comfy.execution_error(comfy.wait(comfy.queue(graph), 300))
    assert error is not None and "(4 + 5 input channels)" in error and "InpaintModelConditioning" in error, error
    assert not list(comfy.output_dir.glob("loras/it_inpaint_refused*"))


def test_encode_training_folder_inpaints_by_core_inpaint_model_conditioning_rules(comfy, unet, data):
    ours = train(comfy, encode_graph(comfy, unet, "loras/it_inpaint_ours", folder=ONE, masks=ONE_MASKS))
    core = train(comfy, core_graph(comfy, unet, "loras/it_inpaint_core"))
    assert ours[0] == core[0], (ours[0], core[0])
    assert ours[1].keys() == core[1].keys() and all(ours[1][k].equal(core[1][k]) for k in ours[1])


def test_the_inpainting_lora_loads_in_core_changes_a_sample_and_leaves_the_base(comfy, unet, trained):
    np.testing.assert_array_equal(trained["after"], trained["before"], err_msg="the base model changed")
    mark = len(comfy.log())
    with_lora = sample(comfy, unet, trained["inpaint"][2][len("loras/"):], 1.0, "with_lora")
    log = comfy.log(mark)
    assert it.LORA_NOT_LOADED not in log, [line for line in log.splitlines() if it.LORA_NOT_LOADED in line][:5]
    assert not np.array_equal(with_lora, trained["before"]), "the LoRA changed no latent of the inpainting sample"


def test_the_inpainting_example_workflow_runs_on_the_tiny_files(comfy, unet, data):
    g = it.load_api("train_inpaint_lora.json")
    g["1"]["inputs"]["ckpt_name"] = comfy.checkpoint  # its CLIP and VAE; the model is the inpainting UNet
    g["u"] = loaders(comfy, unet)["u"]
    g["3"]["inputs"].update(model=["u", 0], steps=3, training_dtype="fp32", lora_dtype="fp32")
    g["2"]["inputs"].update(folder=FOLDER, mask_folder=MASKS, **{
        k: ENCODE[k] for k in ("resolution", "bucket_step", "min_side", "max_side")})
    g["4"]["inputs"]["prefix"] = "loras/it_inpaint_example"
    entry = comfy.run(g, timeout=600)
    assert "4 inpainting images" in entry["outputs"]["2"]["text"][0], entry["outputs"]["2"]
    losses = entry["outputs"]["5"]["loss"]
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    assert (comfy.output_dir / entry["outputs"]["4"]["text"][0]).is_file()
