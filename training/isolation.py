"""Running something between training steps (a preview sample) without it changing the run.

What a sampler could leave behind, and what `isolated` puts back on exit, also on error or cancel:
- the global RNG: ancestral samplers and ComfyUI's `prepare_noise` (`torch.manual_seed`) draw from
  and reseed torch's global CPU generator and every CUDA device's; they are forked
  (`torch.random.fork_rng`) and restored, so whatever draws from them later draws as if nothing ran;
- the modules' train/eval flags and the parameters' `requires_grad`;
- the grad mode: the body runs under `no_grad`, so it records no graph and no `.grad` changes.
The training's own generators (training/loop.py, training/dropout.py) are objects of their own,
which sampling never sees.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def cuda_devices() -> list[int]:
    """The CUDA devices whose RNG a sampler could change: all of them once CUDA is in use
    (`torch.manual_seed` reseeds every device), none before."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


@contextmanager
def isolated(module: nn.Module) -> Iterator[None]:
    """The body under `no_grad`, the global RNG forked, `module`'s modes and `requires_grad` restored."""
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.requires_grad) for p in module.parameters()]
    try:
        with torch.random.fork_rng(devices=cuda_devices()), torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
