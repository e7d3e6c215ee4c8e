"""Optimizers and the learning-rate schedule (the loss functions live in training/objective.py).

`lr_at(step)` is a pure function (nanoGPT's `get_lr` shape): 1) linear warmup from 0, then
2) constant, linear decay, cosine decay, or cosine with hard restarts (`lr_restarts` cycles, as
Hugging Face's `get_cosine_with_hard_restarts_schedule_with_warmup`), decaying to
`min_learning_rate` (0 by default) over the remaining steps.

`make_optimizer` builds torch's optimizer of the config's name (Adafactor is torch's own; Prodigy
comes from the optional `prodigyopt` package) with its default hyper-parameters besides the LR and
`weight_decay`. LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models")
puts the `up` matrices in a parameter group whose LR is `lora_plus_ratio` times the base LR: each
group's "lr_ratio" scales the schedule's LR.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from .config import TrainConfig

_TORCH_OPTIMIZERS = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "RMSprop": torch.optim.RMSprop,
    "Adafactor": torch.optim.Adafactor,
}
UP_SUFFIX = "lora_up"  # the LoRA/DoRA parameter LoRA+ speeds up


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name != "Prodigy":
        return _TORCH_OPTIMIZERS[name]
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise ImportError("optimizer: Prodigy needs the optional package prodigyopt, which is not installed; install "
                          "it with the Python that runs ComfyUI (python -m pip install prodigyopt), or choose another "
                          "optimizer") from None
    return Prodigy


def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], config: TrainConfig) -> list[dict]:
    """One group, or with LoRA+ two: the rest (lr_ratio 1) and the up matrices (lr_ratio = lora_plus_ratio)."""
    named = list(named)
    if config.lora_plus_ratio == 1.0:
        return [{"params": [p for _, p in named], "lr_ratio": 1.0}]
    up = [p for n, p in named if n.endswith(UP_SUFFIX)]
    rest = [p for n, p in named if not n.endswith(UP_SUFFIX)]
    return [{"params": rest, "lr_ratio": 1.0}, {"params": up, "lr_ratio": config.lora_plus_ratio}]


def make_optimizer(named: Iterable[tuple[str, torch.nn.Parameter]], config: TrainConfig) -> torch.optim.Optimizer:
    """The config's optimizer over `named` (name, parameter) pairs, at the config's LR."""
    groups = param_groups(named, config)
    params = [p for g in groups for p in g["params"]]
    kwargs: dict[str, object] = {"lr": config.learning_rate}
    if config.weight_decay >= 0:  # -1: the optimizer's own default
        kwargs["weight_decay"] = config.weight_decay
    fusable = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    if config.optimizer in ("AdamW", "Adam") and fusable:  # one fused kernel instead of a loop over tensors
        kwargs["fused"] = True
    return _optimizer_class(config.optimizer)(groups, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's LR into every group, times the group's lr_ratio (LoRA+)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `config.steps`."""
    base, floor, warmup, total = config.learning_rate, config.min_learning_rate, config.warmup_steps, config.steps
    # 1) warmup: linear from base/warmup up to base
    if step < warmup:
        return base * (step + 1) / warmup
    # 2) decay over the steps after warmup, from base to the floor
    if config.lr_schedule == "constant" or total <= warmup:
        return base
    progress = (step - warmup) / (total - warmup)
    if config.lr_schedule == "linear":
        return floor + (base - floor) * (1.0 - progress)
    if config.lr_schedule == "cosine_with_restarts":
        progress = (progress * config.lr_restarts) % 1.0  # each cycle restarts at base
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
