"""Gradient checkpointing of a model's top-level blocks, as a context manager that undoes itself.

Each block's forward is swapped for one that runs it under `torch.utils.checkpoint` (non-reentrant),
so its activations are recomputed in the backward pass instead of kept. The original forwards are
restored in `finally`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward):
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextmanager
def gradient_checkpointing(blocks: Iterable[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Checkpoint each block but the last (blocks in forward order) inside the `with`; a no-op when
    `enabled` is False."""
    saved = []
    # The last block in forward order is the first the backward pass reaches: recomputing it would
    # cost time and save no memory, so it runs normally.
    blocks = list(blocks)[:-1] if enabled else []
    try:
        for block in blocks:
            saved.append((block, block.__dict__.get("forward")))
            block.forward = _checkpointed(block.forward)
        yield
    finally:
        for block, forward in reversed(saved):
            if forward is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = forward
