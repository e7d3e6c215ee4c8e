"""Evaluation: how well a model denoises given latents, at fixed noise levels with fixed noises.

The engine's general measure, for any host: it needs only the model's callables (`ModelFns`,
training/objective.py), so it scores a base model or one with a LoRA merged, the tiny model or a
ComfyUI one, and the number never depends on the training run. Every image is measured at
`HELDOUT_LEVELS` noise levels (`level_percents`: percents through the model's own schedule, mapped
by `percent_to_sigma`) with noises from a generator of its own (`HELDOUT_SEED`), never the training
stream or the global RNG: the same weights give the same number. The error is the MSE in the
model's native prediction space (epsilon, v or flow velocity: the x0 error divided by c(σ)) or in
x0 space, one image at a time.

The nodes' validation loss (training/validation.py) is the same kind of measure at the same
`level_percents`, in a run's own terms: the run's loss function and autocast, batches of the run's
size, its own seed; its numbers are not this function's.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .config import LOSS_SPACES
from .data import flatten_latents
from .objective import ModelFns, output_coefficient

HELDOUT_LEVELS = 5  # percents 0.1, 0.3, 0.5, 0.7, 0.9
HELDOUT_SEED = 987654321


def level_percents(noise_levels: int) -> torch.Tensor:
    """(noise_levels,) percents through the schedule (0 = most noise): the midpoints of equal bins,
    (k + ½)/L."""
    return (torch.arange(noise_levels, dtype=torch.float64) + 0.5).div(noise_levels).float()


@torch.no_grad()
def heldout_loss(fns: ModelFns, latents: torch.Tensor | Sequence[torch.Tensor], space: str = "native") -> float:
    """Mean MSE over every image × each of `HELDOUT_LEVELS` levels, with noises from HELDOUT_SEED.

    latents: (N, C, H, W) or (N, C, T, H, W), or a list of such batches, in the model's latent
    space. `fns.denoise` gets one image at a time with its index into them, so the host picks that
    image's conditioning. space: "native" or "x0" (as `TrainConfig.loss_space`).
    """
    if space not in LOSS_SPACES:
        raise ValueError(f"heldout_loss space: got {space!r}; give one of {', '.join(LOSS_SPACES)}")
    generator = torch.Generator().manual_seed(HELDOUT_SEED)
    percents = level_percents(HELDOUT_LEVELS)
    losses = []
    for index, x0 in enumerate(flatten_latents(latents)):
        x0 = x0[None]
        for level in range(HELDOUT_LEVELS):
            sigma = fns.percent_to_sigma(percents[level:level + 1]).to(x0.device)
            # Drawn on the CPU, whatever the latents' device, so the noises are the same everywhere.
            noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
            pred = fns.denoise(fns.noise_scaling(sigma, noise, x0), sigma, [index])
            scale = output_coefficient(fns, sigma, x0.dim()) if space == "native" else 1.0
            losses.append(torch.mean(((pred - x0) / scale) ** 2).item())
    return sum(losses) / len(losses)


def colour_histogram(images: torch.Tensor, bins: int = 8) -> torch.Tensor:
    """images (B, H, W, 3) in [0, 1] (ComfyUI IMAGE layout) → (bins³,) float64 joint RGB histogram
    of all their pixels, summing to 1; `bins` equal bins per channel."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: got shape {tuple(images.shape)}; give (B, H, W, 3) RGB in [0, 1]")
    if bins < 1:
        raise ValueError(f"bins: got {bins}; give 1 or more bins per channel")
    index = (images.reshape(-1, 3).double().clamp(0, 1) * bins).long().clamp_max(bins - 1)
    flat = (index[:, 0] * bins + index[:, 1]) * bins + index[:, 2]
    counts = torch.bincount(flat, minlength=bins ** 3).double()
    return counts / counts.sum()


def colour_distance(images: torch.Tensor, reference: torch.Tensor, bins: int = 8) -> float:
    """A style measure that needs no eyes: the L1 distance between the joint RGB histograms
    (`colour_histogram`) of two image sets, 0 (same colours in the same proportions) to 2 (no
    colour in common). images, reference: (B, H, W, 3) in [0, 1], any B, H, W."""
    return float((colour_histogram(images, bins) - colour_histogram(reference, bins)).abs().sum())
