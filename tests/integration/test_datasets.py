"""Encode Training Folder, masked loss and core's dataset chain, trained in a real ComfyUI (CPU, the tiny
SD1.5 checkpoint, 64-px images, a few fp32 steps each).

Every comparison is of the saved LoRAs' tensors, bit for bit. Training is deterministic for a given seed
and data, and each test has a control that must come out bit-identical (a cache hit, a mask of weight 1,
the same pairs through another route), so each "differs" below means the data Train LoRA got differed.

1. Buckets: two 64×64 and two 64×96 images (with .txt captions) go into exactly those two buckets (the
   node's UI summary says so); Train LoRA gets all four with their own captions (its log) at both sizes
   (the saved file's ss_bucket_info: 2 each), and every step uses both (batch 4); the LoRA differs from
   the one trained on the two squares alone, whose latents come from the cache although the files are
   in another folder (the cache is keyed by content).
2. Masked loss: RGBA images whose left half is transparent, masks "alpha channel" and the options'
   unmasked_weight 0, train all four images masked (Train LoRA's log) and differ from masks "none";
   unmasked_weight 1 is bit-identical to masks "none" (the mask only weighs the loss); greyscale files
   of the same masks in a mask folder give the alpha channel's LoRA bit for bit, and so does one MASK
   (LoadImageMask) on both buckets' LATENTs through core's Set Latent Noise Mask.
3. The disk cache: a first run encodes 4 and writes one file per image under the output folder's
   lora_trainer_cache/latents/<vae>/<sha256 of the file>_<bucket>.safetensors; a second run (chunk 2, so
   the node runs again) takes all 4 from the cache and trains a bit-identical LoRA; one image re-written
   with other pixels re-encodes exactly that one (and the LoRA changes); with cache off a new image's
   latent is not written and the summary has no cache counts.
4. Core's LoadImageTextDataSetFromFolder → MakeTrainingDataset → Train LoRA pairs each image with its
   own caption: it trains the very LoRA Encode Training Folder trains from the same image-caption pairs
   in the same order (a second folder named so its sorted order is core's os.listdir order); swapping
   two images' captions (not the first image's: a "first caption for all" bug would not notice) changes
   the LoRA; SaveTrainingDataset → LoadTrainingDataset gives the direct chain's LoRA bit for bit.
   (One and two ResolutionBuckets are covered by test_bad_input_third.py.)
5. Augmentation: flip and caption_variants 2 with shuffle_tags train (Train LoRA's log counts the
   alternatives: 4 flipped copies; 12 with both; the file's metadata still counts 4 images), and each
   LoRA differs from the plain one and from each other.
6. Bad input: masks "mask folder" with mask_folder empty, missing, or outside the input folder fails
   naming mask_folder, before anything is encoded or trained.

Skips unless COMFYUI_DIR is set (see conftest.py).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

_spec = importlib.util.spec_from_file_location("lora_trainer_it_nodes", Path(__file__).with_name("test_nodes.py"))
it = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = it
_spec.loader.exec_module(it)  # the graph helpers of test_nodes.py

ENCODE_NODE = "e1"
OPTIONS_NODE = "9"  # train_lora.json's LoRA Training Options, connected to Train LoRA
TRAIN = {"steps": 3, "batch_size": 2, "learning_rate": 2e-3, "training_dtype": "fp32", "lora_dtype": "fp32",
         "seed": 5}
# resolution 128 at step 32 with sides 64..96 makes the buckets 96×96, 96×64 and 64×96: a 64×96 image takes
# 64×96, a 64×64 one covers none and keeps its own size (never upscaled)
ENCODE = {"resolution": 128, "bucket_step": 32, "min_side": 64, "max_side": 96, "default_caption": "",
          "masks": "none", "mask_folder": "", "flip": False, "caption_variants": 1, "shuffle_tags": False,
          "tag_dropout": 0.0, "keep_tokens": 0, "seed": 0, "latent_dtype": "bf16", "cache": True, "chunk": 4}
TWO_BUCKETS = "4 images in 2 buckets (64×96: 2, 64×64: 2)"
CACHE_ROOT = ("lora_trainer_cache", "latents")


# ---- data --------------------------------------------------------------------------------------
def picture(seed: int, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8: a smooth colour gradient plus noise, different for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.stack([x, y, 1 - x], -1))
    return np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


def half_mask(width: int, height: int) -> np.ndarray:
    """(height, width) uint8: 0 on the left half, 255 on the right (the latent cells split cleanly)."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 2:] = 255
    return mask


def two_shapes(seed: int) -> dict[str, tuple[np.ndarray, str]]:
    """Two 64×64 and two 64×96 pictures with comma-tagged captions: stem → (pixels, caption)."""
    return {
        "square_a": (picture(seed, 64, 64), "lrtstyle, a square, warm light, soft focus"),
        "square_b": (picture(seed + 1, 64, 64), "lrtstyle, another square, cold light, grain"),
        "tall_a": (picture(seed + 2, 64, 96), "lrtstyle, a tall one, evening, haze"),
        "tall_b": (picture(seed + 3, 64, 96), "lrtstyle, another tall one, noon, sharp"),
    }


def write_folder(comfy, name: str, files: dict[str, tuple[np.ndarray, str]], alpha: bool = False) -> Path:
    """`files` as <stem>.png + <stem>.txt in the input subfolder `name`; with `alpha` RGBA PNGs whose
    left half is transparent (half_mask)."""
    folder = comfy.input_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    for stem, (pixels, caption) in files.items():
        if alpha:
            rgba = np.dstack([pixels, half_mask(pixels.shape[1], pixels.shape[0])])
            Image.fromarray(rgba, "RGBA").save(folder / f"{stem}.png")
        else:
            Image.fromarray(pixels, "RGB").save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return folder


# ---- graphs and runs ---------------------------------------------------------------------------
def encode_graph(comfy, folder: str, prefix: str, options: dict | None = None, train: dict | None = None,
                 **encode) -> dict:
    """Checkpoint → Encode Training Folder → Train LoRA (its options node set to `options`) → Save LoRA."""
    g = it.train_graph(comfy, folder=folder, prefix=prefix, **{**TRAIN, **(train or {})})
    for node in ("2", "3", "4"):  # the image loader, VAE Encode and the one caption
        del g[node]
    g[ENCODE_NODE] = {"class_type": "LoRATrainer_EncodeTrainingFolder",
                      "inputs": {"folder": folder, "vae": ["1", 2], "clip": ["1", 1], **{**ENCODE, **encode}}}
    g[it.TRAIN_NODE]["inputs"].update(latents=[ENCODE_NODE, 0], positive=[ENCODE_NODE, 1])
    g[OPTIONS_NODE]["inputs"] = dict(options or {})
    return g


def core_graph(comfy, folder: str, prefix: str, save_dataset: str | None = None) -> dict:
    """Core's LoadImageTextDataSetFromFolder → MakeTrainingDataset → Train LoRA (and, with `save_dataset`,
    → SaveTrainingDataset into the datasets folder)."""
    g = it.train_graph(comfy, folder=folder, prefix=prefix, **TRAIN)
    for node in ("2", "3", "4"):
        del g[node]
    g["d1"] = {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": folder}}
    g["d2"] = {"class_type": "MakeTrainingDataset",
               "inputs": {"images": ["d1", 0], "texts": ["d1", 1], "vae": ["1", 2], "clip": ["1", 1]}}
    g[it.TRAIN_NODE]["inputs"].update(latents=["d2", 0], positive=["d2", 1])
    if save_dataset:
        g["d3"] = {"class_type": "SaveTrainingDataset", "inputs": {"latents": ["d2", 0], "conditioning": ["d2", 1],
                                                                   "folder_name": save_dataset, "shard_size": 2}}
    return g


class Run(NamedTuple):
    summary: str | None  # Encode Training Folder's UI text
    lora: dict  # the saved file's tensors
    meta: dict  # and its metadata
    losses: list[float]
    log: str  # the server's log during the run


def train(comfy, graph: dict) -> Run:
    from safetensors import safe_open

    mark = len(comfy.log())
    entry = comfy.run(graph, timeout=600)
    log = comfy.log(mark)
    train_line(log)  # Train LoRA ran in this prompt (not a cached output): a "same" below compares two trainings
    path = comfy.output_dir / entry["outputs"][it.SAVE_NODE]["text"][0]
    with safe_open(str(path), framework="pt") as f:
        lora, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    text = entry["outputs"].get(ENCODE_NODE, {}).get("text")
    losses = entry["outputs"][it.PLOT_NODE]["loss"]
    assert len(losses) == graph[it.TRAIN_NODE]["inputs"]["steps"] and all(np.isfinite(losses)), losses
    return Run(text[0] if text else None, lora, meta, losses, log)


def same(a: Run, b: Run) -> bool:
    assert a.lora.keys() == b.lora.keys()
    return all(a.lora[k].equal(b.lora[k]) for k in a.lora)


def train_line(log: str) -> str:
    """Train LoRA's line about its images and captions."""
    found = re.findall(r"Train LoRA: \d+ images, [^\n]*", log)
    assert found, log[-3000:]
    return found[-1]


def samples_line(log: str) -> str | None:
    """Train LoRA's line about samples, alternatives and masks (only when the data carries extras)."""
    found = re.findall(r"Train LoRA: \d+ samples drawn from [^\n]*", log)
    return found[-1] if found else None


def cache_files(comfy, image: Path) -> list[Path]:
    """The cache's files for this image file's content."""
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    return sorted(comfy.output_dir.joinpath(*CACHE_ROOT).glob(f"*/{digest}_*.safetensors"))


# ---- 1. buckets ----------------------------------------------------------------------------------
def test_two_aspect_ratios_train_in_two_buckets(comfy):
    files = two_shapes(100)
    folder = write_folder(comfy, "it_ds_buckets", files)
    write_folder(comfy, "it_ds_squares", {k: v for k, v in files.items() if k.startswith("square")})

    every_image = {"batch_size": 4}  # each step draws all 4 (random order, batch 4): both buckets, every step
    both = train(comfy, encode_graph(comfy, folder.name, "loras/it_ds_buckets", train=every_image))
    assert both.summary == TWO_BUCKETS + "; 4 encoded, 0 from the cache", both.summary
    assert f"Encode Training Folder: {TWO_BUCKETS}" in both.log
    assert train_line(both.log) == "Train LoRA: 4 images, one caption per image", train_line(both.log)
    assert samples_line(both.log) is None  # no masks, flips, variants or repeats: trains as plain latents
    buckets = json.loads(both.meta["ss_bucket_info"])["buckets"]
    assert buckets == {"0": {"resolution": [64, 64], "count": 2}, "1": {"resolution": [64, 96], "count": 2}}, buckets
    assert both.meta["ss_enable_bucket"] == "True" and both.meta["ss_num_train_images"] == "4"

    squares = train(comfy, encode_graph(comfy, "it_ds_squares", "loras/it_ds_squares", train=every_image))
    # the same files' content in another folder: the cache (keyed by content) serves both
    assert squares.summary == "2 images in 1 bucket (64×64: 2); 0 encoded, 2 from the cache", squares.summary
    assert json.loads(squares.meta["ss_bucket_info"])["buckets"] == {"0": {"resolution": [64, 64], "count": 2}}
    assert not same(both, squares), "the tall bucket changed nothing: it was not trained"


# ---- 2. masked loss ------------------------------------------------------------------------------
def test_alpha_and_mask_folder_masks_weigh_the_loss(comfy):
    files = two_shapes(200)
    folder = write_folder(comfy, "it_ds_alpha", files, alpha=True)
    masks = comfy.input_dir / "it_ds_alpha_masks"
    masks.mkdir(exist_ok=True)
    for stem, (pixels, _) in files.items():  # the alpha channel again, as greyscale files of the same names
        Image.fromarray(half_mask(pixels.shape[1], pixels.shape[0]), "L").save(masks / f"{stem}.png")

    def run(masks: str, options: dict | None = None, **encode) -> Run:
        return train(comfy, encode_graph(comfy, folder.name, "loras/it_ds_mask", options, masks=masks, **encode))

    unmasked = run("none")
    assert samples_line(unmasked.log) is None
    alpha = run("alpha channel", {"unmasked_weight": 0.0})
    assert alpha.summary == TWO_BUCKETS + "; 0 encoded, 4 from the cache", alpha.summary  # masks change no latent
    assert samples_line(alpha.log) == ("Train LoRA: 4 samples drawn from (repeats counted), 4 images, 0 more "
                                       "alternatives (flipped copies, caption variants), 4 with a loss mask")
    assert not same(alpha, unmasked), "the alpha-channel masks changed nothing"
    ignored = run("alpha channel", {"unmasked_weight": 1.0})
    assert samples_line(ignored.log).endswith("4 with a loss mask")
    assert same(ignored, unmasked), "unmasked_weight 1 must ignore the masks"
    from_files = run("mask folder", {"unmasked_weight": 0.0}, mask_folder=masks.name)
    assert samples_line(from_files.log).endswith("4 with a loss mask")
    assert same(from_files, alpha), "the same masks from a mask folder trained another LoRA than from the alpha channel"

    # any MASK through core's Set Latent Noise Mask: one 64×64 mask for both buckets, brought to each latent's size
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = half_mask(64, 64)
    Image.fromarray(red, "RGB").save(comfy.input_dir / "it_ds_half_mask.png")
    g = encode_graph(comfy, folder.name, "loras/it_ds_mask", {"unmasked_weight": 0.0}, masks="none")
    g["m1"] = {"class_type": "LoadImageMask", "inputs": {"image": "it_ds_half_mask.png", "channel": "red"}}
    g["m2"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": [ENCODE_NODE, 0], "mask": ["m1", 0]}}
    g[it.TRAIN_NODE]["inputs"]["latents"] = ["m2", 0]
    core_mask = train(comfy, g)
    assert samples_line(core_mask.log).endswith("4 with a loss mask")
    assert same(core_mask, alpha), "Set Latent Noise Mask's mask trained another LoRA than the same mask as alpha"


# ---- 3. the disk cache ---------------------------------------------------------------------------
def test_the_latent_cache_is_reused_and_a_changed_image_is_encoded_again(comfy):
    folder = write_folder(comfy, "it_ds_cache", two_shapes(300))
    images = sorted(folder.glob("*.png"))
    assert not any(cache_files(comfy, image) for image in images)

    first = train(comfy, encode_graph(comfy, folder.name, "loras/it_ds_cache", chunk=4))
    assert first.summary == TWO_BUCKETS + "; 4 encoded, 0 from the cache", first.summary
    written = {image.name: cache_files(comfy, image) for image in images}
    assert all(len(found) == 1 for found in written.values()), written
    assert {f.name.split("_", 1)[1] for found in written.values() for f in found} == \
        {"64x64.safetensors", "64x96.safetensors"}
    assert len({f.parent for found in written.values() for f in found}) == 1  # one VAE, one folder

    # another chunk, so ComfyUI runs the node again instead of reusing its output
    second = train(comfy, encode_graph(comfy, folder.name, "loras/it_ds_cache", chunk=2))
    assert second.summary == TWO_BUCKETS + "; 0 encoded, 4 from the cache", second.summary
    assert same(first, second), "the cached latents trained another LoRA"

    changed = folder / "tall_b.png"
    Image.fromarray(picture(399, 64, 96)).save(changed)  # new content under the old name
    third = train(comfy, encode_graph(comfy, folder.name, "loras/it_ds_cache", chunk=3))
    assert third.summary == TWO_BUCKETS + "; 1 encoded, 3 from the cache", third.summary
    assert len(cache_files(comfy, changed)) == 1
    assert not same(third, first), "the changed image changed nothing"

    before = sorted(comfy.output_dir.joinpath(*CACHE_ROOT).rglob("*"))
    Image.fromarray(picture(398, 64, 96)).save(changed)  # new content again: a cache would write a file for it
    off = train(comfy, encode_graph(comfy, folder.name, "loras/it_ds_cache", train={"steps": 1}, cache=False))
    assert off.summary == TWO_BUCKETS, off.summary  # no cache counts without the cache
    assert sorted(comfy.output_dir.joinpath(*CACHE_ROOT).rglob("*")) == before, "cache off wrote to the cache"


# ---- 4. core's dataset chain ---------------------------------------------------------------------
def _load_saved_dataset_graph(comfy, name: str, prefix: str) -> dict:
    g = it.train_graph(comfy, prefix=prefix, **TRAIN)
    for node in ("2", "3", "4"):
        del g[node]
    g["d4"] = {"class_type": "LoadTrainingDataset", "inputs": {"folder_name": name}}
    g[it.TRAIN_NODE]["inputs"].update(latents=["d4", 0], positive=["d4", 1])
    return g


def test_core_dataset_chain_pairs_each_image_with_its_own_caption(comfy):
    pairs = {"red": (picture(400, 64, 64), "lrtstyle, a red thing"),
             "green": (picture(401, 64, 64), "lrtstyle, a green thing, far away"),
             "blue": (picture(402, 64, 64), "a blue thing in lrtstyle, close up")}
    folder = write_folder(comfy, "it_ds_core", pairs)
    order = [name[:-4] for name in os.listdir(folder) if name.endswith(".png")]  # core's order: os.listdir
    assert sorted(order) == sorted(pairs)
    # the same pairs for Encode Training Folder (sorted names), named so that its order is core's
    write_folder(comfy, "it_ds_core_sorted", {f"p{i}_{stem}": pairs[stem] for i, stem in enumerate(order)})

    core = train(comfy, core_graph(comfy, "it_ds_core", "loras/it_ds_core"))
    assert train_line(core.log) == "Train LoRA: 3 images, one caption per image", train_line(core.log)
    ours = train(comfy, encode_graph(comfy, "it_ds_core_sorted", "loras/it_ds_core_ours", latent_dtype="fp32",
                                     cache=False, chunk=1))  # one image per VAE call, as MakeTrainingDataset
    assert ours.summary == "3 images in 1 bucket (64×64: 3)", ours.summary
    assert same(core, ours), "core's chain and Encode Training Folder trained other LoRAs from the same pairs"

    # swap the captions of the 2nd and 3rd image in core's order; the renamed folder lists in the same order
    swapped = folder.rename(comfy.input_dir / "it_ds_core_swapped")
    assert [name[:-4] for name in os.listdir(swapped) if name.endswith(".png")] == order
    (swapped / f"{order[1]}.txt").write_text(pairs[order[2]][1], encoding="utf-8")
    (swapped / f"{order[2]}.txt").write_text(pairs[order[1]][1], encoding="utf-8")
    crossed = train(comfy, core_graph(comfy, swapped.name, "loras/it_ds_core_swapped", save_dataset="it_ds_saved"))
    assert not same(crossed, core), "swapping two images' captions changed nothing"
    assert (comfy.base_dir / "datasets" / "it_ds_saved" / "metadata.json").is_file()

    loaded = train(comfy, _load_saved_dataset_graph(comfy, "it_ds_saved", "loras/it_ds_core_loaded"))
    assert train_line(loaded.log).startswith("Train LoRA: 3 images, one caption per image"), train_line(loaded.log)
    assert same(loaded, crossed), "SaveTrainingDataset → LoadTrainingDataset trained another LoRA"


# ---- 5. flip and caption variants ----------------------------------------------------------------
def test_flip_and_caption_variants_train_and_change_the_lora(comfy):
    folder = write_folder(comfy, "it_ds_augment", two_shapes(500))

    def run(**encode) -> Run:
        return train(comfy, encode_graph(comfy, folder.name, "loras/it_ds_augment", **encode))

    plain = run()
    flipped = run(flip=True)
    assert flipped.summary.startswith(TWO_BUCKETS + "; "), flipped.summary
    assert samples_line(flipped.log) == ("Train LoRA: 4 samples drawn from (repeats counted), 4 images, 4 more "
                                         "alternatives (flipped copies, caption variants), 0 with a loss mask")
    assert not same(flipped, plain), "flip changed nothing"
    assert flipped.meta["ss_num_train_images"] == "4"  # the alternatives are not counted as images
    both = run(flip=True, caption_variants=2, shuffle_tags=True, seed=3)
    assert samples_line(both.log) == ("Train LoRA: 4 samples drawn from (repeats counted), 4 images, 12 more "
                                      "alternatives (flipped copies, caption variants), 0 with a loss mask")
    assert not same(both, flipped) and not same(both, plain), "caption variants changed nothing"
    assert both.meta["ss_num_train_images"] == "4" and both.meta["ss_bucket_info"] == plain.meta["ss_bucket_info"]


# ---- 6. bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_folder, said", [
    ("", "mask_folder: empty, but masks is 'mask folder'; give the input subfolder that holds the masks"),
    ("it_ds_no_such_masks", "it_ds_no_such_masks is not a folder; give the input subfolder that holds the masks"),
    ("../it_ds_outside", "mask_folder: '../it_ds_outside' is outside the input folder"),
], ids=["empty", "missing", "outside"])
def test_a_mask_folder_that_is_not_there_is_an_error_naming_mask_folder(comfy, mask_folder, said):
    folder = write_folder(comfy, "it_ds_bad_masks", two_shapes(600))
    (comfy.input_dir.parent / "it_ds_outside").mkdir(exist_ok=True)  # there, but not under the input folder
    mark = len(comfy.log())
    _, error = it.run_failing(comfy, encode_graph(comfy, folder.name, "loras/it_ds_bad", masks="mask folder",
                                                  mask_folder=mask_folder))
    assert error.startswith("LoRATrainer_EncodeTrainingFolder: ValueError: mask_folder: ") and said in error, error
    assert "Train LoRA:" not in comfy.log(mark) and "images encoded" not in comfy.log(mark)  # refused before any work
