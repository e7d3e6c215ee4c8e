"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

LoRA adds `h(x) = scale · up(down(x))`, `scale = alpha / rank`: for Linear, down is (rank, in) and
up (out, rank); for ConvNd, down is a conv with the layer's kernel, stride, padding and dilation
into `rank` channels and up a 1×1 conv back to `out` (kohya-ss `networks/lora.py`, the "LoCon" conv
form). Keys: `lora_down.weight`, `lora_up.weight`, `alpha`.

DoRA adds `dora_scale` = the magnitude m, one per input channel, shape (1, in, 1, ...), the layout
ComfyUI's `weight_decompose` and LyCORIS (`wd_on_out=False`) use: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖.
Because the factor m/‖W + ΔW‖ is per input channel, W'x = (W + ΔW)(s ⊙ x) with s = m/‖·‖: training
runs `base(s⊙x) + lora(s⊙x)`, no full-size weight in the graph. The norm needs W + ΔW once per
step; it is computed without grad and treated as a constant (the paper's memory-saving variant,
section 4.3), so the backward keeps no full-size tensor either. m starts at ‖W‖, so W' = W at step 0.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from .base import ALPHA, AlgoOptions, Algorithm, BaseForward, alpha_of, channel_scale, fp32_param, random_tensor
from .functional import LayerShape, dora_column_norm, dora_weight, layer_op, lora_delta, pointwise_op

DOWN = "lora_down.weight"
UP = "lora_up.weight"
DORA_SCALE = "dora_scale"


class Lora(Algorithm):
    """`scale · up(down(x))` for one Linear or Conv layer."""

    NAME = "lora"
    SUFFIXES = (DOWN, UP, ALPHA)
    MARKERS = frozenset({DOWN, UP})

    def __init__(self, shape: LayerShape, down: torch.Tensor, up: torch.Tensor, alpha: float):
        super().__init__(shape, alpha)
        self.lora_down = nn.Parameter(down)
        self.lora_up = nn.Parameter(up)

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
        down = tensors[DOWN].reshape(-1, shape.inp, *shape.kernel)
        up = tensors[UP].reshape(shape.out, down.shape[0], *[1] * len(shape.kernel))
        return cls(shape, fp32_param(down, device), fp32_param(up, device), alpha_of(tensors, down.shape[0]))

    @classmethod
    def check(cls, shape, tensors, fail) -> None:
        down, up = tensors[DOWN], tensors[UP]
        if down.shape[1:] != shape.weight_shape[1:]:
            raise fail(DOWN, down.shape, f"(rank, {', '.join(map(str, shape.weight_shape[1:]))})")
        if up.shape[0] != shape.out or up.shape[1] != down.shape[0] or any(d != 1 for d in up.shape[2:]):
            raise fail(UP, up.shape, f"({shape.out}, {down.shape[0]}" + ", 1" * len(shape.kernel) + ")")

    @classmethod
    def delta(cls, tensors: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        """ΔW = (alpha / rank) · up @ down."""
        down, up = tensors[DOWN].float(), tensors[UP].float()
        return lora_delta(down, up, alpha_of(tensors, down.shape[0]) / down.shape[0]).reshape(weight.shape)

    def contribution(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """scale·up(down(x)) + bias. The scale is applied to the rank-wide intermediate and the bias
        rides in the `up` op, so no extra full-size pass is spent on either."""
        down, up = self.lora_down.to(x.dtype), self.lora_up.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
        h = layer_op(self.shape, x, down)
        if self.scale != 1.0:
            h = h * self.scale
        return pointwise_op(self.shape, h, up, bias)

    def run(self, base_forward: BaseForward, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return base_forward(x) + self.contribution(x, bias)

    def export(self) -> dict[str, torch.Tensor]:
        return {DOWN: self.lora_down.detach(), UP: self.lora_up.detach(), ALPHA: self._alpha_tensor()}

    def weight_delta(self) -> torch.Tensor:
        return lora_delta(self.lora_down, self.lora_up, self.scale)


class Dora(Lora):
    """LoRA with a trained magnitude per input channel (see the module docstring)."""

    NAME = "dora"
    SUFFIXES = (DOWN, UP, ALPHA, DORA_SCALE)
    MARKERS = frozenset({DORA_SCALE})

    def __init__(self, shape: LayerShape, down: torch.Tensor, up: torch.Tensor, alpha: float,
                 magnitude: torch.Tensor, weight: Callable[[], torch.Tensor]):
        super().__init__(shape, down, up, alpha)
        self.dora_scale = nn.Parameter(magnitude)
        self._weight = weight  # fetches the base weight (the model's, not ours) for the norm

    @classmethod
    def create(cls, shape, options, generator, device, weight) -> Dora:
        lora = Lora.create(shape, options, generator, device, weight)
        with torch.no_grad():
            magnitude = dora_column_norm(weight().to(device, torch.float32))
        return cls(shape, lora.lora_down.data, lora.lora_up.data, lora.alpha, magnitude, weight)

    @classmethod
    def load(cls, shape, tensors, device, weight) -> Dora:
        lora = Lora.load(shape, tensors, device, weight)
        magnitude = fp32_param(tensors[DORA_SCALE].reshape(1, shape.inp, *[1] * len(shape.kernel)), device)
        return cls(shape, lora.lora_down.data, lora.lora_up.data, lora.alpha, magnitude.data, weight)

    @classmethod
    def check(cls, shape, tensors, fail) -> None:
        super().check(shape, tensors, fail)
        need = (1, shape.inp, *[1] * len(shape.kernel))
        if tuple(tensors[DORA_SCALE].shape) != need:
            raise fail(DORA_SCALE, tensors[DORA_SCALE].shape, need)

    @classmethod
    def delta(cls, tensors, weight) -> torch.Tensor:
        """W' − W with W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ (norm per input channel), ΔW as LoRA's."""
        w = weight.float()
        return dora_weight(w, Lora.delta(tensors, w), tensors[DORA_SCALE].float()) - w

    def input_scale(self) -> torch.Tensor:
        """s = m / ‖W + ΔW‖ per input channel, (in,); the norm without grad (memory-saving DoRA)."""
        with torch.no_grad():
            weight = self._weight().to(self.lora_down.device, torch.float32)
            norm = dora_column_norm(weight + Lora.weight_delta(self)) + torch.finfo(torch.float32).eps
        return (self.dora_scale / norm).flatten()

    def run(self, base_forward: BaseForward, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = channel_scale(x, self.shape, self.input_scale().to(x.dtype))
        return base_forward(x) + self.contribution(x, bias)

    def export(self) -> dict[str, torch.Tensor]:
        return {**super().export(), DORA_SCALE: self.dora_scale.detach()}

    def weight_delta(self) -> torch.Tensor:
        weight = self._weight().to(self.lora_down.device, torch.float32)
        return dora_weight(weight, super().weight_delta(), self.dora_scale) - weight
