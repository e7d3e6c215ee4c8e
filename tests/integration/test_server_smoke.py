"""Smoke tests against a real ComfyUI: the server starts, core works with the tiny checkpoint,
and this pack's nodes are registered under their own ids (not shadowed by core's)."""
from __future__ import annotations

import importlib
import re

import pytest

PACK_NODE_IDS = (
    "LoRATrainer_TrainLoRA",
    "LoRATrainer_SaveLoRA",
    "LoRATrainer_LoadLoRAModel",
    "LoRATrainer_PlotLossGraph",
    "LoRATrainer_LoadImageSet",
    "LoRATrainer_LoadImageSetFromFolder",
    "LoRATrainer_LoadCaptionedImageSet",
    "LoRATrainer_EncodeTrainingFolder",
    "LoRATrainer_EncodeTrainingClips",
)


def _pack_import_errors(log: str) -> str:
    """The lines of the server log about this pack failing to import, for failure messages."""
    start = log.find("Cannot import")
    lines = [l for l in log.splitlines() if "comfyui-lora-trainer" in l or "IMPORT FAILED" in l]
    return (log[start:start + 4000] if start >= 0 else "") + "\n".join(lines[-20:])


def test_server_lists_core_nodes(comfy):
    info = comfy.object_info()
    assert "CheckpointLoaderSimple" in info
    assert comfy.checkpoint in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]


def test_pack_nodes_are_registered(comfy):
    pack = importlib.import_module("comfyui_lora_trainer")  # loaded by the repository's conftest
    mappings = getattr(pack, "NODE_CLASS_MAPPINGS", None) or {}
    if not mappings:
        pytest.skip("the pack exposes no nodes in NODE_CLASS_MAPPINGS yet")
    info = comfy.object_info()
    expected = sorted(set(PACK_NODE_IDS) | set(mappings))
    missing = [n for n in expected if n not in info]
    assert not missing, f"not in /object_info: {missing}\n{_pack_import_errors(comfy.log())}"
    # python_module tells a custom node from a core node with the same id.
    modules = {n: info[n]["python_module"] for n in expected}
    assert all(m.startswith("custom_nodes.") for m in modules.values()), modules
    display = getattr(pack, "NODE_DISPLAY_NAME_MAPPINGS", {})
    for node_id, name in display.items():
        assert info[node_id]["display_name"] == name


def _core_txt2img(ckpt: str, prefix: str) -> dict:
    """API-format graph: checkpoint -> prompts -> 64x64 empty latent -> 2-step KSampler -> save."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def test_core_txt2img_writes_an_image(comfy):
    entry = comfy.run(_core_txt2img(comfy.checkpoint, "it_smoke/core"), timeout=300)
    images = entry["outputs"]["7"]["images"]
    assert len(images) == 1 and images[0]["type"] == "output"
    path = comfy.output_dir / images[0]["subfolder"] / images[0]["filename"]
    assert path.is_file() and path.stat().st_size > 0
    assert re.fullmatch(r"core_\d{5}_\.png", path.name)


def test_bad_prompt_is_refused_with_node_errors(comfy):
    graph = _core_txt2img("no_such_checkpoint.safetensors", "it_smoke/bad")
    with pytest.raises(comfy.PromptError) as refused:
        comfy.queue(graph)
    assert refused.value.status == 400
    assert "1" in refused.value.body["node_errors"]
