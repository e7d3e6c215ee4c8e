"""LoRA Validation Set: held-out images whose loss Train LoRA measures every N steps (docs/long-runs.md#validation-loss).

The node gathers the latents and their captions into a `ValidationSettings` value for Train LoRA's
optional `validation` input; training/validation.py computes the loss (fixed noises and noise
levels, no_grad), and Train LoRA puts it into the LOSS_MAP under "validation_loss".
"""
from __future__ import annotations

from typing import NamedTuple

from ..training.data import check_caption_count
from .common import CATEGORY
from .conditioning import captions_of, source_class

VALIDATION_TYPE = "LORA_VALIDATION"


class ValidationSettings(NamedTuple):
    latents: list  # LATENT dicts ({"samples": (N, C, H, W)}), one or several sizes
    positive: list  # CONDITIONINGs: one for every image, or one per image
    every: int
    noise_levels: int
    source: str | None = None  # the class of the node feeding positive (nodes/conditioning.py)


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
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},  # which node feeds positive
        }

    def execute(self, latents, positive, every, noise_levels, prompt=None, unique_id=None) -> tuple[ValidationSettings]:
        source = source_class(prompt[0] if prompt else None, unique_id[0] if unique_id else None, "positive")
        # refused here, before training starts, so the error names this node rather than Train LoRA
        sizes = [latent["samples"].shape[0] for latent in latents]
        n_images = sum(sizes)
        if n_images == 0:
            raise ValueError("latents: LoRA Validation Set got no images (a LATENT of batch 0); connect at least one "
                             "encoded held-out image, or disconnect the validation set from Train LoRA")
        check_caption_count(len(captions_of(positive, sizes, source)), n_images)
        return (ValidationSettings(list(latents), list(positive), every[0], noise_levels[0], source),)
