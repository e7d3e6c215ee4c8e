"""Train LoRA's validation loss in a real ComfyUI (CPU, the tiny SD1.5 checkpoint; docs/long-runs.md#validation-loss).

The training example (example_workflows/api/train_lora.json, its preview branch dropped) at 64 px:
its LoRA Validation Set node gets a held-out image (dots.png, not among the training images)
through VAE Encode and a caption of its own. Checked: the LOSS_MAP, as Plot Loss Graph returns it
in its UI dict, has the validation loss at steps 0, every 3 and the last, finite, next to the one
"loss" per step; the graph PNG has the validation line (its colour) where one without validation
has none; the LoRA and losses are bit-identical with validation on and off; with the training
images themselves as the validation set, the validation loss falls; a caption count that fits
neither 1 nor the validation images fails in the LoRA Validation Set node, naming the counts.
Skips unless COMFYUI_DIR is set (see conftest.py).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DEMO_IMAGES = ROOT / "assets" / "demo_images"

SIZE = 64
DATASET, HELD_OUT = "it_validation_dataset", "it_validation_held_out"
TRAIN = {"steps": 7, "learning_rate": 5e-3, "training_dtype": "fp32", "lora_dtype": "fp32", "seed": 1}
EVERY = 3
TRAIN_NODE, SAVE_NODE, PLOT_NODE, VALIDATION_NODE, VALIDATION_IMAGES = "5", "6", "7", "12", "10"
CAPTION_NODE = "20"  # the held-out image's own caption
ORANGE = (255, 127, 14)  # matplotlib's tab:orange, the validation line (training/plot.py)


# ---- graphs ------------------------------------------------------------------------------
def training_graph(comfy, name: str, validation: dict | None, **train_inputs) -> dict:
    """The example at 64 px without previews; `validation` overrides the validation set's inputs
    (None: no validation connected)."""
    g = json.loads((ROOT / "example_workflows" / "api" / "train_lora.json").read_text())
    del g[TRAIN_NODE]["inputs"]["preview"]
    for node in ("13", "14", "15", "16"):  # the preview's prompts, node and grid
        g.pop(node, None)
    g["1"]["inputs"]["ckpt_name"] = comfy.checkpoint
    g["2"]["inputs"].update(folder=DATASET, width=SIZE, height=SIZE)
    g[TRAIN_NODE]["inputs"].update({**TRAIN, **train_inputs})
    g[SAVE_NODE]["inputs"]["prefix"] = f"loras/it_validation_{name}"
    g[PLOT_NODE]["inputs"]["filename_prefix"] = f"it_validation/{name}_loss"
    if validation is None:
        del g[TRAIN_NODE]["inputs"]["validation"]
        for node in ("10", "11", "12"):
            g.pop(node)
        return g
    g[VALIDATION_IMAGES]["inputs"].update(folder=HELD_OUT, width=SIZE, height=SIZE)
    g[CAPTION_NODE] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "dots in lrtstyle"}}
    g[VALIDATION_NODE]["inputs"].update({"positive": [CAPTION_NODE, 0], "every": EVERY, "noise_levels": 3,
                                         **validation})
    return g


def read_png(comfy, image: dict) -> np.ndarray:
    with Image.open(comfy.output_dir / image["subfolder"] / image["filename"]) as img:
        return np.asarray(img.convert("RGB")).copy()


def lora_tensors(comfy, entry: dict) -> dict:
    from safetensors.torch import load_file
    return load_file(comfy.output_dir / entry["outputs"][SAVE_NODE]["text"][0])


def orange_pixels(comfy, entry: dict) -> int:
    (graph,) = entry["outputs"][PLOT_NODE]["images"]
    return int(np.count_nonzero(np.all(read_png(comfy, graph) == ORANGE, -1)))


# ---- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def datasets(comfy) -> None:
    for folder, names in ((DATASET, ("circle", "stripes", "sunset")), (HELD_OUT, ("dots",))):
        path = comfy.input_dir / folder
        path.mkdir(parents=True, exist_ok=True)
        for name in names:
            for suffix in (".png", ".txt"):
                shutil.copy(DEMO_IMAGES / f"{name}{suffix}", path / f"{name}{suffix}")


@pytest.fixture(scope="module")
def with_validation(comfy, datasets) -> dict:
    return comfy.run(training_graph(comfy, "held_out", {}), timeout=600)


@pytest.fixture(scope="module")
def without_validation(comfy, datasets) -> dict:
    return comfy.run(training_graph(comfy, "none", None), timeout=600)


# ---- tests -------------------------------------------------------------------------------
def test_the_loss_map_has_the_validation_loss_at_its_steps(comfy, with_validation):
    ui = with_validation["outputs"][PLOT_NODE]
    assert len(ui["loss"]) == TRAIN["steps"]
    assert ui["validation_step"] == [0, 3, 6, 7]  # before training, every 3, and after the last step
    values = ui["validation_loss"]
    assert len(values) == 4 and all(math.isfinite(v) and v > 0 for v in values), values
    assert len(set(values)) == 4, values  # measured on the changing LoRA, not a constant


def test_plot_loss_graph_draws_the_validation_line(comfy, with_validation, without_validation):
    assert "validation_loss" not in without_validation["outputs"][PLOT_NODE]
    assert orange_pixels(comfy, without_validation) == 0
    assert orange_pixels(comfy, with_validation) > 100


def test_validation_leaves_the_lora_bit_identical(comfy, with_validation, without_validation):
    assert with_validation["outputs"][PLOT_NODE]["loss"] == without_validation["outputs"][PLOT_NODE]["loss"]
    watched, plain = lora_tensors(comfy, with_validation), lora_tensors(comfy, without_validation)
    assert watched.keys() == plain.keys() and watched
    different = [k for k in plain if not np.array_equal(plain[k].numpy(), watched[k].numpy())]
    assert not different, different[:5]


def test_on_the_training_images_it_falls(comfy, datasets):
    """The training images and caption as the validation set: the loss at fixed noises falls."""
    graph = training_graph(comfy, "training_set", {"positive": ["4", 0], "every": 10}, steps=20)
    graph[VALIDATION_IMAGES]["inputs"]["folder"] = DATASET
    values = comfy.run(graph, timeout=600)["outputs"][PLOT_NODE]["validation_loss"]
    assert len(values) == 3 and values[-1] < values[0], values


def test_a_caption_count_that_fits_neither_is_refused(comfy, datasets):
    """3 captions (one per training image, from their .txt files) for the 1 held-out image."""
    graph = training_graph(comfy, "bad_captions", {"positive": ["21", 1]})
    graph["21"] = {"class_type": "LoRATrainer_LoadCaptionedImageSet",
                   "inputs": {"folder": DATASET, "clip": ["1", 1], "resize_method": "Crop", "width": SIZE,
                              "height": SIZE}}
    entry = comfy.wait(comfy.queue(graph), 300)
    assert entry["status"]["status_str"] == "error", entry["status"]
    error = comfy.execution_error(entry)
    assert error.startswith("LoRATrainer_ValidationSet: ValueError: positive: got 3 captions for 1 images"), error
