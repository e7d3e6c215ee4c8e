"""Network, rank and module dropout on the adapters while training (kohya-ss `networks/lora.py`'s
`dropout`, `rank_dropout`, `module_dropout`), and the RNG they draw from.

- network dropout: `F.dropout(down(x), p)` on the rank-wide activation (LoRA, DoRA);
- rank dropout: per image, whole ranks of that activation zeroed with probability p and the rest
  scaled by 1 / (1 − p), as if the rank were smaller for that image (LoRA, DoRA);
- module dropout: per layer call, the whole adapter skipped with probability p (every algorithm).

The masks come from torch's global RNG, which gradient checkpointing saves and restores around a
block's recomputation (training/checkpointing.py), so the recomputed forward drops the same units.
`Dropout.active()` forks that RNG and sets it to the run's own state, seeded from the run's seed, so
the masks are reproducible, leave the caller's RNG untouched, and resume from `Trainer.state()`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..lora import LoraNetwork
from .config import TrainConfig


def rank_dropout(h: torch.Tensor, p: float, conv: bool) -> torch.Tensor:
    """h with whole ranks zeroed per image (mask (B, rank), rank on dim 1 for a conv, the last dim for
    a Linear), the kept ones scaled by 1 / (1 − p)."""
    rank = h.shape[1] if conv else h.shape[-1]
    keep = (torch.rand(h.shape[0], rank, device=h.device) > p).to(h.dtype) / (1 - p)
    shape = (h.shape[0], rank, *[1] * (h.dim() - 2)) if conv else (h.shape[0], *[1] * (h.dim() - 2), rank)
    return h * keep.reshape(shape)


def rank_hook(network_p: float, rank_p: float, conv: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(h: torch.Tensor) -> torch.Tensor:
        if network_p:
            h = F.dropout(h, network_p, training=True)
        if rank_p:
            h = rank_dropout(h, rank_p, conv)
        return h

    return hook


def module_skip(p: float) -> Callable[[], bool]:
    return lambda: bool(torch.rand(()) < p)


def any_dropout(config: TrainConfig) -> bool:
    return bool(config.network_dropout or config.rank_dropout or config.module_dropout)


class Dropout:
    """The config's dropout on one network, and the forward pass's RNG state (`state`)."""

    def __init__(self, network: LoraNetwork, config: TrainConfig, device: torch.device):
        self.network, self.config = network, config
        self.devices = ([device.index if device.index is not None else torch.cuda.current_device()]
                        if device.type == "cuda" else [])
        seed = (config.seed + 1) % 2**64  # a stream apart from the run's generator
        self.state = {"forward": torch.Generator().manual_seed(seed).get_state(),
                      **{f"forward_cuda:{d}": torch.Generator(f"cuda:{d}").manual_seed(seed).get_state()
                         for d in self.devices}}

    @contextmanager
    def active(self) -> Iterator[None]:
        """Hooks on, the global RNG forked and set to the run's state; saved and restored on exit."""
        cfg = self.config
        adapters = list(self.network.adapters.values())
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.state["forward"])
            for d in self.devices:
                torch.cuda.set_rng_state(self.state[f"forward_cuda:{d}"], d)
            try:
                for adapter in adapters:
                    if cfg.module_dropout:
                        adapter.skip = module_skip(cfg.module_dropout)
                    if (cfg.network_dropout or cfg.rank_dropout) and hasattr(adapter.algo, "rank_hook"):
                        adapter.algo.rank_hook = rank_hook(cfg.network_dropout, cfg.rank_dropout,
                                                           adapter.algo.shape.is_conv)
                yield
            finally:
                for adapter in adapters:
                    adapter.skip = None
                    if hasattr(adapter.algo, "rank_hook"):
                        adapter.algo.rank_hook = None
                self.state = {"forward": torch.get_rng_state(),
                              **{f"forward_cuda:{d}": torch.cuda.get_rng_state(d) for d in self.devices}}
