"""The training loop: host-agnostic, so the same code trains ComfyUI models and the tiny model.

The host hands over the frozen network (an `nn.Module` to inject adapters into) and `ModelFns`:
how to pick noise levels, add noise, and predict the denoised image x0 for a batch. Each step:
seeded `randperm` batch → seeded noise at levels drawn uniformly through the schedule → forward
(autocast when training in bf16) → loss → backward, accumulated → clip → optimizer step.

The loss target is the model's native prediction space by default (epsilon, v, or flow velocity),
which is what kohya-ss and diffusers train on. The host's denoise is affine in the network output,
`x0 = a(x, σ) + c(σ)·out`, so the native error is the x0 error divided by `c(σ)`, which
`calculate_denoised` gives for any family. `loss_space="x0"` compares denoised images as ComfyUI core
does (weighting noisy steps by about σ²).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from ..lora import (DTYPES, MODULE_PATHS, BaseModel, LayerWeights, LoraConfig, LoraStateDict, inject, network_metadata,
                    to_state_dict)
from ..lora.metadata import PREFIX
from .checkpointing import training_forward
from .config import TrainConfig
from .data import batch_indices, flatten_latents, group_by_shape, oversized_batch_note
from .optim import loss_function, lr_at, make_optimizer

log = logging.getLogger(__name__)


class ModelFns(NamedTuple):
    """How the engine drives one diffusion model. Shapes: sigma (B,), latents (B, C, H, W).

    percent_to_sigma: percent in [0, 1] → sigma (0 = most noise), through the model's schedule.
    noise_scaling: (sigma, noise, x0) → noisy latent.
    calculate_denoised: (sigma, network output, noisy latent) → x0; affine in the output.
    denoise: (noisy latent, sigma, image indices) → predicted x0; the host picks the conditioning
        of those images and runs the network (with adapters) on them.
    """

    percent_to_sigma: Callable[[torch.Tensor], torch.Tensor]
    noise_scaling: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    calculate_denoised: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    denoise: Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]


@dataclass
class Hooks:
    """on_step(step, loss, lr) after each optimizer step (1-based); should_cancel() before each."""

    on_step: Callable[[int, float, float], None] | None = None
    should_cancel: Callable[[], bool] | None = None


@dataclass
class TrainResult:
    lora: dict[str, torch.Tensor]  # kohya-layout state dict in the config's lora_dtype
    losses: list[float]  # one per completed optimizer step of this run
    total_steps: int  # earlier steps of a continued LoRA + steps completed now
    cancelled: bool = False
    metadata: dict[str, str] = field(default_factory=dict)  # for the file: lora/metadata.py


class TrainingDiverged(FloatingPointError):
    """The loss or a gradient became NaN/inf; `last_good` holds the LoRA of the last finite step."""

    def __init__(self, message: str, last_good: TrainResult):
        super().__init__(message)
        self.last_good = last_good


def output_coefficient(fns: ModelFns, sigma: torch.Tensor) -> torch.Tensor:
    """c(σ) = ∂x0/∂out, shaped (B, 1, 1, 1): the slope of the affine denoise."""
    one = torch.ones(sigma.shape[0], 1, 1, 1, device=sigma.device)
    zero = torch.zeros_like(one)
    return fns.calculate_denoised(sigma, one, zero) - fns.calculate_denoised(sigma, zero, zero)


def train(
    net: nn.Module,
    fns: ModelFns,
    latents: torch.Tensor | Sequence[torch.Tensor],
    config: TrainConfig,
    *,
    checkpoint_blocks: Sequence[nn.Module] = (),
    existing: dict[str, LayerWeights] | None = None,
    existing_steps: int = 0,
    hooks: Hooks | None = None,
    base: BaseModel | None = None,
) -> TrainResult:
    """Train a LoRA on `net` and return it; `net` is left exactly as it was, also on error.

    `existing` (module path → LayerWeights) continues a LoRA, whose `existing_steps` count on.
    `base` names the model for the file: its layer naming (lora/naming.py) and metadata.
    Raises TrainingDiverged when the loss turns NaN/inf (suggesting a lower LR or fp32).
    """
    hooks = hooks or Hooks()
    images = flatten_latents(latents)
    note = oversized_batch_note(config.batch_size, len(images), config.batch_order)
    if note:
        log.warning(note)
    lora_config = lora_config_of(config)
    # Adapters live where the layers compute (the latents' device), not where offloaded weights rest.
    with inject(net, lora_config, seed=config.seed, weights=existing, device=images[0].device) as network, \
            training_forward(net, checkpoint_blocks, config.gradient_checkpointing) as forward:
        params = [p for p in network.parameters()]
        optimizer = make_optimizer(params, config)
        run = _Run(fns, images, config, torch.Generator().manual_seed(config.seed))
        losses: list[float] = []

        def result(cancelled: bool = False) -> TrainResult:  # the LoRA as of the last completed step
            total = existing_steps + len(losses)
            sd = to_state_dict(network.weights(), DTYPES[config.lora_dtype], base.naming if base else MODULE_PATHS)
            meta = _metadata(config, total, sd, len(images), base, network.difference_share())
            return TrainResult(LoraStateDict(sd, meta), list(losses), total, cancelled, meta)

        for step in range(config.steps):
            if hooks.should_cancel is not None and hooks.should_cancel():
                return result(cancelled=True)
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = run.accumulate_gradients()
            grads = [p.grad for p in params if p.grad is not None]
            if config.max_grad_norm:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            else:  # only the finiteness check: no rescaling pass over every gradient
                grad_norm = torch.nn.utils.get_total_norm(grads)
            if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                fp32_hint = " or set training_dtype to fp32" if config.training_dtype != "fp32" else ""
                raise TrainingDiverged(
                    f"Train LoRA: the loss became {loss} at step {existing_steps + step + 1}; "
                    f"lower learning_rate (now {config.learning_rate}){fp32_hint}", result())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            if step == 0:
                log.info("Train LoRA: %s", forward.describe())
            if hooks.on_step is not None:
                hooks.on_step(step + 1, loss, lr)
        return result()


def lora_config_of(config: TrainConfig) -> LoraConfig:
    """The LoraConfig a TrainConfig injects: algorithm, target, ranks, patterns, switches."""
    return LoraConfig(rank=config.rank, alpha=config.alpha or None, algorithm=config.algorithm, target=config.target,
                      conv_rank=config.conv_rank or None, conv_alpha=config.conv_alpha or None,
                      factor=config.lokr_factor, include=config.include or None, exclude=config.exclude or None,
                      train_norms=config.train_norms, train_biases=config.train_biases)


def _metadata(config: TrainConfig, total_steps: int, sd: dict[str, torch.Tensor], images: int,
              base: BaseModel | None, difference_share: float) -> dict[str, str]:
    """What training knows for the file's metadata (lora/metadata.py states the keys)."""
    return {**config.kohya_metadata(images), **network_metadata(sd, config.network_args()),
            **(base.metadata() if base is not None else {}), "ss_steps": str(total_steps),
            PREFIX + "settings": json.dumps(config.as_metadata()), PREFIX + "lora_dtype": config.lora_dtype,
            PREFIX + "difference_share": f"{difference_share:.6f}"}


class _Run:
    """The per-step work of one run: batch choice, noising, forward, loss, backward."""

    def __init__(self, fns: ModelFns, images: list[torch.Tensor], config: TrainConfig, generator: torch.Generator):
        self.fns, self.images, self.config, self.generator = fns, images, config, generator
        self.batches = batch_indices(len(images), config.batch_size, config.batch_order, generator)
        self.loss_fn = loss_function(config.loss_function)
        device = images[0].device
        bf16 = config.training_dtype == "bf16"
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def accumulate_gradients(self) -> float:
        """Backward over grad_accum micro-batches; returns their mean loss."""
        total = 0.0
        for _ in range(self.config.grad_accum):
            indices = next(self.batches)
            for group in group_by_shape(indices, self.images):
                # weight each same-shape group by its share so the gradient is the batch mean
                loss = self.group_loss(group) * (len(group) / len(indices) / self.config.grad_accum)
                loss.backward()
                total += loss.item()
        return total

    def group_loss(self, group: list[int]) -> torch.Tensor:
        x0 = torch.stack([self.images[i] for i in group])
        noise = torch.randn(x0.shape, generator=self.generator).to(x0.device, x0.dtype)
        percent = torch.rand(len(group), generator=self.generator)
        sigma = self.fns.percent_to_sigma(percent).to(x0.device)
        noisy = self.fns.noise_scaling(sigma, noise, x0)
        with self.autocast:
            pred = self.fns.denoise(noisy, sigma, group)
        pred = pred.float()
        if self.config.loss_space == "native":
            c = output_coefficient(self.fns, sigma)
            return self.loss_fn(pred / c, x0 / c)
        return self.loss_fn(pred, x0)
