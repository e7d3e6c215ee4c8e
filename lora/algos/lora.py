"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

LoRA adds `h(x) = scale · up(down(x))`, `scale = alpha / rank`: for Linear, down is (rank, in) and
up (out, rank); for ConvNd, down is a conv with the layer's kernel, stride, padding and dilation
into `rank` channels and up a 1×1 conv back to `out` (kohya-ss `networks/lora.py`, the "LoCon" conv
form). Keys: `lora_down.weight`, `lora_up.weight`, `alpha`.

LyCORIS's Tucker LoCon (`use_tucker`, conv layers only) adds `lora_mid.weight` (rank, rank, *kernel):
down is then a 1×1 conv (rank, in, 1, ...), mid a conv with the layer's kernel, stride, padding and
dilation, up a 1×1 conv; ΔW[o, i] = scale · Σ up[o, r] · mid[r, s] · down[s, i] (ComfyUI
`comfy/weight_adapter/lora.py`). It is loaded, continued and written back as it came; we never create it.

DoRA adds `dora_scale`, the magnitude m, in one of two orientations (ComfyUI's `weight_decompose`
reads both, telling them apart by the first dim):
- per input channel, (1, in, 1, ...), what we create (LyCORIS `wd_on_out=False`):
  W' = m ⊙ (W + ΔW) / ‖W + ΔW‖. The factor s = m/‖·‖ is per input channel, so W'x = (W + ΔW)(s ⊙ x):
  training runs `base(s⊙x) + lora(s⊙x)`, no full-size weight in the graph. The norm needs W + ΔW
  once per step; it is computed without grad and treated as a constant (the paper's memory-saving
  variant, section 4.3), so the backward keeps no full-size tensor either. m starts at ‖W‖, so W' = W.
- per output row, (out, 1, ...), LyCORIS's default (`wd_on_out=True`), continued from such files:
  W' = m ⊙ (W + ΔW) / ‖W‖ as ComfyUI computes it (see functional.dora_weight). With s = m/‖W‖ per
  output row, W'x = s ⊙ (Wx + ΔWx): training runs `base(x) + (s − 1) ⊙ Wx + s ⊙ lora(x)`, one extra
  pass of the layer's op on W (no bias) and no full-size tensor built.
The file's orientation is kept on export.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import nn

from .base import (ALPHA, AlgoOptions, Algorithm, BaseForward, alpha_of, channel_bias, channel_scale, fp32_param,
                   random_tensor)
from .functional import (LayerShape, dora_column_norm, dora_on_output, dora_row_norm, dora_weight, layer_op,
                         locon_tucker_delta, lora_delta, pointwise_op)

DOWN = "lora_down.weight"
UP = "lora_up.weight"
MID = "lora_mid.weight"
DORA_SCALE = "dora_scale"


class Lora(Algorithm):
    """`scale · up(down(x))` (or `scale · up(mid(down(x)))`, the Tucker form) for one Linear or Conv layer."""

    NAME = "lora"
    SUFFIXES = (DOWN, UP, MID, ALPHA)
    MARKERS = frozenset({DOWN, UP})
    rank_hook: Callable[[torch.Tensor], torch.Tensor] | None = None  # training-time dropout on the rank-wide activation

    def __init__(self, shape: LayerShape, down: torch.Tensor, up: torch.Tensor, alpha: float,
                 mid: torch.Tensor | None = None):
        super().__init__(shape, alpha)
        self.lora_down = nn.Parameter(down)
        self.lora_up = nn.Parameter(up)
        self.lora_mid = nn.Parameter(mid) if mid is not None else None

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def create(cls, shape: LayerShape, options: AlgoOptions, generator: torch.Generator,
               device: torch.device, weight: Callable[[], torch.Tensor]) -> Lora:
        """down random (kaiming-uniform as nn.Linear, or normal 1/rank), up zeros: ΔW starts at 0."""
        down = random_tensor((options.rank, shape.inp, *shape.kernel), generator, options.init, options.rank)
        up = torch.zeros((shape.out, options.rank, *[1] * len(shape.kernel)), dtype=torch.float32)
        return cls(shape, down.to(device), up.to(device), options.alpha)

    @classmethod
    def load(cls, shape: LayerShape, tensors: Mapping[str, torch.Tensor], device: torch.device,
             weight: Callable[[], torch.Tensor]) -> Lora:
        ones = [1] * len(shape.kernel)
        mid = tensors.get(MID)
        down = tensors[DOWN].reshape(-1, shape.inp, *(ones if mid is not None else shape.kernel))
        up = tensors[UP].reshape(shape.out, down.shape[0], *ones)
        return cls(shape, fp32_param(down, device).data, fp32_param(up, device).data,
                   alpha_of(tensors, down.shape[0]), fp32_param(mid, device).data if mid is not None else None)

    @classmethod
    def check(cls, shape, tensors, fail) -> None:
        down, up, mid = tensors[DOWN], tensors[UP], tensors.get(MID)
        ones = (1,) * len(shape.kernel)
        if mid is not None:
            _check_mid(shape, down, mid, fail)
        elif down.shape[1:] != shape.weight_shape[1:] and not _flat_conv_down(shape, down):
            raise fail(DOWN, down.shape, f"(rank, {', '.join(map(str, shape.weight_shape[1:]))})")
        if up.shape[0] != shape.out or up.shape[1] != down.shape[0] or any(d != 1 for d in up.shape[2:]):
            raise fail(UP, up.shape, f"({shape.out}, {down.shape[0]}" + ", 1" * len(ones) + ")")

    @classmethod
    def delta(cls, tensors: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        """ΔW = (alpha / rank) · up @ down; with `lora_mid`, (alpha / rank) · Σ up[o,r] mid[r,s] down[s,i]."""
        down, up = tensors[DOWN].float(), tensors[UP].float()
        scale = alpha_of(tensors, down.shape[0]) / down.shape[0]
        if MID in tensors:
            return locon_tucker_delta(down, tensors[MID].float(), up, scale).reshape(weight.shape)
        return lora_delta(down, up, scale).reshape(weight.shape)

    def contribution(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """scale·up(down(x)) + bias (with mid: scale·up(mid(down(x)))). The scale is applied to the
        rank-wide intermediate and the bias rides in the `up` op, so no extra full-size pass is spent on
        either. With mid, down is 1×1 and mid carries the layer's stride/padding (a 1×1 op commutes
        with every padding mode)."""
        down, up = self.lora_down.to(x.dtype), self.lora_up.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
        if self.lora_mid is None:
            h = layer_op(self.shape, x, down)
        else:
            h = layer_op(self.shape, pointwise_op(self.shape, x, down), self.lora_mid.to(x.dtype))
        if self.rank_hook is not None:
            h = self.rank_hook(h)
        if self.scale != 1.0:
            h = h * self.scale
        return pointwise_op(self.shape, h, up, bias)

    def run(self, base_forward: BaseForward, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return base_forward(x) + self.contribution(x, bias)

    def export(self) -> dict[str, torch.Tensor]:
        mid = {MID: self.lora_mid.detach()} if self.lora_mid is not None else {}
        return {DOWN: self.lora_down.detach(), UP: self.lora_up.detach(), **mid, ALPHA: self._alpha_tensor()}

    def weight_delta(self) -> torch.Tensor:
        if self.lora_mid is not None:
            return locon_tucker_delta(self.lora_down, self.lora_mid, self.lora_up, self.scale)
        return lora_delta(self.lora_down, self.lora_up, self.scale)


def _check_mid(shape: LayerShape, down: torch.Tensor, mid: torch.Tensor, fail) -> None:
    """The Tucker form fits conv layers only: down (r, in, 1, ...), mid (r, r, *kernel)."""
    if not shape.is_conv:
        raise fail(MID, mid.shape, "no lora_mid (the Tucker form is for conv layers; this one is a Linear)")
    ones = (1,) * len(shape.kernel)
    rank = down.shape[0]
    if tuple(down.shape[1:]) != (shape.inp, *ones):
        raise fail(DOWN, down.shape, f"(rank, {shape.inp}" + ", 1" * len(ones) + ") with lora_mid")
    if tuple(mid.shape) != (rank, rank, *shape.kernel):
        raise fail(MID, mid.shape, (rank, rank, *shape.kernel))


def _flat_conv_down(shape: LayerShape, down: torch.Tensor) -> bool:
    """A conv layer's down flattened to (rank, in·k…), as ComfyUI core's TrainLoraNode saves it; `load`
    reshapes it to the kernel's form (the same values in the same order)."""
    return bool(shape.kernel) and down.dim() == 2 and down.shape[1] == math.prod(shape.weight_shape[1:])


class Dora(Lora):
    """LoRA (plain or Tucker) with a trained magnitude per input channel or per output row (see the
    module docstring)."""

    NAME = "dora"
    SUFFIXES = (DOWN, UP, MID, ALPHA, DORA_SCALE)
    MARKERS = frozenset({DORA_SCALE})
    READS_WEIGHT = True

    def __init__(self, shape: LayerShape, down: torch.Tensor, up: torch.Tensor, alpha: float,
                 magnitude: torch.Tensor, weight: Callable[[], torch.Tensor], mid: torch.Tensor | None = None):
        super().__init__(shape, down, up, alpha, mid)
        self.dora_scale = nn.Parameter(magnitude)
        self._weight = weight  # fetches the base weight (the model's, not ours) for the norm

    @property
    def on_output(self) -> bool:
        """One magnitude per output row (LyCORIS's default) rather than per input channel."""
        return dora_on_output(self.dora_scale, self.shape.weight_shape)

    @classmethod
    def create(cls, shape, options, generator, device, weight) -> Dora:
        lora = Lora.create(shape, options, generator, device, weight)
        with torch.no_grad():
            magnitude = dora_column_norm(weight().to(device, torch.float32))
        return cls(shape, lora.lora_down.data, lora.lora_up.data, lora.alpha, magnitude, weight)

    @classmethod
    def load(cls, shape, tensors, device, weight) -> Dora:
        lora = Lora.load(shape, tensors, device, weight)
        mid = lora.lora_mid.data if lora.lora_mid is not None else None
        magnitude = fp32_param(tensors[DORA_SCALE], device).data  # its shape (orientation) as the file has it
        return cls(shape, lora.lora_down.data, lora.lora_up.data, lora.alpha, magnitude, weight, mid)

    @classmethod
    def check(cls, shape, tensors, fail) -> None:
        super().check(shape, tensors, fail)
        ones = (1,) * len(shape.kernel)
        per_input, per_output = (1, shape.inp, *ones), (shape.out, 1, *ones)
        if tuple(tensors[DORA_SCALE].shape) not in (per_input, per_output):
            raise fail(DORA_SCALE, tensors[DORA_SCALE].shape, f"{per_input} (per input channel) or {per_output} "
                       "(per output row)")

    @classmethod
    def delta(cls, tensors, weight) -> torch.Tensor:
        """W' − W, W' as `functional.dora_weight` (ComfyUI's weight_decompose) for either orientation of
        `dora_scale` = m: per input channel m ⊙ (W + ΔW) / ‖W + ΔW‖, per output row m ⊙ (W + ΔW) / ‖W‖;
        ΔW as LoRA's."""
        w = weight.float()
        return dora_weight(w, Lora.delta(tensors, w), tensors[DORA_SCALE].float()) - w

    def _base_weight(self) -> torch.Tensor:
        return self._weight().to(self.lora_down.device, torch.float32)

    def input_scale(self) -> torch.Tensor:
        """s = m / ‖W + ΔW‖ per input channel, (in,); the norm without grad (memory-saving DoRA)."""
        with torch.no_grad():
            norm = dora_column_norm(self._base_weight() + Lora.weight_delta(self)) + torch.finfo(torch.float32).eps
        return (self.dora_scale / norm).flatten()

    def output_scale(self) -> torch.Tensor:
        """s = m / ‖W‖ per output row, (out,) (ComfyUI's output-axis rule; the norm is a constant)."""
        with torch.no_grad():
            norm = dora_row_norm(self._base_weight()) + torch.finfo(torch.float32).eps
        return (self.dora_scale / norm).flatten()

    def run(self, base_forward: BaseForward, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.on_output:
            x = channel_scale(x, self.shape, self.input_scale().to(x.dtype))
            return base_forward(x) + self.contribution(x, bias)
        # W'x + b = Wx + b + (s − 1) ⊙ Wx + s ⊙ ΔWx; the bias (and its difference) is not scaled.
        s = self.output_scale().to(x.dtype)
        wx = layer_op(self.shape, x, self._weight().to(x.device, x.dtype))
        h = channel_scale(wx, self.shape, s - 1) + channel_scale(self.contribution(x, None), self.shape, s)
        return base_forward(x) + channel_bias(h, self.shape, bias)

    def export(self) -> dict[str, torch.Tensor]:
        return {**super().export(), DORA_SCALE: self.dora_scale.detach()}

    def weight_delta(self) -> torch.Tensor:
        weight = self._base_weight()
        return dora_weight(weight, super().weight_delta(), self.dora_scale) - weight
