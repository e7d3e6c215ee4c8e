"""The per-layer math: LoRA adapters and weight/bias differences.

A LoRA adapter adds `h(x) = scale · up(down(x))` to a frozen layer's output, with
`scale = alpha / rank` (Hu et al. 2021, "LoRA"; kohya-ss sd-scripts' `networks/lora.py` for the
conv form): for `Linear`, `down` is rank×in and `up` is out×rank; for `ConvNd`, `down` is a conv
with the base kernel, stride, padding and dilation into `rank` channels and `up` a 1×1 conv back to
`out`. Its weight difference is `ΔW = scale · up @ down` (reshaped to the base kernel).

Layers an adapter cannot serve (weights of fewer than 2 dims such as norms, grouped convs) train a
full weight difference `diff` instead, and any bias a bias difference `diff_b`.

Parameters are fp32 master weights; they are cast to the input's dtype in the forward pass, so a
bf16 (or autocast) forward stays bf16.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from torch import nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LayerWeights(NamedTuple):
    """One layer's LoRA tensors as a file holds them; absent parts are None.

    down: (rank, in) or (rank, in/groups, *kernel); up: (out, rank) or (out, rank, 1, ...);
    alpha: scale = alpha / rank; diff: shape of the base weight; diff_b: shape of the base bias.
    """

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · up @ down, in the base weight's layout (out, in[, *kernel])."""
    delta = up.flatten(1) @ down.flatten(1)
    return (scale * delta).reshape(up.shape[0], *down.shape[1:])


def can_take_lora(module: nn.Module) -> bool:
    """Linear, and ungrouped Conv1d/2d/3d (ComfyUI's op classes subclass these)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, CONV_TYPES) and module.groups == 1


class LoraAdapter(nn.Module):
    """`scale · up(down(x))` for one Linear or Conv layer; build with `from_linear` / `from_conv`."""

    def __init__(self, down: nn.Module, up: nn.Module, alpha: float):
        super().__init__()
        self.lora_down = down
        self.lora_up = up
        self.alpha = float(alpha)

    @property
    def rank(self) -> int:
        return self.lora_down.weight.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_linear(cls, base: nn.Linear, rank: int, alpha: float) -> LoraAdapter:
        down = nn.Linear(base.in_features, rank, bias=False, device="meta", dtype=torch.float32)
        up = nn.Linear(rank, base.out_features, bias=False, device="meta", dtype=torch.float32)
        return cls(down.to_empty(device=base.weight.device), up.to_empty(device=base.weight.device), alpha)

    @classmethod
    def from_conv(cls, base: nn.Conv1d | nn.Conv2d | nn.Conv3d, rank: int, alpha: float) -> LoraAdapter:
        conv = next(c for c in CONV_TYPES if isinstance(base, c))  # the torch class under ComfyUI's ops
        down = conv(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                    base.dilation, bias=False, padding_mode=base.padding_mode, device="meta", dtype=torch.float32)
        up = conv(rank, base.out_channels, 1, bias=False, device="meta", dtype=torch.float32)
        return cls(down.to_empty(device=base.weight.device), up.to_empty(device=base.weight.device), alpha)

    def reset(self, generator: torch.Generator, init: str) -> None:
        """down random (kaiming-uniform as nn.Linear, or normal 1/rank), up zeros: ΔW starts at 0."""
        with torch.no_grad():
            w = torch.empty(self.lora_down.weight.shape, dtype=torch.float32)
            if init == "kaiming":
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
            else:
                nn.init.normal_(w, std=1.0 / self.rank, generator=generator)
            self.lora_down.weight.copy_(w)
            self.lora_up.weight.zero_()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """scale·up(down(x)) + bias. The scale is applied to the rank-wide intermediate and the bias
        rides in the `up` op, so no extra full-size pass is spent on either."""
        down, up = self.lora_down.weight.to(x.dtype), self.lora_up.weight.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
        linear = isinstance(self.lora_down, nn.Linear)
        h = nn.functional.linear(x, down) if linear else self.lora_down._conv_forward(x, down, None)
        if self.scale != 1.0:
            h = h * self.scale
        return nn.functional.linear(h, up, bias) if linear else self.lora_up._conv_forward(h, up, bias)

    def delta(self) -> torch.Tensor:
        """ΔW = scale · up @ down in the base weight's layout (fp32 master tensors, with grad)."""
        return lora_delta(self.lora_down.weight, self.lora_up.weight, self.scale)


def _zeros_like_fp32(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.zeros(t.shape, dtype=torch.float32, device=t.device))


class DiffAdapter(nn.Module):
    """Trainable `diff` (weight difference) and/or `diff_b` (bias difference) for one layer."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.diff = _zeros_like_fp32(weight) if weight is not None else None
        self.diff_b = _zeros_like_fp32(bias) if bias is not None else None

    def patched_params(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's weight/bias plus the differences, in the base parameters' dtype."""
        params = {}
        if self.diff is not None:
            params["weight"] = module.weight + self.diff.to(module.weight.dtype)
        if self.diff_b is not None:
            params["bias"] = module.bias + self.diff_b.to(module.bias.dtype)
        return params



@contextmanager
def swapped_params(module: nn.Module, params: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run the module's own forward on other tensors for some parameters, restored in `finally`.

    (torch.func.functional_call would call the patched forward again and recurse.)
    """
    saved = {name: module._parameters[name] for name in params}
    try:
        module._parameters.update(params)
        yield
    finally:
        module._parameters.update(saved)


class LayerAdapter(nn.Module):
    """All trainable parts of one layer, and the forward that replaces the layer's own.

    With a LoRA: `base(x) + scale·up(down(x)) [+ diff_b]`. Without (norms, grouped convs):
    the layer runs on `weight + diff`, `bias + diff_b`.
    """

    def __init__(self, lora: LoraAdapter | None, diff: DiffAdapter | None):
        super().__init__()
        self.lora = lora
        self.diffs = diff

    def run(self, module: nn.Module, base_forward, x: torch.Tensor) -> torch.Tensor:
        if self.lora is None:
            with swapped_params(module, self.diffs.patched_params(module)):
                return base_forward(x)
        diff_b = self.diffs.diff_b if self.diffs is not None else None
        return base_forward(x) + self.lora(x, diff_b)

    def export(self) -> LayerWeights:
        """The fp32 master tensors, detached (no copies)."""
        lora, diffs = self.lora, self.diffs
        return LayerWeights(
            down=lora.lora_down.weight.detach() if lora else None,
            up=lora.lora_up.weight.detach() if lora else None,
            alpha=lora.alpha if lora else None,
            diff=diffs.diff.detach() if diffs is not None and diffs.diff is not None else None,
            diff_b=diffs.diff_b.detach() if diffs is not None and diffs.diff_b is not None else None,
        )


def build_adapter(module: nn.Module, rank: int, alpha: float, train_diffs: bool) -> LayerAdapter | None:
    """One dispatch from layer type to adapter kind; None if the layer has nothing to train."""
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    weight = weight if isinstance(weight, torch.Tensor) else None
    bias = bias if isinstance(bias, torch.Tensor) else None
    lora = None
    if weight is not None and weight.dim() >= 2 and can_take_lora(module):
        make = LoraAdapter.from_linear if isinstance(module, nn.Linear) else LoraAdapter.from_conv
        lora = make(module, rank, alpha)
        weight = None  # the LoRA serves the weight
    if not train_diffs:
        weight = bias = None
    diff = DiffAdapter(weight, bias) if (weight is not None or bias is not None) else None
    if lora is None and diff is None:
        return None
    return LayerAdapter(lora, diff)
