"""The training objective: the noise-level draw, the noise, the loss weighting and the loss functions.

One call of `Objective.loss` is the loss of one same-shape group of images:
1) noise ε ~ N(0, I), seeded (plus the noise options: offset, multires);
2) a noise level per image: a percent through the model's schedule, uniform by default
   (0 = most noise, ComfyUI's `percent_to_sigma`), or logit-normal / sigmoid, in a min/max range;
   flow models may override the schedule's shift;
3) the noisy latent through the model's own `noise_scaling`, the prediction through the host;
4) the loss in the model's native prediction space (eps / v / flow velocity) or in x0 space,
   per image, weighted (min-SNR-γ, debiased estimation), averaged.

The host's denoise is affine in the network output, `x0 = a(x, σ) + c(σ)·out`, so the native error
is the x0 error divided by `c(σ)` (`output_coefficient`), for any family. Everything is expressed
through sigma, never through a family's timestep table.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .config import TrainConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pred, target) → per-element loss


class ModelFns(NamedTuple):
    """How the engine drives one diffusion model. Shapes: sigma (B,), latents (B, C, H, W).

    percent_to_sigma: percent in [0, 1] → sigma (0 = most noise), through the model's schedule.
    noise_scaling: (sigma, noise, x0) → noisy latent.
    calculate_denoised: (sigma, network output, noisy latent) → x0; affine in the output.
    denoise: (noisy latent, sigma, image indices) → predicted x0; the host picks the conditioning
        of those images and runs the network (with adapters) on them.
    denoise_uncond: (noisy latent, sigma) → predicted x0 with the empty caption; None when the host
        has no unconditional conditioning (caption dropout then refuses to run).
    flow: the model is a rectified-flow model (σ in (0, 1], x = (1 − σ)·x0 + σ·ε): a shift override
        applies to it only.
    """

    percent_to_sigma: Callable[[torch.Tensor], torch.Tensor]
    noise_scaling: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    calculate_denoised: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    denoise: Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]
    denoise_uncond: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    flow: bool = False


_LOSSES: dict[str, LossFn] = {
    "MSE": lambda p, t: F.mse_loss(p, t, reduction="none"),
    "L1": lambda p, t: F.l1_loss(p, t, reduction="none"),
    "Huber": lambda p, t: F.huber_loss(p, t, reduction="none"),  # delta 1
    "SmoothL1": lambda p, t: F.smooth_l1_loss(p, t, reduction="none"),  # beta 1
}


def loss_function(name: str) -> LossFn:
    """The per-element loss of that name (MSE, L1, Huber with delta 1, SmoothL1 with beta 1)."""
    return _LOSSES[name]


def output_coefficient(fns: ModelFns, sigma: torch.Tensor) -> torch.Tensor:
    """c(σ) = ∂x0/∂out, shaped (B, 1, 1, 1): the slope of the affine denoise."""
    one = torch.ones(sigma.shape[0], 1, 1, 1, device=sigma.device)
    zero = torch.zeros_like(one)
    return fns.calculate_denoised(sigma, one, zero) - fns.calculate_denoised(sigma, zero, zero)


def snr(fns: ModelFns, sigma: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio (a/b)² of `noisy = a·x0 + b·ε` at each sigma, (B,), from the model's own
    noise_scaling: 1/σ² for eps and v (ComfyUI's VE view of a VP model), ((1 − σ)/σ)² for flow."""
    one = torch.ones(sigma.shape[0], 1, 1, 1, device=sigma.device)
    zero = torch.zeros_like(one)
    a = fns.noise_scaling(sigma, zero, one).flatten()
    b = fns.noise_scaling(sigma, one, zero).flatten()
    return (a / b) ** 2


def per_image(loss: torch.Tensor) -> torch.Tensor:
    """(B, ...) element losses → (B,) means."""
    return loss.flatten(1).mean(1)


class Objective:
    """The loss of one same-shape group; `loss(x0, indices, generator)` draws from `generator` only."""

    def __init__(self, fns: ModelFns, config: TrainConfig, device: torch.device):
        self.fns, self.config = fns, config
        self.loss_fn = loss_function(config.loss_function)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.training_dtype == "bf16")

    def loss(self, x0: torch.Tensor, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        """x0 (B, C, H, W), the latents of images `indices` → the mean loss (0-d, fp32, with grad)."""
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        percent = torch.rand(len(indices), generator=generator)
        sigma = self.fns.percent_to_sigma(percent).to(x0.device)
        noisy = self.fns.noise_scaling(sigma, noise, x0)
        with self.autocast:
            pred = self.fns.denoise(noisy, sigma, indices)
        pred = pred.float()
        if self.config.loss_space == "native":
            c = output_coefficient(self.fns, sigma)
            return per_image(self.loss_fn(pred / c, x0 / c)).mean()
        return per_image(self.loss_fn(pred, x0)).mean()
