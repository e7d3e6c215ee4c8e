"""LoRA Training Preview: what Train LoRA samples every N steps while it trains (docs/long-runs.md#sample-previews).

The node only gathers the settings into a `PreviewSettings` value for Train LoRA's optional
`preview` input; the sampling itself (ComfyUI's own sampler machinery, so every family works) is
nodes/comfy_preview.py, run by Train LoRA between optimizer steps.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from .common import CATEGORY

PREVIEW_TYPE = "LORA_PREVIEW"
_FALLBACK_SAMPLERS = ["euler"]  # outside ComfyUI (schema tests) only
_FALLBACK_SCHEDULERS = ["normal", "simple"]


def _sampler_choices() -> tuple[list[str], list[str]]:
    try:
        import comfy.samplers
    except ImportError:
        return _FALLBACK_SAMPLERS, _FALLBACK_SCHEDULERS
    return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)


class PreviewSettings(NamedTuple):
    positive: list  # CONDITIONING
    negative: list | None  # CONDITIONING, or None: sampled at cfg 1
    vae: Any  # ComfyUI VAE, or None: ComfyUI's latent previewer draws the previews
    every: int
    seed: int
    steps: int
    cfg: float
    width: int
    height: int
    sampler_name: str
    scheduler: str
    filename_prefix: str


class TrainingPreview:
    DESCRIPTION = ("Samples a prompt with the LoRA as it trains, every N steps (and before the first and after the "
                   "last): shown on Train LoRA while it runs, saved in the output folder, and returned by Train "
                   "LoRA's previews output as a grid. Does not change what is trained.")
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = (PREVIEW_TYPE,)
    RETURN_NAMES = ("preview",)
    OUTPUT_TOOLTIPS = ("The preview settings, for Train LoRA's preview input.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        samplers, schedulers = _sampler_choices()
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "The prompt to preview (a text encode)."}),
                "every": ("INT", {"default": 100, "min": 1, "max": 100000,
                                  "tooltip": "Sample a preview every this many steps."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**64 - 1,
                                 "tooltip": "The preview's noise seed: the same for every preview, so they compare."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Sampling steps per preview."}),
                "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance; without a negative the preview samples at 1."}),
                "width": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 8, "tooltip": "Preview width in pixels."}),
                "height": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 8, "tooltip": "Preview height in pixels."}),
                "sampler_name": (samplers, {"default": "euler" if "euler" in samplers else samplers[0],
                                            "tooltip": "ComfyUI's sampler."}),
                "scheduler": (schedulers, {"default": "normal" if "normal" in schedulers else schedulers[0],
                                           "tooltip": "ComfyUI's scheduler."}),
                "filename_prefix": ("STRING", {"default": "lora_previews/preview",
                                               "tooltip": "Where previews are saved, relative to the output folder "
                                                          "(<prefix>_<step>_steps_<counter>_.png)."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt (needed for cfg above 1)."}),
                "vae": ("VAE", {"tooltip": "Decodes the previews. Without one, ComfyUI's latent previewer draws "
                                           "them (rough colours)."}),
            },
        }

    def execute(self, positive, every, seed, steps, cfg, width, height, sampler_name, scheduler, filename_prefix,
                negative=None, vae=None) -> tuple[PreviewSettings]:
        if not filename_prefix.strip():
            raise ValueError("filename_prefix: is empty; give a name relative to the output folder, like "
                             "'lora_previews/my_run'")
        return (PreviewSettings(positive, negative, vae, every, seed, steps, cfg, width, height, sampler_name,
                                scheduler, filename_prefix),)
