"""The adapter maths as small pure functions on tensors (the way LyCORIS's `functional/` does it).

Every function takes the trained factors and returns a weight difference ΔW in the base weight's
layout `(out, in, *kernel)`, or runs a layer's op on given tensors. Sources: Hu et al. 2021 (LoRA),
Hyeon-Woo et al. 2022 (FedPara, "LoHa"), Yeh et al. 2024 (LyCORIS, LoKr) and Liu et al. 2024
(DoRA); file layouts as ComfyUI core reads them (`comfy/weight_adapter/`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LayerShape(NamedTuple):
    """What an adapter needs of a Linear or ungrouped ConvNd layer: its shapes and conv settings.

    Read from the layer's own attributes (`in_features`, `kernel_size`, ...), never from its weight
    tensor, which under ComfyUI's offloading may live elsewhere or be fp8 / GGUF.
    """

    out: int
    inp: int
    kernel: tuple[int, ...] = ()  # () for Linear
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out, self.inp, *self.kernel)

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel)


def layer_op(shape: LayerShape, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's own op on other tensors: F.linear, or F.convNd with its stride, padding and dilation.

    A padding_mode other than "zeros" pads with F.pad first, as nn.ConvNd does.
    """
    if not shape.is_conv:
        return F.linear(x, weight, bias)
    conv = _CONVS[len(shape.kernel)]
    padding = shape.padding
    if shape.padding_mode != "zeros":
        pads = [p for p in reversed(padding) for _ in range(2)]
        x, padding = F.pad(x, pads, mode=shape.padding_mode), 0
    return conv(x, weight, bias, shape.stride, padding, shape.dilation)


def pointwise_op(shape: LayerShape, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 1×1 projection over the channel dim (F.linear, or a 1×1 F.convNd): the `up` op of LoRA."""
    if not shape.is_conv:
        return F.linear(x, weight, bias)
    return _CONVS[len(shape.kernel)](x, weight, bias)


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · up @ down, in the base weight's layout (out, in[, *kernel]).

    down: (rank, in[, *kernel]); up: (out, rank[, 1, ...]).
    """
    delta = up.flatten(1) @ down.flatten(1)
    return (scale * delta).reshape(up.shape[0], *down.shape[1:])


def loha_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float,
               weight_shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b), reshaped to `weight_shape` (the Hadamard product of two
    rank-r products: rank up to r²). w1a, w2a: (out, r); w1b, w2b: (r, in·∏kernel)."""
    return (scale * (w1a @ w1b) * (w2a @ w2b)).reshape(weight_shape)


def tucker_rebuild(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W[p, q, *k] = Σ_ij core[i, j, *k] · a[i, p] · b[j, q]: a Tucker core times a factor on each of its
    first two modes (LyCORIS's `use_tucker` conv forms; ComfyUI's einsum "i j k l, j r, i p -> p r k l").

    core: (ra, rb, *kernel); a: (ra, out); b: (rb, in) → (out, in, *kernel).
    """
    return torch.einsum("ij...,ip,jq->pq...", core, a, b)


def loha_tucker_delta(t1: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, t2: torch.Tensor, w2a: torch.Tensor,
                      w2b: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · T(t1, w1a, w1b) ⊙ T(t2, w2a, w2b), T = `tucker_rebuild` (LyCORIS's Tucker LoHa).

    t1, t2: (r, r, *kernel); w1a, w2a: (r, out); w1b, w2b: (r, in) → (out, in, *kernel).
    """
    return scale * tucker_rebuild(t1, w1a, w1b) * tucker_rebuild(t2, w2a, w2b)


def locon_tucker_delta(down: torch.Tensor, mid: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW[o, i, *k] = scale · Σ_rs up[o, r] · mid[r, s, *k] · down[s, i] (LyCORIS's LoCon with `lora_mid`).

    down: (r, in, 1, ...); mid: (r, r, *kernel); up: (out, r, 1, ...) → (out, in, *kernel).
    """
    return scale * tucker_rebuild(mid, up.flatten(1).T, down.flatten(1))


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW = scale · w1 ⊗ w2 (Kronecker product), reshaped to `weight_shape`.

    w1: (out_a, in_a); w2: (out_b, in_b·∏kernel) or (out_b, in_b, *kernel), with out = out_a·out_b and
    in = in_a·in_b. The flat and the kernel-shaped w2 give the same element order.
    """
    w2 = w2.flatten(1)
    return (scale * torch.kron(w1, w2)).reshape(weight_shape)


def lokr_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """(w1 ⊗ w2) x for a Linear layer without building w1 ⊗ w2: y[i·b+p] = Σ w1[i,j] w2[p,q] x[j·d+q],
    i.e. (A ⊗ B) vec(X) = vec(A X Bᵀ) on x reshaped to X (in_a, in_b): two small matmuls.

    x: (..., in_a·in_b) → (..., out_a·out_b). (A three-operand einsum is no substitute: without
    opt_einsum torch contracts left to right, and w1, w2 first is the full out×in product.)
    """
    x = x.unflatten(-1, (w1.shape[1], w2.shape[1]))
    return ((scale * w1) @ (x @ w2.T)).flatten(-2)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension, m ≤ n and m as close to √dimension as allowed; with factor > 0,
    m ≤ factor (m = factor if it divides the dimension), as LyCORIS's LoKr splits a layer's dims."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    limit = math.isqrt(dimension) if factor <= 0 else min(factor, math.isqrt(dimension))
    m = next(d for d in range(max(limit, 1), 0, -1) if dimension % d == 0)
    return m, dimension // m


def dora_on_output(magnitude: torch.Tensor, weight_shape: tuple[int, ...]) -> bool:
    """Whether a `dora_scale` holds one magnitude per output row, (out, 1, ...) (LyCORIS's default,
    `wd_on_output=True`), rather than one per input channel, (1, in, ...). ComfyUI's rule is "its first
    dim equals the weight's" (comfy/weight_adapter/base.py, weight_decompose); we also ask for a second
    dim of 1, which only differs for a layer with one output, where ComfyUI misreads (1, in)."""
    return magnitude.shape[0] == weight_shape[0] and (magnitude.dim() < 2 or magnitude.shape[1] == 1)


def dora_column_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ per input channel: the norm over every dim but dim 1, shape (1, in, 1, ...)."""
    norm = weight.transpose(0, 1).flatten(1).norm(dim=1)
    return norm.reshape(1, -1, *[1] * (weight.dim() - 2))


def dora_row_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ per output row: the norm over every dim but dim 0, shape (out, 1, 1, ...)."""
    return weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W' as ComfyUI's `weight_decompose` builds it (Liu et al. 2024, eq. 5), for both orientations:

    - magnitude (1, in, 1, ...): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm per input channel;
    - magnitude (out, 1, ...):   W' = m ⊙ (W + ΔW) / ‖W‖, the norm per output row of the *base*
      weight. That is what ComfyUI computes today; LyCORIS and the paper divide by ‖W + ΔW‖ there
      too (ComfyUI PR #15458, open, would change it). We follow the loader the file is used in.

    weight, delta: (out, in, *kernel). The eps is the one ComfyUI adds.
    """
    merged = weight + delta
    eps = torch.finfo(weight.dtype).eps
    if dora_on_output(magnitude, tuple(weight.shape)):
        return merged * (magnitude.reshape(-1, *[1] * (weight.dim() - 1)) / (dora_row_norm(weight) + eps))
    return merged * (magnitude / (dora_column_norm(merged) + eps))
