"""LoKr: a Kronecker product of two small matrices (Yeh et al. 2024, "Navigating Text-To-Image
Customization: From LyCORIS Fine-Tuning to Model Evaluation").

ΔW = scale · w1 ⊗ w2 with w1 (out_a, in_a) and w2 (out_b, in_b·∏kernel), out = out_a·out_b and
in = in_a·in_b, split by `factorization(dim, factor)`. w1 or w2 may be stored whole (`lokr_w1`,
`lokr_w2`) or as a low-rank product (`lokr_w1_a` @ `lokr_w1_b`, `lokr_w2_a` @ `lokr_w2_b`). As in
ComfyUI's loader (`comfy/weight_adapter/lokr.py`), scale = alpha / rank of the decomposed part (w2's
when both are), and 1 when neither is. We train w1 whole and w2 as a rank-r product when r is below
half of w2's larger dim (LyCORIS's rule), else whole; w2's last factor starts at 0, so ΔW = 0.
A Linear runs (w1 ⊗ w2)x as w1·X·w2ᵀ on x reshaped to (in_a, in_b), never building ΔW; a conv builds
ΔW (small factors, one out×in·k product) and runs the layer's op on it.

LyCORIS's Tucker form (`use_tucker`, conv layers; we never create it) stores w2 as `lokr_t2`
(r, r, *kernel) with `lokr_w2_a` (r, out_b) and `lokr_w2_b` (r, in_b):
w2[p, q, *k] = Σ_ij t2[i, j, *k] · w2_a[i, p] · w2_b[j, q] (`functional.tucker_rebuild`, as ComfyUI),
scale = alpha / r. It is loaded, continued (building ΔW, as every conv LoKr) and written back as it came.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from .base import ALPHA, Algorithm, BaseForward, channel_bias, effective_alpha, fp32_param, random_tensor
from .functional import LayerShape, factorization, layer_op, lokr_delta, lokr_linear, tucker_rebuild

W1, W1A, W1B, W2, W2A, W2B, T2 = "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"
_TENSORS = (W1, W1A, W1B, W2, W2A, W2B, T2)


class Lokr(Algorithm):
    NAME = "lokr"
    SUFFIXES = (*_TENSORS, ALPHA)
    MARKERS = frozenset(_TENSORS)

    def __init__(self, shape: LayerShape, parts: Mapping[str, torch.Tensor], alpha: float):
        super().__init__(shape, alpha)
        self.parts = nn.ParameterDict({k: nn.Parameter(v) for k, v in parts.items()})

    @classmethod
    def create(cls, shape, options, generator, device, weight) -> Lokr:
        out_a, out_b = factorization(shape.out, options.factor)
        in_a, in_b = factorization(shape.inp, options.factor)
        flat_b, r = in_b * math.prod(shape.kernel), options.rank
        parts = {W1: random_tensor((out_a, in_a), generator, options.init, r)}
        if r < max(out_b, flat_b) / 2:
            parts[W2A] = random_tensor((out_b, r), generator, options.init, r)
            parts[W2B] = torch.zeros(r, flat_b)
        else:
            parts[W2] = torch.zeros(out_b, flat_b)
        return cls(shape, {k: v.to(device) for k, v in parts.items()}, options.alpha)

    @classmethod
    def load(cls, shape, tensors, device, weight) -> Lokr:
        parts = {k: fp32_param(tensors[k], device).data for k in _TENSORS if k in tensors}
        alpha = float(tensors[ALPHA]) if ALPHA in tensors else 0.0
        return cls(shape, parts, alpha)

    @classmethod
    def check(cls, shape, tensors, fail) -> None:
        for whole, a, b in ((W1, W1A, W1B), (W2, W2A, W2B)):
            if whole not in tensors and not (a in tensors and b in tensors):
                raise ValueError(f"LoKr: neither {whole} nor both {a} and {b}; the file is incomplete")
        if T2 in tensors:
            _check_tucker(shape, tensors, fail)
            return
        w1, w2 = _factors(tensors)
        need = shape.out * shape.inp * math.prod(shape.kernel)
        if w1.dim() != 2 or w1.numel() * w2.numel() != need or shape.out % w1.shape[0] or shape.inp % w1.shape[1]:
            raise fail(W1 if W1 in tensors else W1A, w1.shape, f"a split of {shape.weight_shape}")

    @classmethod
    def delta(cls, tensors: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        """ΔW = scale · w1 ⊗ w2, w = w_a @ w_b where decomposed, scale as in the module docstring."""
        w1, w2 = _factors({k: t.float() for k, t in tensors.items()})
        return lokr_delta(w1, w2, _scale(tensors), tuple(weight.shape))

    def _w(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _factors(dict(self.parts))

    def weight_delta(self) -> torch.Tensor:
        w1, w2 = self._w()
        return lokr_delta(w1, w2, _scale({**self.parts, ALPHA: self._alpha_tensor()}), self.shape.weight_shape)

    def run(self, base_forward: BaseForward, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = base_forward(x)
        if self.shape.is_conv:
            h = layer_op(self.shape, x, self.weight_delta().to(x.dtype))
        else:
            w1, w2 = self._w()
            scale = _scale({**self.parts, ALPHA: self._alpha_tensor()})
            h = lokr_linear(x, w1.to(x.dtype), w2.flatten(1).to(x.dtype), scale)
        return out + channel_bias(h, self.shape, bias)

    def export(self) -> dict[str, torch.Tensor]:
        return {**{k: p.detach() for k, p in self.parts.items()}, ALPHA: self._alpha_tensor()}


def _factors(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1, w2): whole, a low-rank product, or (w2) the Tucker rebuild (out_b, in_b, *kernel)."""
    w1 = t[W1] if W1 in t else t[W1A] @ t[W1B]
    if W2 in t:
        w2 = t[W2]
    elif T2 in t:
        w2 = tucker_rebuild(t[T2], t[W2A], t[W2B])
    else:
        w2 = t[W2A] @ t[W2B].flatten(1)
    return w1, w2


def _check_tucker(shape: LayerShape, t: Mapping[str, torch.Tensor], fail) -> None:
    """Tucker LoKr fits conv layers: w1 (out_a, in_a), w2_a (r, out_b), w2_b (r, in_b), t2 (r, r, *kernel),
    out = out_a·out_b, in = in_a·in_b."""
    if not shape.is_conv:
        raise fail(T2, t[T2].shape, "no lokr_t2 (the Tucker form is for conv layers; this one is a Linear)")
    if W2 in t:
        raise ValueError(f"LoKr: {T2} with {W2}; the Tucker core needs {W2A} and {W2B} instead, the file is damaged")
    w1 = t[W1] if W1 in t else t[W1A] @ t[W1B]
    a, b = t[W2A], t[W2B]
    if w1.dim() != 2 or shape.out % w1.shape[0] or shape.inp % w1.shape[1]:
        raise fail(W1 if W1 in t else W1A, w1.shape, f"a split of {shape.weight_shape}")
    out_b, in_b = shape.out // w1.shape[0], shape.inp // w1.shape[1]
    for key, need in ((W2A, (a.shape[0], out_b)), (W2B, (b.shape[0], in_b)), (T2, (a.shape[0], b.shape[0], *shape.kernel))):
        if tuple(t[key].shape) != need:
            raise fail(key, t[key].shape, need)


def _scale(t: Mapping[str, torch.Tensor]) -> float:
    """alpha / rank of w2's product, else of w1's, else 1 (ComfyUI's rule; `effective_alpha`)."""
    rank = t[W2B].shape[0] if W2 not in t else (t[W1B].shape[0] if W1 not in t else None)
    if rank is None or ALPHA not in t:
        return 1.0
    return effective_alpha(float(t[ALPHA]), rank) / rank
