"""LoHa: the Hadamard product of two low-rank products (Hyeon-Woo et al. 2022, "FedPara"; LyCORIS).

ΔW = (alpha / rank) · (w1a @ w1b) ⊙ (w2a @ w2b), rank up to rank² for the parameters of a rank-2r
LoRA. Keys (ComfyUI `comfy/weight_adapter/loha.py`): `hada_w1_a` (out, r), `hada_w1_b`
(r, in·∏kernel), `hada_w2_a`, `hada_w2_b`, `alpha`. LyCORIS's Tucker form (`hada_t1`/`hada_t2`, off
by default there) is recognised but not trained. Init as LyCORIS: w1b, w2b ~ N(0, 1), w1a ~ N(0, 0.1²),
w2a = 0, so ΔW = 0 at step 0. The Hadamard product has no low-rank way through x, so the training
forward builds ΔW (rank-sized factors, one out×in product) and runs the layer's op on it.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from .base import ALPHA, Algorithm, BaseForward, alpha_of, fp32_param
from .functional import LayerShape, layer_op, loha_delta

W1A, W1B, W2A, W2B = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"
T1, T2 = "hada_t1", "hada_t2"


class Loha(Algorithm):
    NAME = "loha"
    SUFFIXES = (W1A, W1B, W2A, W2B, T1, T2, ALPHA)
    MARKERS = frozenset({W1A, W1B, W2A, W2B, T1, T2})

    def __init__(self, shape: LayerShape, w1a, w1b, w2a, w2b, alpha: float):
        super().__init__(shape, alpha)
        self.hada_w1_a, self.hada_w1_b = nn.Parameter(w1a), nn.Parameter(w1b)
        self.hada_w2_a, self.hada_w2_b = nn.Parameter(w2a), nn.Parameter(w2b)

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
        parts = [fp32_param(tensors[k].flatten(1), device).data for k in (W1A, W1B, W2A, W2B)]
        return cls(shape, *parts, alpha_of(tensors, tensors[W1B].shape[0]))

    @classmethod
    def check(cls, shape, tensors, fail) -> None:
        if T1 in tensors or T2 in tensors:
            key = T1 if T1 in tensors else T2
            raise ValueError(f"{key}: LyCORIS's Tucker-form LoHa cannot be continued here (ComfyUI loads it); "
                             "train a new LoHa")
        missing = [k for k in (W1A, W1B, W2A, W2B) if k not in tensors]
        if missing:
            raise ValueError(f"LoHa tensors {', '.join(missing)} missing; the file is incomplete")
        flat_in = shape.inp * math.prod(shape.kernel)
        rank = tensors[W1B].shape[0]
        for key, need in ((W1A, (shape.out, rank)), (W1B, (rank, flat_in)),
                          (W2A, (shape.out, tensors[W2B].shape[0])), (W2B, (tensors[W2A].shape[1], flat_in))):
            if tuple(tensors[key].flatten(1).shape) != need:
                raise fail(key, tensors[key].shape, need)

    @classmethod
    def delta(cls, tensors: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        """ΔW = (alpha / rank) · (w1a @ w1b) ⊙ (w2a @ w2b), rank = w1b's rows."""
        w1a, w1b, w2a, w2b = (tensors[k].float().flatten(1) for k in (W1A, W1B, W2A, W2B))
        return loha_delta(w1a, w1b, w2a, w2b, alpha_of(tensors, w1b.shape[0]) / w1b.shape[0], tuple(weight.shape))

    def weight_delta(self) -> torch.Tensor:
        return loha_delta(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b,
                          self.alpha / self.rank, self.shape.weight_shape)

    def run(self, base_forward: BaseForward, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        bias = bias.to(x.dtype) if bias is not None else None
        return base_forward(x) + layer_op(self.shape, x, self.weight_delta().to(x.dtype), bias)

    def export(self) -> dict[str, torch.Tensor]:
        return {W1A: self.hada_w1_a.detach(), W1B: self.hada_w1_b.detach(),
                W2A: self.hada_w2_a.detach(), W2B: self.hada_w2_b.detach(), ALPHA: self._alpha_tensor()}
