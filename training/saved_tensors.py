"""Blocks that write into tensors autograd saved for backward: copy-on-write for saved tensors.

Many of ComfyUI's DiT blocks update their residual stream in place after a norm has saved it for
backward: `x += apply_mod(out, gate)` (comfy/ldm/flux/layers.py, single-stream block),
`img += …` / `txt += …` (double-stream block), and the same pattern in wan, mmdit, qwen_image and
lumina. Plain autograd refuses this at the backward pass ("modified by an inplace operation").
torch's non-reentrant checkpoint refuses it when the block writes into its own input, and when it
does not, its recomputation keeps aliases of the recomputed tensors, so a later in-place write in
the same block silently changes them: the gradients come out wrong, with no error. (ComfyUI core's
trainer hides its inputs from checkpoint's check and recomputes on the overwritten input, which is
wrong as well.)

`SavedTensorGuard` keeps each tensor autograd saves in a holder, indexed by its storage. A
`TorchDispatchMode` sees every op that writes into a tensor (from the op's schema) and, just
before the write, gives every holder of that storage a private copy of the old values. Only
tensors that are really overwritten are copied; values and gradients equal those of the same
block written out of place. The mode costs a Python call per op, so checkpointing.py runs it only
for models that need it.

Every holder also remembers its tensor's version counter: `SavedTensor.value()` refuses a tensor
that was overwritten behind its back, so a write the guard did not see fails loudly, never silently.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class SavedTensor:
    """A saved tensor's value for backward: the tensor itself until something overwrites it."""

    __slots__ = ("tensor", "version", "copied", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.version = tensor._version
        self.copied = False  # True once an in-place write made us keep a private copy

    def keep_copy(self) -> None:
        self.tensor = self.tensor.clone()
        self.version, self.copied = self.tensor._version, True

    def value(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(
                "Train LoRA: the model wrote in place into a tensor it had saved for backward, on a "
                "call where it had not done so before, so its gradients would be wrong. Please report "
                "this model; setting gradient_checkpointing off may avoid it.")
        return self.tensor


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    # the storage object's identity, not its data pointer: a fake tensor's (training/memory.py) has none
    return t.device.type, t.untyped_storage()._cdata


def _written_tensors(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensor arguments an aten op writes into, read from its schema's alias annotations."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        written.extend(v for v in values if isinstance(v, torch.Tensor))
    return written


class SavedTensorGuard:
    """Holders for saved tensors, and the copy-on-write that protects them from in-place writes.

    `copies` counts the holders that had to keep a copy: 0 means nothing was overwritten.
    """

    def __init__(self) -> None:
        self._by_storage: dict[tuple[str, int], list[weakref.ref]] = {}
        self.copies = 0

    def hold(self, tensor: torch.Tensor) -> SavedTensor:
        """Keep `tensor`'s current values for later, copying them only if something overwrites them."""
        holder = SavedTensor(tensor)
        if tensor.layout == torch.strided and tensor.device.type != "meta":
            self._by_storage.setdefault(_storage_key(tensor), []).append(weakref.ref(holder))
        return holder

    def before_write(self, tensor: torch.Tensor) -> None:
        """Give every live holder of `tensor`'s storage a private copy of the values it holds."""
        refs = self._by_storage.pop(_storage_key(tensor), None)
        for ref in refs or ():
            holder = ref()
            if holder is not None:
                holder.keep_copy()
                self.copies += 1

    def copy_on_write(self) -> TorchDispatchMode:
        """A mode under which every in-place write first copies what this guard holds of its target."""
        return _CopyOnWrite(self)

    @contextmanager
    def saving(self) -> Iterator[None]:
        """Autograd saves through this guard, and in-place writes copy what it holds, inside the `with`."""
        with torch.autograd.graph.saved_tensors_hooks(self.hold, SavedTensor.value), self.copy_on_write():
            yield


class _CopyOnWrite(TorchDispatchMode):
    """Before an op writes into a tensor, the guard copies what it holds of that storage."""

    def __init__(self, guard: SavedTensorGuard):
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.is_mutable:
            for tensor in _written_tensors(func, args, kwargs):
                self.guard.before_write(tensor)
        return func(*args, **kwargs)
