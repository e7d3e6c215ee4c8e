"""LoRA Validation Set: held-out images whose loss Train LoRA measures every N steps (issue 14).

The node gathers the latents and their captions into a `ValidationSettings` value for Train LoRA's
optional `validation` input; training/validation.py computes the loss (fixed noises and noise
levels, no_grad), and Train LoRA puts it into the LOSS_MAP under "validation_loss".
"""
from __future__ import annotations

from typing import NamedTuple

from ..training.data import check_caption_count
from .common import CATEGORY

VALIDATION_TYPE = "LORA_VALIDATION"


class ValidationSettings(NamedTuple):
    latents: list  # LATENT dicts ({"samples": (N, C, H, W)}), one or several sizes
    positive: list  # CONDITIONINGs: one for every image, or one per image
    every: int
    noise_levels: int


class ValidationSet:
    DESCRIPTION = ("Held-out images (not trained on) with their captions: Train LoRA measures the loss on them every "
                   "N steps at fixed noises and noise levels, a second line on Plot Loss Graph. Rising while the "
                   "training loss falls means overfitting.")
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    INPUT_IS_LIST = True
    RETURN_TYPES = (VALIDATION_TYPE,)
    RETURN_NAMES = ("validation",)
    OUTPUT_TOOLTIPS = ("The validation set, for Train LoRA's validation input.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "latents": ("LATENT", {"tooltip": "The held-out images, VAE-encoded (one batch, or several "
                                                  "LATENTs of different sizes)."}),
                "positive": ("CONDITIONING", {"tooltip": "Their caption(s): one for all images, or one per image."}),
                "every": ("INT", {"default": 50, "min": 1, "max": 100000,
                                  "tooltip": "Measure the validation loss every this many steps (and before the "
                                             "first and after the last)."}),
                "noise_levels": ("INT", {"default": 5, "min": 1, "max": 64,
                                         "tooltip": "Noise levels per image, spread evenly over the schedule; more "
                                                    "is steadier and slower."}),
            },
        }

    def execute(self, latents, positive, every, noise_levels) -> tuple[ValidationSettings]:
        # refused here, before training starts, so the error names this node rather than Train LoRA
        check_caption_count(len(positive), sum(latent["samples"].shape[0] for latent in latents))
        return (ValidationSettings(list(latents), list(positive), every[0], noise_levels[0]),)
