"""The memory one training step needs, counted before training on fake tensors (docs/memory.md).

`estimate(...)` runs the engine's own training step (`Trainer.step`: adapters injected, the
objective's noise draw, forward under the run's checkpointing, backward, the optimizer step) once
under torch's `FakeTensorMode`: every tensor made has a shape, dtype and device but no memory and
no values, and no multiply runs. The frozen weights stay the real (or fake) ones the model holds;
the mode reads them as fake. A `LiveBytes` dispatch mode on top counts the bytes of every tensor
storage an op makes until it is freed, and its peak: what the step holds above the weights, exact
up to the kernels' own workspace and the allocator's slack. The optimizer's state is made first (one
step of it on zero gradients), so the step runs with it alive, as every step after the first does;
the step counted is the first of a run, which guards against in-place writes (training/checkpointing.py)
and so holds at least what the later ones hold.

What a number needs that fake tensors cannot give:
- values: `.item()`, `.tolist()` and `bool(tensor)` (the loss, the batch draw, the finiteness check)
  read as 0.5 (floats), 0 (integers) and True. So every draw picks image 0: `estimate` trains on a
  batch of `batch_size` copies of the largest latent, the worst batch the data can draw;
- kernels: each op's output is the size its meta function states. Attention through PyTorch's
  `scaled_dot_product_attention` counts as the fused kernel PyTorch picks on the device (flash or
  memory-efficient on CUDA, flash on the CPU): its output and log-sum-exp, never the L×L scores.
  Code that builds the scores itself (ComfyUI's split or sub-quadratic attention) is counted as
  written, since its ops run faked too.

The result splits the peak into what it is made of (`MemoryEstimate`): the frozen weights resident
on the compute device (before the count: each parameter and buffer on that device), the adapters,
their gradients and the optimizer state (storages identified at the end), the activations the
forward pass saved for backward (alive when backward began, less those), and the rest (transient:
attention, casts of offloaded or fp8 weights, recomputation under checkpointing).
"""
from __future__ import annotations

import math
import weakref
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .checkpointing import training_forward
from .config import TrainConfig
from .data import Samples, flatten_latents
from .objective import ModelFns

MIB = 2 ** 20
_SCALAR = torch.ops.aten._local_scalar_dense.default


def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index in (None, device.index))


def _key(t: torch.Tensor) -> int:
    """A storage's identity while it lives (a fake tensor's storage has no data pointer)."""
    return t.untyped_storage()._cdata


class LiveBytes(TorchDispatchMode):
    """Sums the bytes of the tensor storages ops make while it is active, until each is freed, and the peak.

    A storage counts once, from the op that made it until it is freed (a finalizer on the storage).
    One first seen as an op's input was made before (a weight, a latent): it and its views never count.
    With `stub_scalars`, reading a value (`.item()`, `.tolist()`, `bool()`) gives 0.5, 0 or True, as a
    fake tensor has none. With `snapshot`, every allocation and free goes into `log` (+serial, −serial;
    `sizes[serial]` its bytes), with where the peak and each backward pass began, for `alive_at`.
    """

    def __init__(self, stub_scalars: bool = False, snapshot: bool = True, device: torch.device | str | None = None) -> None:
        """`device`: count only storages on that device (default: all)."""
        super().__init__()
        self.device = torch.device(device) if device is not None else None
        self.live: dict[int, tuple[int, int]] = {}  # storage → (serial, bytes): an address is reused once freed
        self.before: set[int] = set()
        self.now = self.peak = self.serial = 0
        self.stub_scalars, self.snapshot = stub_scalars, snapshot
        self.in_backward = False
        self.log: list[int] = []
        self.sizes: dict[int, int] = {}
        self.peak_at = 0  # len(log) when the peak was reached
        self.backward_starts: list[int] = []  # len(log) when each backward pass began

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _SCALAR and self.stub_scalars:
            dtype = args[0].dtype
            return True if dtype == torch.bool else 0.5 if dtype.is_floating_point or dtype.is_complex else 0
        backward = torch._C._current_autograd_node() is not None
        if backward and not self.in_backward:
            self.backward_starts.append(len(self.log))
        self.in_backward = backward
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and _key(t) not in self.live and _key(t) not in self.before:
                self.before.add(_key(t))
                weakref.finalize(t.untyped_storage(), self.before.discard, _key(t))  # its address may be reused
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place op: no new memory (under fake mode, of a weight converted just now)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key in self.live or key in self.before or self.device is not None and not _on(t, self.device):
                    continue
                self.serial += 1
                self.live[key] = (self.serial, storage.nbytes())
                self.now += storage.nbytes()
                if self.snapshot:
                    self.log.append(self.serial)
                    self.sizes[self.serial] = storage.nbytes()
                if self.now > self.peak:
                    self.peak, self.peak_at = self.now, len(self.log)
                weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        serial, nbytes = self.live.pop(key, (0, 0))
        self.now -= nbytes
        if serial and self.snapshot:
            self.log.append(-serial)

    def serial_of(self, t: torch.Tensor) -> int | None:
        """The serial of `t`'s storage, if this count made it and it lives."""
        return self.live.get(_key(t), (None, 0))[0]

    def alive_at(self, at: int) -> set[int]:
        """The serials alive after the first `at` entries of the log."""
        alive: set[int] = set()
        for event in self.log[:at]:
            if event > 0:
                alive.add(event)
            else:
                alive.discard(-event)
        return alive

    def saved_at_peak(self) -> set[int]:
        """Of the storages alive at the peak, those the backward pass of that step began with: saved for it.
        (A peak inside the forward pass: those that live until its backward begins.)"""
        at_peak = self.alive_at(self.peak_at)
        later = [b for b in self.backward_starts if b >= self.peak_at]
        if later:
            freed = {-e for e in self.log[self.peak_at:later[0]] if e < 0}
            return at_peak - freed
        began = max((b for b in self.backward_starts if b < self.peak_at), default=None)
        return at_peak & self.alive_at(began) if began is not None else set()


@dataclass
class MemoryEstimate:
    """One training step's peak memory on the compute device, in bytes, and what it is made of."""

    weights: int  # frozen weights and buffers resident on the compute device
    adapters: int  # the adapters' fp32 master weights
    gradients: int  # their gradients, as held at the peak
    optimizer: int  # the optimizer's state (and the EMA's averages on the device)
    activations: int  # saved by the forward pass for backward, as held at the peak
    transient: int  # everything else at the peak: attention, weight casts, recomputation, the loss
    device: str = "cpu"
    batch: tuple[int, ...] = ()  # the worst batch counted: (batch_size, *latent shape)
    extra: dict[str, int] = field(default_factory=dict)  # the host's additions, e.g. the VAE while previewing

    @property
    def step(self) -> int:
        """The step's own peak, above the weights."""
        return self.adapters + self.gradients + self.optimizer + self.activations + self.transient

    @property
    def total(self) -> int:
        return self.weights + self.step + sum(self.extra.values())

    def as_dict(self) -> dict[str, object]:
        parts = ("weights", "adapters", "gradients", "optimizer", "activations", "transient")
        return {"device": self.device, "batch": list(self.batch), **{f"{p}_mib": getattr(self, p) / MIB for p in parts},
                **{f"{k}_mib": v / MIB for k, v in self.extra.items()}, "step_mib": self.step / MIB,
                "total_mib": self.total / MIB}

    def describe(self) -> str:
        """One line: the total and its parts."""
        parts = [("frozen weights", self.weights), ("adapters", self.adapters), ("gradients", self.gradients),
                 ("optimizer state", self.optimizer), ("saved activations", self.activations),
                 ("transient", self.transient), *self.extra.items()]
        shape = "×".join(str(n) for n in self.batch)
        return (f"{gib(self.total)} on {self.device} at the peak of a step (batch {shape}): "
                + ", ".join(f"{name} {gib(n)}" for name, n in parts))


def gib(n: float) -> str:
    """Bytes for a log line: GiB from 1 GiB, else MiB."""
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / MIB:.0f} MiB" if n >= 10 * MIB else f"{n / MIB:.1f} MiB"


def resident_bytes(net: nn.Module, device: torch.device | str) -> int:
    """The bytes of `net`'s parameters and buffers resting on `device` (each storage once)."""
    device = torch.device(device)
    seen: dict[int, int] = {}
    for t in [*net.parameters(), *net.buffers()]:
        if _on(t, device):
            seen[_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def tensor_bytes(value, device: torch.device | str, seen: set[int] | None = None) -> int:
    """The bytes of the tensors on `device` inside nested dicts, lists, tuples and objects with a tensor
    `cond` attribute (ComfyUI's conditioning wrappers), each storage once."""
    device, seen = torch.device(device), set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        if value.device.type != device.type or _key(value) in seen:
            return 0
        seen.add(_key(value))
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(tensor_bytes(v, device, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, device, seen) for v in value)
    inner = getattr(value, "cond", None)
    return tensor_bytes(inner, device, seen) if isinstance(inner, torch.Tensor) else 0


def worst_batch(images: Sequence[torch.Tensor], samples: Samples | None, batch_size: int) -> Samples:
    """Samples that draw `batch_size` copies of the largest image (the worst batch the data can draw)."""
    largest = max(range(len(images)), key=lambda i: (math.prod(images[i].shape), -i))
    masks = samples.masks if samples is not None else None
    return Samples([[largest]] * batch_size, masks)


def estimate(net: nn.Module, fns: ModelFns, latents: torch.Tensor | Sequence[torch.Tensor], config: TrainConfig, *,
             checkpoint_blocks: Sequence[nn.Module] = (), samples: Samples | None = None,
             device: torch.device | str | None = None, fake: bool = True, steps: int = 1,
             text_encoders: Sequence = ()) -> MemoryEstimate:
    """The peak memory of a training step of `config` on `net` (see the module docstring); `net` is left
    as it was. `fake=False` runs the same steps for real (tests compare the two); `device`: where the
    step computes (default: the latents'); `text_encoders` (loop.py `TextEncoderPart`) train too."""
    from .loop import Trainer, join_text_encoders, lora_config_of  # loop imports this module's users
    from ..lora import inject

    images = flatten_latents(latents)
    device = torch.device(device if device is not None else images[0].device)
    weights = resident_bytes(net, device) + sum(resident_bytes(part.module, device) for part in text_encoders)
    drawn = worst_batch(images, samples, config.batch_size)
    one_step = replace(config, steps=max(config.steps, steps), warmup_steps=0, gradient_accumulation=1,
                       batch_order="random")
    counter = LiveBytes(stub_scalars=fake, device=device)  # only the compute device's memory
    grads: set[int | None] = set()  # serials
    with ExitStack() as stack:
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(counter)
        network = stack.enter_context(inject(net, lora_config_of(config), seed=config.seed, device=images[0].device))
        join_text_encoders(network, text_encoders, config)
        stack.enter_context(training_forward(net, checkpoint_blocks, config.gradient_checkpointing))
        adapters = list(network.parameters())
        handles = [p.register_post_accumulate_grad_hook(lambda p: grads.add(counter.serial_of(p.grad))) for p in adapters]
        trainer = Trainer(network, fns, images, one_step, samples=drawn)
        with torch.no_grad():  # the optimizer's state made first, as every step after the first holds it
            for p in adapters:
                p.grad = torch.zeros_like(p)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        for _ in range(steps):
            trainer.step()
        for handle in handles:
            handle.remove()
        adapter_keys = {counter.serial_of(p) for p in adapters}
        state_keys = {counter.serial_of(t) for s in trainer.optimizer.state.values() for t in tree_flatten(s)[0]
                      if isinstance(t, torch.Tensor)}
        if trainer.ema is not None:  # the EMA's averages (on the device unless ema_on_cpu): kept state, as the optimizer's
            state_keys |= {counter.serial_of(t) for t in trainer.ema.averages}
        del trainer, network, adapters
    return _composition(counter, weights, adapter_keys, grads, state_keys, device,
                        (config.batch_size, *images[drawn.alternatives[0][0]].shape))


def _composition(counter: LiveBytes, weights: int, adapters: set, grads: set, state: set, device: torch.device,
                 batch: tuple[int, ...]) -> MemoryEstimate:
    """The peak's storages (by serial) by kind: adapters, gradients, optimizer state, saved activations, the rest."""
    at_peak = counter.alive_at(counter.peak_at)
    kinds = {"adapters": adapters, "gradients": grads, "optimizer": state}
    sums = {kind: sum(counter.sizes[k] for k in at_peak if k in keys) for kind, keys in kinds.items()}
    known = adapters | grads | state
    activations = sum(counter.sizes[k] for k in counter.saved_at_peak() - known)
    transient = counter.peak - sum(sums.values()) - activations
    return MemoryEstimate(weights, sums["adapters"], sums["gradients"], sums["optimizer"], activations, transient,
                          str(device), batch)


# The levers to try when a step does not fit, cheapest (in time) first: each adds to the ones before.
LEVERS: tuple[tuple[str, object], ...] = (("step_in_backward", True), ("optimizer", "AdamW8bit"),
                                          ("optimizer_on_cpu", True), ("gradient_checkpointing", True),
                                          ("batch_size", 1))


def cheapest_fit(config: TrainConfig, measure, budget: int) -> tuple[list[str], MemoryEstimate | None]:
    """The first settings, along LEVERS, whose step (`measure(config)` → MemoryEstimate; its `step` plus
    its `extra`) fits in `budget` bytes: (the changes, their estimate), or (every change tried, None)."""
    changes: list[str] = []
    for name, value in LEVERS:
        if getattr(config, name) == value or name == "optimizer" and not _eight_bit_fits(config):
            continue
        try:
            candidate = replace(config, **{name: value})
        except ValueError:  # e.g. step_in_backward with clipping: the next lever
            continue
        config = candidate
        changes.append(f"{name} {_setting(value)}")
        found = measure(config)
        if found.step + sum(found.extra.values()) <= budget:
            return changes, found
    return changes, None


def _eight_bit_fits(config: TrainConfig) -> bool:
    """AdamW8bit replaces AdamW or Adam, when bitsandbytes is installed."""
    import importlib.util
    return config.optimizer in ("AdamW", "Adam") and importlib.util.find_spec("bitsandbytes") is not None


def _setting(value: object) -> str:
    return "on" if value is True else "off" if value is False else str(value)
