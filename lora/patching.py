"""Set-and-restore, the one way the pack patches what it does not own.

`restoring(mapping, keys)` puts back, in `finally`, what each key held when the block began, or takes
the key away if it was absent; `swapped_items(mapping, values)` sets the values inside such a block.
Everything the pack patches is an item of some mapping: a module's forward (`module.__dict__`), a
layer's parameters (`module._parameters`), a guider's conds, a ComfyUI module's flag
(`module.__dict__`), an attribute a nested sampler may set (`obj.__dict__`). Restoring runs also on
ComfyUI's interrupt, which `except Exception` does not catch.

A ComfyUI model clone shares its torch modules with every other node's model, so a forward left
patched would silently change them all. `swapped_forwards` sets an instance attribute `forward`
(which `nn.Module.__call__` finds before the class's method) and restores exactly what was there
before: the earlier instance attribute, or none at all.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, MutableMapping

from torch import nn

_ABSENT = object()


@contextmanager
def restoring(mapping: MutableMapping, keys: Iterable[Hashable]) -> Iterator[None]:
    """On leaving the block, each of `keys` holds what it held on entering it, or is absent again."""
    saved = [(key, mapping.get(key, _ABSENT)) for key in keys]
    try:
        yield
    finally:
        for key, value in reversed(saved):
            if value is _ABSENT:
                mapping.pop(key, None)
            else:
                mapping[key] = value


@contextmanager
def swapped_items(mapping: MutableMapping, values: Mapping[Hashable, Any]) -> Iterator[None]:
    """`mapping.update(values)` for the block; every key's old value, or its absence, restored after."""
    with restoring(mapping, list(values)):
        mapping.update(values)
        yield


@contextmanager
def swapped_forwards(swaps: Iterable[tuple[nn.Module, Callable[[Callable], Callable]]]) -> Iterator[None]:
    """For each (module, wrap): `module.forward = wrap(module.forward)` inside the `with`, restored in
    reverse order. The same module may appear twice; the wraps then nest."""
    with ExitStack() as stack:
        for module, wrap in swaps:
            stack.enter_context(swapped_items(module.__dict__, {"forward": wrap(module.forward)}))
        yield
