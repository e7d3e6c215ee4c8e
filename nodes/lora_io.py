"""Save LoRA and Load LoRA Model (docs/nodes.md#save-lora-loratrainer_savelora, docs/files.md#file-names)."""
from __future__ import annotations

from ..lora import FORMATS
from .common import CATEGORY, OUTPUT_LORA_FOLDER


class SaveLoRA:
    DESCRIPTION = ("Writes the LoRA as a .safetensors file into ComfyUI's output folder; with steps, the name "
                   "carries them (<prefix>_<steps>_steps_<counter>_.safetensors) so Train LoRA can continue it.")
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("filename",)
    OUTPUT_TOOLTIPS = ("The written file, relative to the output folder (a LoRA of both Wan 2.2 experts: both "
                       "files, one a line).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "lora": ("LORA_MODEL", {"tooltip": "The LoRA to save."}),
                "prefix": ("STRING", {"default": f"{OUTPUT_LORA_FOLDER}/ComfyUI_trained_lora", "tooltip": "File name prefix, relative to the output folder (may not leave it); ending in / saves into that folder."}),
            },
            "optional": {
                "steps": ("INT", {"forceInput": True, "tooltip": "Total steps trained; written into the name so training can continue later."}),
                "format": (list(FORMATS), {"default": FORMATS[0], "tooltip": "portable: only what every loader reads (ComfyUI, A1111/Forge, diffusers); weight/bias differences (diff/diff_b), which only ComfyUI reads, are left out with a warning. full: everything, for ComfyUI."}),
            },
        }

    def execute(self, lora: dict, prefix: str, steps: int | None = None, format: str = FORMATS[0]) -> dict:  # noqa: A002 (the input's name)
        from .comfy_io import save_lora

        names = save_lora(lora, prefix, steps, format)
        return {"ui": {"text": names}, "result": ("\n".join(names),)}


class LoadLoRAModel:
    DESCRIPTION = ("Applies a LORA_MODEL to a model, and its text-encoder part (LoRA Text Encoder) to a CLIP, each "
                   "at a strength (negative allowed; 0 passes it through).")
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied.",
                       "The CLIP with the LoRA's text-encoder part applied (the clip input as it is when the LoRA has "
                       "none; nothing when no clip is connected).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to apply the LoRA to."}),
                "lora": ("LORA_MODEL", {"tooltip": "The LoRA weights, e.g. from Train LoRA."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip": "How strongly to apply it; negative inverts it."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The text encoder, for a LoRA that trained it too (LoRA Text Encoder)."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip": "How strongly to apply the text-encoder part."}),
            },
        }

    def execute(self, model, lora: dict, strength_model: float, clip=None, strength_clip: float = 1.0) -> tuple:
        from .comfy_io import apply_lora

        return apply_lora(model, lora, strength_model, clip, strength_clip)
