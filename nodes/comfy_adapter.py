"""ComfyUI glue for LoRA Training Adapter (nodes/adapter.py): the adapter on Train LoRA's copy of the model.

The adapter goes on with ComfyUI's own LoRA loading (`comfy.lora.load_lora` with the model's key map,
then `add_patches`), as core's LoraLoaderModelOnly applies a file: ComfyUI merges it into the weights
when it loads that copy for training. The model Train LoRA was given keeps no patch of it, so
`model_with_lora`, the saved file and the base model itself never see it. A preview samples that
deployed model (the given model's clone: ComfyUI swaps the adapter's weights out for it), and the
training copy is loaded back after each preview, so the steps after it train with the adapter again.
"""
from __future__ import annotations

import logging

import comfy.lora
import comfy.model_management
import comfy.utils
import folder_paths

from .options import TrainingAdapter

log = logging.getLogger(__name__)


def with_training_adapter(model, adapter: TrainingAdapter):
    """A clone of `model` (a ModelPatcher) with the adapter's patches at its strength; errors name
    training_adapter when the file is missing or none of its keys fit the model."""
    path = folder_paths.get_full_path("loras", adapter.name)
    if path is None:
        raise FileNotFoundError(f"training_adapter: {adapter.name!r} is not in the loras folder; pick a file from "
                                "LoRA Training Adapter's list")
    weights = comfy.utils.load_torch_file(path, safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(weights, key_map, log_missing=False)
    if not patches:
        raise ValueError(f"training_adapter: none of {adapter.name!r}'s {len(weights)} tensors fit this "
                         f"{type(model.model.model_config).__name__} model; pick the adapter made for this base")
    adapted = model.clone()
    applied = adapted.add_patches(patches, adapter.strength)
    log.info("Train LoRA: training adapter %r at strength %s on %d layers while training; the saved LoRA, "
             "model_with_lora and the previews leave it out", adapter.name, adapter.strength, len(applied))
    return adapted


def reload(patcher) -> None:
    """Load `patcher` (Train LoRA's training copy) again after a preview loaded the deployed model."""
    comfy.model_management.load_models_gpu([patcher])
