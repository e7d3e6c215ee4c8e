"""Swapping a module's forward for another and putting the old one back: the one patch-and-restore.

A ComfyUI model clone shares its torch modules with every other node's model, so a forward left
patched would silently change them all. The swap sets an instance attribute `forward` (which
`nn.Module.__call__` finds before the class's method) and restores exactly what was there before:
the earlier instance attribute, or none at all.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from torch import nn

_ABSENT = object()


@contextmanager
def swapped_forwards(swaps: Iterable[tuple[nn.Module, Callable[[Callable], Callable]]]) -> Iterator[None]:
    """For each (module, wrap): `module.forward = wrap(module.forward)` inside the `with`.

    Restored in `finally` in reverse order, also on ComfyUI's interrupt (which `except Exception`
    does not catch). The same module may appear twice; the wraps then nest.
    """
    saved: list[tuple[nn.Module, object]] = []
    try:
        for module, wrap in swaps:
            saved.append((module, module.__dict__.get("forward", _ABSENT)))
            module.forward = wrap(module.forward)
        yield
    finally:
        for module, forward in reversed(saved):
            if forward is _ABSENT:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
