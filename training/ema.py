"""An exponential moving average (EMA) of the adapters' weights, kept beside the training.

After every `ema_every`-th optimizer step t (1-based), each average moves towards its parameter:
`avg ← d·avg + (1 − d)·param`, with d = ema_decay, or with `ema_warmup` min((1 + t) / (10 + t),
ema_decay) (OneTrainer's warm-up: early steps are not averaged with the untrained start), raised to
the power `ema_every`, so that the averaging horizon stays counted in steps. The averages are fp32,
on the compute device or, with `ema_on_cpu`, in RAM. `applied()` puts them into the adapters for a
while (previews, the validation loss, the saved LoRA) and puts the trained values back exactly.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .config import TrainConfig


def ema_decay_at(step: int, config: TrainConfig) -> float:
    """The decay of the update after optimizer step `step` (1-based), for `ema_every` steps at once."""
    decay = min((1 + step) / (10 + step), config.ema_decay) if config.ema_warmup else config.ema_decay
    return decay ** config.ema_every


class Ema:
    """The averages of `named` (name → parameter), in their order; `named` names them in states."""

    def __init__(self, named: dict[str, torch.nn.Parameter], config: TrainConfig):
        self.config = config
        self.params = list(named.values())
        self.names = list(named)
        device = torch.device("cpu") if config.ema_on_cpu else None
        self.averages = [p.detach().to(device or p.device, torch.float32, copy=True) for p in self.params]

    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based): move the averages when `ema_every` divides it."""
        if step % self.config.ema_every:
            return
        weight = 1.0 - ema_decay_at(step, self.config)
        with torch.no_grad():
            sources = [p.detach().to(a.device, torch.float32) for p, a in zip(self.params, self.averages)]
            torch._foreach_lerp_(self.averages, sources, weight)

    def state(self) -> dict[str, torch.Tensor]:
        """name → the average (the live tensors; clone to keep)."""
        return dict(zip(self.names, self.averages))

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """The averages of a saved state; ValueError naming `resume` when they are not these parameters'."""
        missing = [n for n in self.names if n not in state]
        if missing or len(state) != len(self.names):
            raise ValueError(f"resume: the training state's EMA does not match this run's adapters (e.g. "
                             f"{(missing or sorted(set(state) - set(self.names)))[0]}); it was saved with "
                             "ema_decay 0 or other layers: match the saved run's settings, or clear resume")
        with torch.no_grad():
            for name, average in zip(self.names, self.averages):
                average.copy_(state[name])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averages in the adapters inside the block; the trained values back, bit-exact, after it."""
        with restored(self.params):
            with torch.no_grad():
                for p, a in zip(self.params, self.averages):
                    p.copy_(a)
            yield


@contextmanager
def restored(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """`params` get back, bit-exact, the values they had when the block began, whatever it did to them."""
    with torch.no_grad():
        kept = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)
