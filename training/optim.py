"""Optimizers and the learning-rate schedule (the loss functions live in training/objective.py).

`lr_at(step)` is a pure function (nanoGPT's `get_lr` shape): 1) linear warmup from 0, then
2) constant, linear decay to 0, or cosine decay to 0 over the remaining steps.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from .config import TrainConfig

_OPTIMIZERS = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "RMSprop": torch.optim.RMSprop,
}

def make_optimizer(params: Iterable[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """torch's optimizer of that name with its default hyper-parameters, at the config's LR."""
    params = list(params)
    fusable = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    if config.optimizer in ("AdamW", "Adam") and fusable:  # one fused kernel instead of a loop over tensors
        return _OPTIMIZERS[config.optimizer](params, lr=config.learning_rate, fused=True)
    return _OPTIMIZERS[config.optimizer](params, lr=config.learning_rate)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `config.steps`."""
    base, warmup, total = config.learning_rate, config.warmup_steps, config.steps
    # 1) warmup: linear from base/warmup up to base
    if step < warmup:
        return base * (step + 1) / warmup
    # 2) decay over the steps after warmup
    if config.lr_schedule == "constant" or total <= warmup:
        return base
    progress = (step - warmup) / (total - warmup)
    if config.lr_schedule == "linear":
        return base * (1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))
