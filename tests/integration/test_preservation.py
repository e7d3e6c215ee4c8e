"""Training that keeps the base's knowledge, in a real ComfyUI: the EMA through LoRA Training Options,
differential output and blank-prompt preservation and a regularisation set through LoRA Preservation
(chained after the options node), each training to a file that says what it holds; a preservation
node missing its CLIP is a node error naming `clip`. The graphs and fixtures are test_nodes.py's.
Skips unless COMFYUI_DIR is set."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open

_spec = importlib.util.spec_from_file_location("lora_trainer_it_nodes", Path(__file__).with_name("test_nodes.py"))
nodes_it = sys.modules.get(_spec.name) or importlib.util.module_from_spec(_spec)
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = nodes_it
    _spec.loader.exec_module(nodes_it)

dataset = nodes_it.dataset  # the fixture of test_nodes.py: 3 demo images with captions ending "lrtstyle"
PRESERVATION_ID = "LoRATrainer_Preservation"
STEPS = 8


def captioned_graph(comfy, prefix: str) -> dict:
    """train_graph with the images and their captions from Load Captioned Image Set ("c"): Train LoRA's
    latents and positive, and the captions as text for LoRA Preservation."""
    g = nodes_it.train_graph(comfy, steps=STEPS, prefix=prefix)
    g["c"] = {"class_type": "LoRATrainer_LoadCaptionedImageSet", "inputs": {
        "folder": dataset_name(), "clip": ["1", 1], "resize_method": "Stretch", "width": nodes_it.SIZE,
        "height": nodes_it.SIZE}}
    g["3"]["inputs"]["pixels"] = ["c", 0]
    g[nodes_it.TRAIN_NODE]["inputs"]["positive"] = ["c", 1]
    g["u"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}}
    g["9"] = {"class_type": "LoRATrainer_TrainingOptions", "inputs": {"unconditional": ["u", 0]}}
    g[nodes_it.TRAIN_NODE]["inputs"]["options"] = ["9", 0]
    return g


def dataset_name() -> str:
    return nodes_it.DATASET


def with_preservation(g: dict, **inputs) -> dict:
    g["p"] = {"class_type": PRESERVATION_ID, "inputs": {"options": ["9", 0], **inputs}}
    g[nodes_it.TRAIN_NODE]["inputs"]["options"] = ["p", 0]
    return g


def trained_file(comfy, entry: dict) -> tuple[dict, dict, list[float]]:
    """(the saved LoRA's metadata, its settings, the losses)."""
    losses = entry["outputs"][nodes_it.PLOT_NODE]["loss"]
    saved = entry["outputs"][nodes_it.SAVE_NODE]["text"][0]
    with safe_open(str(comfy.output_dir / saved), "pt") as f:
        metadata = f.metadata()
    return metadata, json.loads(metadata["lora_trainer.settings"]), losses


def test_object_info_lists_the_preservation_node(comfy):
    node = comfy.object_info()[PRESERVATION_ID]
    assert node["display_name"] == "LoRA Preservation (LoRA Trainer)" and node["output"] == ["LORA_TRAINING_OPTIONS"]
    optional = node["input"]["optional"]
    assert [optional[k][0] for k in ("options", "clip", "captions", "regularization_latents",
                                      "regularization_positive")] == ["LORA_TRAINING_OPTIONS", "CLIP", "STRING",
                                                                      "LATENT", "CONDITIONING"]


def test_ema_trains_through_the_options_node(comfy, dataset):
    g = captioned_graph(comfy, "loras/it_ema")
    g["9"]["inputs"].update(ema_decay=0.9, ema_every=2, ema_on_cpu=True)
    metadata, settings_used, losses = trained_file(comfy, comfy.run(g, timeout=600))
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert metadata["lora_trainer.weights"] == "ema" and settings_used["ema_decay"] == 0.9


def test_differential_output_and_blank_prompt_preservation_train(comfy, dataset):
    g = with_preservation(captioned_graph(comfy, "loras/it_dop"), clip=["1", 1], captions=["c", 2],
                          trigger_word="lrtstyle", class_word="", dop_multiplier=1.0, blank_prompt_multiplier=0.5)
    entry = comfy.run(g, timeout=600)
    metadata, settings_used, losses = trained_file(comfy, entry)
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert settings_used["dop_multiplier"] == 1.0 and settings_used["blank_prompt_multiplier"] == 0.5
    assert "LoRA Preservation: 3 preservation captions, e.g. 'a red circle on a blue background'" in comfy.log()


def test_a_regularisation_set_trains_with_its_weight(comfy, dataset):
    g = with_preservation(captioned_graph(comfy, "loras/it_prior"), prior_ratio=0.5, prior_loss_weight=0.7,
                          regularization_latents=["3", 0], regularization_positive=["rc", 0])
    g["rc"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a picture", "clip": ["1", 1]}}
    metadata, _, losses = trained_file(comfy, comfy.run(g, timeout=600))
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert metadata["ss_num_reg_images"] == "3" and metadata["ss_prior_loss_weight"] == "0.7"


def test_preservation_without_its_clip_is_refused_naming_it(comfy, dataset):
    g = with_preservation(captioned_graph(comfy, "loras/it_dop_bad"), captions=["c", 2], trigger_word="lrtstyle",
                          dop_multiplier=1.0)
    _, error = nodes_it.run_failing(comfy, g)
    assert "clip: no text encoder connected, but dop_multiplier is above 0" in error, error
