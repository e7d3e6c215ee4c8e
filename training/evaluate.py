"""Evaluation: how well a model denoises given latents, at fixed noise levels with fixed noises.

The engine's general measure, for any host: it needs only the model's callables (`ModelFns`,
training/objective.py), so it scores a base model or one with a LoRA merged, the tiny model or a
ComfyUI one, and the number never depends on the training run. Every image is measured at
`HELDOUT_LEVELS` noise levels (`level_percents`: percents through the model's own schedule, mapped
by `percent_to_sigma`) with noises from a generator of its own (`HELDOUT_SEED`), never the training
stream or the global RNG: the same weights give the same number. The error is the MSE in the
model's native prediction space (epsilon, v or flow velocity: the x0 error divided by c(σ)) or in
x0 space, one image at a time.

Why the pack has two held-out measures: the nodes' validation loss (training/validation.py) is the
same kind of measure at the same `level_percents`, but in a run's own terms (the run's loss
function and autocast, batches of the run's size), so that it sits on the training loss curve;
this one is fixed (MSE, fp32, one image at a time, its own seed), so that it compares models across
runs and settings (the demo, the pretraining, the engine's tests). Both compute the loss through
`objective.space_loss`, the one place the native/x0 expression is written.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .config import LOSS_SPACES
from .data import flatten_latents
from .objective import ModelFns, loss_function, output_coefficient, space_loss

HELDOUT_LEVELS = 5  # percents 0.1, 0.3, 0.5, 0.7, 0.9
HELDOUT_SEED = 987654321
_MSE = loss_function("MSE")


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
            losses.append(float(space_loss(_MSE, pred, x0, scale, space)))
    return sum(losses) / len(losses)



def _cube_directions() -> torch.Tensor:
    """(13, 3) unit vectors: the RGB cube's 3 axes, 6 face diagonals and 4 body diagonals."""
    vectors = [v for v in torch.cartesian_prod(*[torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)] * 3)
               if v.abs().sum() > 0 and v[v != 0][0] > 0]  # one of each ± pair
    return torch.stack(vectors) / torch.stack(vectors).norm(dim=1, keepdim=True)


def colour_distance(images: torch.Tensor, reference: torch.Tensor, quantiles: int = 256) -> float:
    """A style measure that needs no eyes: how far the colours of `images` are from those of
    `reference`, as a sliced earth mover's distance between their pixel colour distributions.

    images, reference: (B, H, W, 3) RGB in [0, 1], any B, H, W. Along each of 13 fixed directions
    through the RGB cube, both sets' pixels are projected and their `quantiles` quantiles compared
    (the 1-D earth mover's distance); the result is the mean over directions, in RGB units
    (0: the same colours in the same proportions; 1: black against white). Unlike a histogram
    distance it does not jump at bin edges, so near-palette colours count as near.
    """
    for name, batch in (("images", images), ("reference", reference)):
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"{name}: got shape {tuple(batch.shape)}; give (B, H, W, 3) RGB in [0, 1]")
    levels = (torch.arange(quantiles, dtype=torch.float64) + 0.5) / quantiles
    directions = _cube_directions()
    projected = [(batch.reshape(-1, 3).double() @ directions.T) for batch in (images, reference)]
    spread = [torch.quantile(p, levels, dim=0) for p in projected]  # (quantiles, 13) each
    return float((spread[0] - spread[1]).abs().mean())
