"""Users' files in a real ComfyUI (docs/data.md#bad-input): what each case now does, end to end over HTTP.

The rules themselves are tested offline in tests/test_bad_input.py; here the parts that need ComfyUI:
dataset folders with Windows captions, missing captions and macOS/Jupyter leftovers; a
ConditioningCombine as positive; 16-channel latents into the SD1.5 model; a kohya LoRA with
text-encoder keys and the old diffusers attention-processor layout continued; damaged LoRA files;
prefixes; the permissions of Save LoRA's file beside ComfyUI's own SaveImage PNG. The cancel line,
the NaN LoRA and the wrong-width LoRA are checked in test_nodes.py. Skips unless COMFYUI_DIR is set.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("lora_trainer_it_nodes", Path(__file__).with_name("test_nodes.py"))
it = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = it
_spec.loader.exec_module(it)  # the graph helpers of test_nodes.py (its tests are collected from there)

FOLDER = "it_bad_input"  # circle, stripes, sunset with their captions


@pytest.fixture(scope="module")
def dataset(comfy) -> str:
    it._write_dataset(comfy.input_dir / FOLDER, ["circle", "stripes", "sunset"])
    return FOLDER


def _rng_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}


def _save(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path))


def _load(path: Path) -> dict[str, np.ndarray]:
    torch = pytest.importorskip("torch")  # our files are bf16, which numpy cannot hold
    from safetensors.torch import load_file

    return {k: v.to(torch.float32).numpy() for k, v in load_file(str(path)).items()}


def test_dataset_folder_as_users_have_it(comfy):
    """Items 1, 6, 11: a cp1252 caption, two images without captions, and macOS / Jupyter leftovers."""
    folder = comfy.input_dir / "it_real_folder"
    it._write_dataset(folder, ["circle", "stripes", "sunset"])
    (folder / "circle.txt").write_bytes("café crème, lrtstyle".encode("cp1252"))
    (folder / "stripes.txt").unlink()
    (folder / "sunset.txt").unlink()
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._circle.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / "._circle.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / ".ipynb_checkpoints").mkdir()
    shutil.copy(folder / "circle.png", folder / ".ipynb_checkpoints" / "circle-checkpoint.png")
    g = it.train_graph(comfy, steps=1, seed=11, prefix="loras/it_real_folder")
    g["2"] = {"class_type": "LoRATrainer_LoadCaptionedImageSet",
              "inputs": {"folder": "it_real_folder", "clip": ["1", 1], "resize_method": "Crop",
                         "width": it.SIZE, "height": it.SIZE}}
    g[it.TRAIN_NODE]["inputs"]["positive"] = ["2", 1]
    del g["4"]
    mark = len(comfy.log())
    comfy.run(g)
    log = comfy.log(mark)
    assert ("Load Captioned Image Set: 2 of 3 images have no .txt caption (stripes.png, sunset.png); "
            "they train with an empty caption (default_caption is empty)") in log, log[-3000:]
    assert "Train LoRA: 3 images, one caption per image" in log, log[-3000:]  # the hidden copies were skipped
    assert "not UTF-8; read it as Windows-1252" in log


def _combined_graph(comfy, folder: str) -> dict:
    g = it.train_graph(comfy, folder=folder, steps=2, seed=12, prefix="loras/it_combined")
    g["4b"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "bold colours", "clip": ["1", 1]}}
    g["4c"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["4", 0], "conditioning_2": ["4b", 0]}}
    g[it.TRAIN_NODE]["inputs"]["positive"] = ["4c", 0]
    return g


@pytest.mark.parametrize("images", [["circle", "stripes", "sunset"], ["dots", "rings"]])
def test_conditioning_combine_is_one_combined_caption_for_every_image(comfy, images):
    """Item 7: 3 images (refused before) and 2 images (each got one prompt before) behave alike."""
    folder = f"it_combine_{len(images)}"
    it._write_dataset(comfy.input_dir / folder, images)
    mark = len(comfy.log())
    entry = comfy.run(_combined_graph(comfy, folder))
    assert len(entry["outputs"][it.PLOT_NODE]["loss"]) == 2
    expect = (f"Train LoRA: {len(images)} images, one combined caption (2 prompts, e.g. from ConditioningCombine) "
              "for every image")
    assert expect in comfy.log(mark), comfy.log(mark)[-3000:]


def test_latents_from_a_16_channel_vae_name_the_mismatch(comfy, dataset):
    """Item 10: SD3/Flux-shaped latents into the SD1.5 model fail before training, naming both."""
    g = it.train_graph(comfy, folder=dataset, steps=1)
    g["3"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": it.SIZE, "height": it.SIZE, "batch_size": 2}}
    _, error = it.run_failing(comfy, g)
    assert ("latents: they have 16 channels, but this model (SD15) takes 4-channel latents; the images were encoded "
            "with the VAE of another model (16 channels: SD3/Flux)") in error, error


def test_kohya_lora_with_text_encoder_keys_continues_and_keeps_them(comfy, dataset):
    """Item 3 (and 15): the UNet part trains, the lora_te_ part comes out unchanged; the file's mode
    is the one ComfyUI's own SaveImage gives its PNGs."""
    attn = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"  # kohya, diffusers names
    te = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # CLIP-L fc1: 768 → 3072
    tensors = _rng_tensors({f"{attn}.lora_down.weight": (4, 320), f"{attn}.lora_up.weight": (320, 4),
                            f"{te}.lora_down.weight": (4, 768), f"{te}.lora_up.weight": (3072, 4)})
    tensors.update({f"{attn}.alpha": np.array(4.0, np.float32), f"{te}.alpha": np.array(4.0, np.float32)})
    _save(comfy.loras_dir / "it_kohya_te_3_steps_.safetensors", tensors)
    g = it.train_graph(comfy, folder=dataset, steps=2, seed=13, prefix="loras/it_kohya_te",
                       existing_lora="it_kohya_te_3_steps_.safetensors")
    g["modes"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "it_modes/image"}}
    mark = len(comfy.log())
    entry = comfy.run(g)
    assert ("Train LoRA: existing_lora 'it_kohya_te_3_steps_.safetensors' has 3 text-encoder tensors (lora_te_…); "
            "unless LoRA Text Encoder trains the text encoder, they go into the output LoRA unchanged") in comfy.log(mark)
    saved = entry["outputs"][it.SAVE_NODE]["text"][0]
    assert saved.startswith("loras/it_kohya_te_5_steps_"), saved  # 3 earlier steps + 2
    out = _load(comfy.output_dir / saved)
    for key in (f"{te}.lora_down.weight", f"{te}.lora_up.weight", f"{te}.alpha"):
        assert np.array_equal(out[key], tensors[key]), key
    assert not np.allclose(out[f"{attn}.lora_down.weight"],  # written back in kohya's (diffusers) naming
                           tensors[f"{attn}.lora_down.weight"], atol=1e-6)  # the UNet part was trained

    image = entry["outputs"]["modes"]["images"][0]
    png = comfy.output_dir / image["subfolder"] / image["filename"]
    lora_mode, png_mode = (stat.S_IMODE(os.stat(p).st_mode) for p in (comfy.output_dir / saved, png))
    assert lora_mode == png_mode, (oct(lora_mode), oct(png_mode))


def test_old_diffusers_attention_processor_lora_continues(comfy, dataset):
    """Item 14: the 2023 `…processor.to_q_lora.down.weight` layout, with and without `unet.`."""
    attn = "mid_block.attentions.0.transformer_blocks.0"
    shapes = {}
    for proj, width in (("attn1.processor.to_q", 320), ("attn1.processor.to_out", 320), ("attn2.processor.to_k", 768)):
        prefix = "unet." if proj.startswith("attn2") else ""
        shapes[f"{prefix}{attn}.{proj}_lora.down.weight"] = (4, width)
        shapes[f"{prefix}{attn}.{proj}_lora.up.weight"] = (320, 4)
    _save(comfy.loras_dir / "it_attn_procs_7_steps_.safetensors", _rng_tensors(shapes, seed=1))
    entry = comfy.run(it.train_graph(comfy, folder=dataset, steps=1, seed=14, prefix="loras/it_attn_procs",
                                     existing_lora="it_attn_procs_7_steps_.safetensors"))
    saved = entry["outputs"][it.SAVE_NODE]["text"][0]
    assert saved.startswith("loras/it_attn_procs_8_steps_"), saved
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in _load(comfy.output_dir / saved)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (0 bytes), not a readable safetensors file"),
    (bytes(range(256)) * 8, "is not a readable safetensors file"),
])
def test_damaged_existing_lora_names_the_input_and_the_file(comfy, dataset, content, message):
    """Item 2: an interrupted download or random bytes."""
    name = f"it_damaged_{len(content)}.safetensors"
    (comfy.loras_dir / name).write_bytes(content)
    _, error = it.run_failing(comfy, it.train_graph(comfy, folder=dataset, steps=1, existing_lora=name))
    assert "existing_lora:" in error and name in error and message in error, error


def test_prefixes_trailing_slash_and_empty(comfy, dataset):
    """Item 8: `folder/` saves into the folder; an empty prefix says so; Plot names filename_prefix."""
    g = it.train_graph(comfy, folder=dataset, steps=1, seed=15, prefix="it_dir/")
    g[it.PLOT_NODE]["inputs"]["filename_prefix"] = "it_plots/"
    entry = comfy.run(g)
    assert entry["outputs"][it.SAVE_NODE]["text"][0].startswith("it_dir/ComfyUI_trained_lora_1_steps_")
    assert entry["outputs"][it.PLOT_NODE]["images"][0]["subfolder"] == "it_plots"
    assert entry["outputs"][it.PLOT_NODE]["images"][0]["filename"].startswith("loss_graph_")
    g[it.SAVE_NODE]["inputs"]["prefix"] = ""
    _, error = it.run_failing(comfy, g)
    assert "prefix: is empty; give a name relative to the output folder, like 'loras/my_lora'" in error, error
    g[it.SAVE_NODE]["inputs"]["prefix"] = "it_dir/"
    g[it.PLOT_NODE]["inputs"]["filename_prefix"] = "../x"
    _, error = it.run_failing(comfy, g)
    assert "filename_prefix: '../x' points outside the output folder" in error, error


def test_save_image_mode_baseline_is_what_open_gives(comfy):
    """The comparison in the kohya test only means something if ComfyUI's PNGs are not 0600 too."""
    pngs = list(comfy.output_dir.glob("it_modes/*.png"))
    if not pngs:
        pytest.skip("runs after test_kohya_lora_with_text_encoder_keys_continues_and_keeps_them")
    assert stat.S_IMODE(os.stat(pngs[0]).st_mode) != 0o600
