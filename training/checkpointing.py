"""Autograd through a model's forward: blocks that write in place, and gradient checkpointing.

`training_forward(net, blocks, checkpointing)` patches the model for the length of a `with`:
- a call of `net` runs under a fresh `SavedTensorGuard` (saved_tensors.py), so a block that
  overwrites a tensor autograd saved (Flux's `x += …` after a norm used `x`) trains correctly,
  with checkpointing or without; when the first call shows the model never does that, later
  calls skip the guard's per-op cost (`_Forward`);
- with checkpointing, each block but the last (blocks in forward order) keeps only its inputs in
  the forward pass; the first time backward needs one of its saved tensors, the block runs again
  (same RNG and autocast state) under a guard of its own and hands over what it saved. The last
  block is the first the backward pass reaches: recomputing it would cost time and save no memory.

The checkpoint is written here rather than taken from `torch.utils.checkpoint`: torch's keeps
aliases of the recomputed tensors, so an in-place write later in the same block changes them and
the gradients come out wrong without an error (tests/test_inplace.py shows both).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
from torch import nn

from ..lora.patching import swapped_forwards
from .saved_tensors import SavedTensor, SavedTensorGuard


class _Forward:
    """The state of one `training_forward`: whether calls run guarded, and the guard in progress.

    The first call with grad runs guarded. If neither it nor its checkpointed blocks' recomputations
    had to copy anything, the model does not write into tensors autograd saved, and later calls run
    light, without the per-op cost of the guard: plain autograd, whose own version check refuses an
    in-place write outside checkpointed blocks, and checkpointed blocks whose saved tensors and
    inputs are version-checked when used (`SavedTensor.value`). Either way a wrong gradient is
    never computed silently.
    """

    def __init__(self, checkpointed_blocks: int) -> None:
        self.guard: SavedTensorGuard | None = None
        self.calls = 0  # guarded calls so far
        self.copies = 0  # copy-on-write events of those calls and of their recomputations
        self.checkpointed_blocks = checkpointed_blocks
        self.blocks_run: set[int] = set()  # ids of checkpointed blocks whose patched forward ran

    def describe(self) -> str:
        """One line for the log: what checkpointing and the in-place guard did so far."""
        guard = ("on: the model writes in place into tensors saved for backward" if self.copies
                 else "off: the model writes into no tensor saved for backward")
        return (f"gradient checkpointing: {len(self.blocks_run)} of {self.checkpointed_blocks} "
                f"patched blocks ran checkpointed; in-place guard {guard}")

    @property
    def light(self) -> bool:
        return self.calls > 0 and self.copies == 0

    def guarded(self, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            if not torch.is_grad_enabled() or self.guard is not None or self.light:  # sampling, nested, light
                return forward(*args, **kwargs)
            self.guard = SavedTensorGuard()
            try:
                with self.guard.saving():
                    return forward(*args, **kwargs)
            finally:
                self.calls += 1
                self.copies += self.guard.copies
                self.guard = None

        return run

    def checkpointed(self, forward: Callable, block: nn.Module) -> Callable:
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            self.blocks_run.add(id(block))
            return _CheckpointedCall(forward, args, kwargs, self).run(args, kwargs)

        return run


class _Input(NamedTuple):
    """A tensor argument of a checkpointed call, held by the forward's guard (when guarded)."""

    holder: SavedTensor
    requires_grad: bool


class _CheckpointedCall:
    """One block call whose saved tensors are recomputed in the backward pass.

    Tensor arguments (top level of args and kwargs) are held by the forward's guard, so a block
    that writes into its own input still recomputes from the values it was called with. Dict and
    list arguments are shallow-copied for the recomputation (ComfyUI updates `transformer_options`
    between blocks); the forward itself gets the caller's own objects. A call
    made under a guard recomputes under a guard of its own; a light one checks versions instead.
    """

    def __init__(self, forward: Callable, args: tuple, kwargs: dict, owner: _Forward):
        self.forward, self.owner = forward, owner
        self.guarded = owner.guard is not None
        hold = owner.guard.hold if self.guarded else SavedTensor
        self.args = [_keep(a, hold) for a in args]
        self.kwargs = {k: _keep(v, hold) for k, v in kwargs.items()}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        self.cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        self.rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.cuda])
        self.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                         for d in sorted({"cpu", *(t.device.type for t in tensors)})]
        self.count = 0
        self.recomputed: list[SavedTensor | None] = []

    def run(self, args: tuple, kwargs: dict):
        """The block's forward on the caller's own arguments, saving nothing but a count."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return self.forward(*args, **kwargs)

    def _pack(self, tensor: torch.Tensor) -> int:
        self.count += 1
        return self.count - 1

    def _unpack(self, index: int) -> torch.Tensor:
        if index >= len(self.recomputed) or self.recomputed[index] is None:
            self._recompute()
        holder, self.recomputed[index] = self.recomputed[index], None  # backward owns it now
        return holder.value()

    def _recompute(self) -> None:
        guard = SavedTensorGuard() if self.guarded else None
        hold = guard.hold if guard is not None else SavedTensor
        saved: list[SavedTensor | None] = []
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=self.cuda))
            torch.set_rng_state(self.rng[0])
            for device, state in zip(self.cuda, self.rng[1]):
                torch.cuda.set_rng_state(state, device)
            for device_type, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(hold(t)) or len(saved) - 1, lambda i: saved[i].tensor))
            if guard is not None:
                stack.enter_context(guard.copy_on_write())
            args = [_fresh(a) for a in self.args]  # under enable_grad: backward itself runs without grad
            kwargs = {k: _fresh(v) for k, v in self.kwargs.items()}
            self.forward(*args, **kwargs)
        if len(saved) != self.count:
            raise RuntimeError(f"gradient checkpointing: the block saved {self.count} tensors for backward "
                               f"but {len(saved)} when run again; it does not run the same way twice. "
                               "Set gradient_checkpointing off for this model.")
        if guard is not None:
            self.owner.copies += guard.copies
        self.recomputed = saved


def _keep(value, hold: Callable[[torch.Tensor], SavedTensor]):
    if isinstance(value, torch.Tensor):
        return _Input(hold(value), value.requires_grad)
    return type(value)(value) if isinstance(value, (dict, list)) else value


def _fresh(value):
    """An input for the recomputation, cut from the graph; a copy where the block wrote into it,
    so that running it again does not write into the caller's tensor a second time."""
    if not isinstance(value, _Input):
        return value
    tensor = value.holder.value().detach().requires_grad_(value.requires_grad)
    # The clone is also a non-leaf, which autograd lets the block write into.
    return tensor.clone() if value.holder.copied else tensor


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def model_blocks(net: nn.Module) -> list[nn.Module]:
    """The blocks to checkpoint: the first modules under `net` that are not containers, in
    definition order, with parameters.

    Containers are opened because their own forward may never run: ComfyUI's UNet walks the
    layers of each `TimestepEmbedSequential` (an nn.Sequential) itself and calls them one by one.
    """
    blocks = []
    for child in net.children():
        if isinstance(child, _CONTAINERS):
            blocks.extend(model_blocks(child))
        elif any(True for _ in child.parameters()):
            blocks.append(child)
    return blocks


@contextmanager
def training_forward(net: nn.Module, blocks: Iterable[nn.Module] = (),
                     checkpointing: bool = True) -> Iterator[_Forward]:
    """Guard every call of `net` against in-place writes; checkpoint each block but the last
    (blocks in forward order, e.g. `model_blocks(net)`) when `checkpointing`. Restored in `finally`.
    Yields the state, whose `describe()` tells what happened."""
    checkpointed = list(blocks)[:-1] if checkpointing else []
    forward = _Forward(len(checkpointed))
    swaps = [(net, forward.guarded)]
    swaps += [(block, lambda f, b=block: forward.checkpointed(f, b)) for block in checkpointed]
    with swapped_forwards(swaps):
        yield forward
