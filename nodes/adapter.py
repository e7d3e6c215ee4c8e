"""LoRA Training Adapter: a LoRA applied to the model while it trains, and left out of what Train LoRA gives.

A step-distilled base (Flux.1 schnell, Z-Image Turbo) samples well in a few steps because it was trained
away from the plain denoising objective; training a LoRA on it with that objective undoes the distillation
along with whatever the LoRA learns. A de-distillation ("training") adapter — a LoRA made for that base,
as ai-toolkit ships them — puts the objective back while training. The LoRA then learns only the new
content on top, and is used without the adapter, on the distilled base, as it is deployed.

A chained options node like LoRA Preservation. Train LoRA applies the file with ComfyUI's own LoRA
loader to its training copy of the model (nodes/comfy_adapter.py), so every key core's loaders read
works. The saved LoRA holds only the trained adapters, model_with_lora is the base with the LoRA alone,
and previews sample that deployed model.
"""
from __future__ import annotations

from .common import NONE_LORA, lora_choices
from .options import ChainedOptions, TrainingAdapter, TrainingOptions, merged


class LoRATrainingAdapter(ChainedOptions):
    DESCRIPTION = ("A LoRA applied to the model only while Train LoRA trains: a de-distillation adapter for a "
                   "step-distilled base (Flux.1 schnell, Z-Image Turbo). The saved LoRA and model_with_lora leave it "
                   "out, and previews sample without it, as the LoRA will be used. Chain it into Train LoRA's options.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "lora_name": (lora_choices(), {"default": NONE_LORA, "tooltip": "The adapter: a LoRA file in the loras "
                                               "folder, made for this base model. [None]: no adapter."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "round": False,
                                       "tooltip": "The adapter's strength while training (1 as its maker "
                                       "trained it)."}),
            },
            "optional": {**cls.CHAIN},
        }

    def execute(self, lora_name: str, strength: float, options: TrainingOptions | None = None) -> tuple:
        if lora_name in (None, "", NONE_LORA):
            return (merged(options, {}, None),)
        if strength == 0:
            raise ValueError(f"strength: got 0, which applies nothing of {lora_name!r}; give the adapter's strength "
                             "(1 as its maker trained it), or set lora_name to [None]")
        return (merged(options, {}, None, training_adapter=TrainingAdapter(lora_name, float(strength))),)
