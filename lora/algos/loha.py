"""LoHa: the Hadamard product of two low-rank products (Hyeon-Woo et al. 2022, "FedPara"; LyCORIS).

ΔW = (alpha / rank) · (w1a @ w1b) ⊙ (w2a @ w2b), rank up to rank² for the parameters of a rank-2r
LoRA. Keys (ComfyUI `comfy/weight_adapter/loha.py`): `hada_w1_a` (out, r), `hada_w1_b`
(r, in·∏kernel), `hada_w2_a`, `hada_w2_b`, `alpha`. Init as LyCORIS: w1b, w2b ~ N(0, 1),
w1a ~ N(0, 0.1²), w2a = 0, so ΔW = 0 at step 0.

LyCORIS's Tucker form (`use_tucker`, conv layers; we never create it) adds `hada_t1`, `hada_t2`
(r, r, *kernel) and stores w1a, w2a as (r, out) and w1b, w2b as (r, in):
ΔW = (alpha / r) · T(t1, w1a, w1b) ⊙ T(t2, w2a, w2b), T(t, a, b)[p, q] = Σ_ij t[i, j] a[i, p] b[j, q]
(`functional.tucker_rebuild`, as ComfyUI's loader). It is loaded, continued and written back as it came.

The Hadamard product has no low-rank way through x, so the training forward builds ΔW (rank-sized
factors, one out×in·∏kernel product; the Tucker form too) and runs the layer's op on it.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from .base import ALPHA, Algorithm, BaseForward, alpha_of, fp32_param
from .functional import LayerShape, layer_op, loha_delta, loha_tucker_delta

W1A, W1B, W2A, W2B = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"
T1, T2 = "hada_t1", "hada_t2"


class Loha(Algorithm):
    NAME = "loha"
    SUFFIXES = (W1A, W1B, W2A, W2B, T1, T2, ALPHA)
    MARKERS = frozenset({W1A, W1B, W2A, W2B, T1, T2})

    def __init__(self, shape: LayerShape, w1a, w1b, w2a, w2b, alpha: float, t1=None, t2=None):
        super().__init__(shape, alpha)
        self.hada_w1_a, self.hada_w1_b = nn.Parameter(w1a), nn.Parameter(w1b)
        self.hada_w2_a, self.hada_w2_b = nn.Parameter(w2a), nn.Parameter(w2b)
        self.hada_t1 = nn.Parameter(t1) if t1 is not None else None
        self.hada_t2 = nn.Parameter(t2) if t2 is not None else None

    @property
    def rank(self) -> int:
        return self.hada_w1_b.shape[0]

    @classmethod
    def create(cls, shape, options, generator, device, weight) -> Loha:
        r, flat_in = options.rank, shape.inp * math.prod(shape.kernel)

        def normal(rows: int, cols: int, std: float) -> torch.Tensor:
            return torch.empty(rows, cols).normal_(0.0, std, generator=generator).to(device)

        w1b, w1a = normal(r, flat_in, 1.0), normal(shape.out, r, 0.1)
        w2b, w2a = normal(r, flat_in, 1.0), torch.zeros(shape.out, r, device=device)
        return cls(shape, w1a, w1b, w2a, w2b, options.alpha)

    @classmethod
    def load(cls, shape, tensors, device, weight) -> Loha:
        tucker = T1 in tensors
        # Without Tucker cores the factors are matrices (a conv's w_b flattened); with them, as stored.
        parts = [fp32_param(tensors[k] if tucker else tensors[k].flatten(1), device).data for k in (W1A, W1B, W2A, W2B)]
        cores = [fp32_param(tensors[k], device).data for k in (T1, T2)] if tucker else [None, None]
        return cls(shape, *parts, alpha_of(tensors, tensors[W1B].shape[0]), *cores)

    @classmethod
    def check(cls, shape, tensors, fail) -> None:
        missing = [k for k in (W1A, W1B, W2A, W2B) if k not in tensors]
        if (T1 in tensors) != (T2 in tensors):
            missing.append(T2 if T1 in tensors else T1)
        if missing:
            raise ValueError(f"LoHa tensors {', '.join(missing)} missing; the file is incomplete")
        if T1 in tensors:
            _check_tucker(shape, tensors, fail)
            return
        flat_in = shape.inp * math.prod(shape.kernel)
        rank = tensors[W1B].shape[0]
        for key, need in ((W1A, (shape.out, rank)), (W1B, (rank, flat_in)),
                          (W2A, (shape.out, tensors[W2B].shape[0])), (W2B, (tensors[W2A].shape[1], flat_in))):
            if tuple(tensors[key].flatten(1).shape) != need:
                raise fail(key, tensors[key].shape, need)

    @classmethod
    def delta(cls, tensors: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        """ΔW = (alpha / rank) · (w1a @ w1b) ⊙ (w2a @ w2b), rank = w1b's rows; with Tucker cores
        (alpha / rank) · T(t1, w1a, w1b) ⊙ T(t2, w2a, w2b) (module docstring)."""
        t = {k: v.float() for k, v in tensors.items()}
        rank = t[W1B].shape[0]
        scale = alpha_of(tensors, rank) / rank
        if T1 in t:
            return loha_tucker_delta(t[T1], t[W1A], t[W1B], t[T2], t[W2A], t[W2B], scale).reshape(weight.shape)
        w1a, w1b, w2a, w2b = (t[k].flatten(1) for k in (W1A, W1B, W2A, W2B))
        return loha_delta(w1a, w1b, w2a, w2b, scale, tuple(weight.shape))

    def weight_delta(self) -> torch.Tensor:
        scale = self.alpha / self.rank
        if self.hada_t1 is not None:
            return loha_tucker_delta(self.hada_t1, self.hada_w1_a, self.hada_w1_b, self.hada_t2, self.hada_w2_a,
                                     self.hada_w2_b, scale)
        return loha_delta(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, scale,
                          self.shape.weight_shape)

    def run(self, base_forward: BaseForward, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        bias = bias.to(x.dtype) if bias is not None else None
        return base_forward(x) + layer_op(self.shape, x, self.weight_delta().to(x.dtype), bias)

    def export(self) -> dict[str, torch.Tensor]:
        cores = {T1: self.hada_t1.detach(), T2: self.hada_t2.detach()} if self.hada_t1 is not None else {}
        return {W1A: self.hada_w1_a.detach(), W1B: self.hada_w1_b.detach(),
                W2A: self.hada_w2_a.detach(), W2B: self.hada_w2_b.detach(), **cores, ALPHA: self._alpha_tensor()}


def _check_tucker(shape: LayerShape, tensors: Mapping[str, torch.Tensor], fail) -> None:
    """Tucker LoHa fits conv layers: w_a (ra, out), w_b (rb, in), t (ra, rb, *kernel), for 1 and 2."""
    if not shape.is_conv:
        raise fail(T1, tensors[T1].shape, "no hada_t1 (the Tucker form is for conv layers; this one is a Linear)")
    for a, b, t in ((W1A, W1B, T1), (W2A, W2B, T2)):
        ra, rb = tensors[a].shape[0], tensors[b].shape[0]
        for key, need in ((a, (ra, shape.out)), (b, (rb, shape.inp)), (t, (ra, rb, *shape.kernel))):
            if tuple(tensors[key].shape) != need:
                raise fail(key, tensors[key].shape, need)
