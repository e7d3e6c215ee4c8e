"""Data-parallel training over torch.distributed: which share of a batch this process trains, and
the collectives that keep every process's step identical.

Launched by `torchrun` (or any launcher that initialises the default process group), N processes
train one LoRA. Every process draws the same seeded global batch, its noise, noise levels and caption
dropout exactly as a single process would (one generator, same seed), and runs the model forward and
backward on its share of each same-shape group only: rows rank, rank + N, rank + 2N… Each share's
loss is its rows' sum divided by the whole group's size, so the sum over processes is the batch mean
a single process computes; one all-reduce (sum) of the flattened adapter gradients per optimizer
step then gives every process the single-process gradient (up to float summation order), and each
applies the same optimizer step. The step's loss is summed the same way, so the finiteness check,
clipping and the loss curve agree on every process, and all stop together on a NaN. A cancel on any
process cancels all (`any_rank`).

Without an initialised process group of more than one process, `current()` is None and training is
exactly single-process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """This process's place among `world` data-parallel processes."""

    rank: int
    world: int

    def rows(self, n: int) -> list[int]:
        """The rows of an n-row group this process trains (may be none when n < world)."""
        return list(range(self.rank, n, self.world))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and reports progress."""
        return self.rank == 0


def current() -> Shard | None:
    """This process's shard when torch.distributed runs with more than one process, else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Shard(dist.get_rank(), dist.get_world_size())


def is_main() -> bool:
    """True on rank 0 and in a single process."""
    shard = current()
    return shard is None or shard.is_main


def _reduce_device(tensors: Sequence[torch.Tensor]) -> torch.device:
    """NCCL reduces on the GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return tensors[0].device if tensors and tensors[0].is_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_gradients(params: Sequence[torch.Tensor]) -> None:
    """Sum every parameter's gradient over the processes, in one flat all-reduce; a parameter without a
    gradient on a process (its share had no rows that reach it) counts as zeros there and gets the sum."""
    if not params:
        return
    device = _reduce_device([p for p in params])
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(device, torch.float32)
                      for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.device, p.dtype)
        offset += n


def sum_over_ranks(value: float) -> float:
    """A float summed over the processes (the step's loss shares)."""
    device = _reduce_device([])
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def any_rank(flag: bool) -> bool:
    """True on every process when it is true on any (a cancel)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_reduce_device([]))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
