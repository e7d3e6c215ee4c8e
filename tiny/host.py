"""The tiny model as a host of the engine: its ModelFns, its file metadata, its caption check.

This is what ComfyUI's guider is to a ComfyUI model: it picks each image's conditioning and runs
the network. Scoring it is the engine's (training/evaluate.py `heldout_loss(tiny_fns(...), ...)`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..lora import BaseModel
from ..training.data import check_caption_count, flatten_latents
from ..training.objective import ModelFns
from .model import TinyDiffusion

# The tiny model for a file's metadata: no other tool has it, so its layers keep their own module paths.
TINY_BASE = BaseModel(version="comfyui-lora-trainer-tiny", architecture="comfyui-lora-trainer-tiny",
                      implementation="comfyui-lora-trainer", resolution="32x32",
                      prediction_type="epsilon", pixel_scale=1)  # its stand-in VAE keeps the image size


def tiny_fns(model: TinyDiffusion, contexts: torch.Tensor, uncond: torch.Tensor | None = None,
             preserve: torch.Tensor | None = None) -> ModelFns:
    """contexts: (1 or N, L, D), one for all images or one per image (N = image count, a regularisation
    set's images after the training images); uncond (1, L, D): the empty caption's context, for caption
    dropout and blank-prompt preservation; preserve (1 or N, L, D): each image's preservation caption (the
    trigger replaced by the class word), for differential output preservation."""
    schedule = model.schedule

    def caption_denoise(table: torch.Tensor):
        def denoise(noisy: torch.Tensor, sigma: torch.Tensor, indices: list[int]) -> torch.Tensor:
            context = table[[0] * len(indices)] if table.shape[0] == 1 else table[indices]
            return model.denoise(noisy, sigma, context)
        return denoise

    denoise = caption_denoise(contexts)

    def denoise_uncond(noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model.denoise(noisy, sigma, uncond.expand(noisy.shape[0], *uncond.shape[1:]))

    return ModelFns(schedule.percent_to_sigma, schedule.noise_scaling, schedule.calculate_denoised, denoise,
                    denoise_uncond if uncond is not None else None, schedule.kind == "flow",
                    denoise_preserve=caption_denoise(preserve) if preserve is not None else None)


def checked_contexts(contexts: torch.Tensor, latents: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    check_caption_count(contexts.shape[0], len(flatten_latents(latents)))
    return contexts

