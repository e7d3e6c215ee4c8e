"""The contract every adapter algorithm fulfils, stated once (compare ComfyUI's
`comfy/weight_adapter/base.py`: `bypass(f)(x) = g(f(x) + h(x))`).

An algorithm is one `nn.Module` class per layer that:
- names the key suffixes it writes (`SUFFIXES`) and the ones that identify it in a file (`MARKERS`);
- creates fp32 master parameters whose ΔW is 0 at step 0 (`create`), or takes a file's (`load`);
- runs at training time as `base(x) + h(x)` (`run`), with no full-size weight built where the maths
  allows;
- gives its weight difference from a file's tensors (`delta`, a pure classmethod, the formula in its
  docstring), which the merge and the tests use;
- exports `{suffix: tensor}` (alpha as a 0-d float32 tensor), the layout ComfyUI core loads.
Parameters live on the device the layer computes on, built from the layer's shapes (LayerShape);
the base weight is never read for a device or dtype. An algorithm that needs the weight's values
sets READS_WEIGHT and gets them from `weight()`, a plain tensor (fp8 or offloaded, cast by the
caller as the layer's own cast would) or a ValueError naming the layer (meta, quantized).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

import torch
from torch import nn

from .functional import LayerShape

ALPHA = "alpha"
INITS = ("kaiming", "normal")


@dataclass(frozen=True)
class AlgoOptions:
    """One layer's settings: rank and alpha (scale = alpha / rank), init, LoKr's factor (-1: the most
    square split)."""

    rank: int = 8
    alpha: float = 8.0
    init: str = "kaiming"
    factor: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank: got {self.rank!r}; give an integer of 1 or more")
        if self.init not in INITS:
            raise ValueError(f"init: got {self.init!r}; choose one of {', '.join(INITS)}")
        if not isinstance(self.factor, int) or self.factor == 0 or self.factor < -1:
            raise ValueError(f"factor: got {self.factor!r}; give -1 (automatic) or a positive integer")


BaseForward = Callable[[torch.Tensor], torch.Tensor]


class Algorithm(nn.Module):
    """Base class; subclasses set NAME, SUFFIXES, MARKERS and implement the methods below."""

    NAME: ClassVar[str] = ""
    SUFFIXES: ClassVar[tuple[str, ...]] = ()
    MARKERS: ClassVar[frozenset[str]] = frozenset()
    READS_WEIGHT: ClassVar[bool] = False  # reads the base weight's values while training (DoRA's norm)

    def __init__(self, shape: LayerShape, alpha: float):
        super().__init__()
        self.shape = shape
        self.alpha = float(alpha)

    @classmethod
    def claims(cls, suffixes: frozenset[str]) -> bool:
        """Whether a layer whose file keys end in `suffixes` is of this algorithm."""
        return bool(cls.MARKERS & suffixes)

    @classmethod
    def create(cls, shape: LayerShape, options: AlgoOptions, generator: torch.Generator,
               device: torch.device, weight: Callable[[], torch.Tensor]) -> Algorithm:
        """Fresh parameters with ΔW = 0. `weight()` fetches the base weight, for those that need it."""
        raise NotImplementedError

    @classmethod
    def load(cls, shape: LayerShape, tensors: Mapping[str, torch.Tensor], device: torch.device,
             weight: Callable[[], torch.Tensor]) -> Algorithm:
        """Parameters copied (as fp32) from a file's tensors, already checked by `check`."""
        raise NotImplementedError

    @classmethod
    def check(cls, shape: LayerShape | None, tensors: Mapping[str, torch.Tensor],
              fail: Callable[[str, torch.Size, object], Exception]) -> None:
        """Raise `fail(suffix, shape in the file, shape the layer needs)` for a tensor that does not fit."""
        raise NotImplementedError

    @classmethod
    def delta(cls, tensors: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        """The weight difference W' − W in fp32, from a file's tensors and the base weight."""
        raise NotImplementedError

    def run(self, base_forward: BaseForward, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's training-time output: base(x) + h(x) [+ bias, a bias difference]."""
        raise NotImplementedError

    def export(self) -> dict[str, torch.Tensor]:
        """{suffix: fp32 master tensor}, detached (no copies); alpha a 0-d float32 tensor."""
        raise NotImplementedError

    def weight_delta(self) -> torch.Tensor:
        """ΔW of the live parameters (with grad), for references that rebuild the weight."""
        raise NotImplementedError

    def _alpha_tensor(self) -> torch.Tensor:
        return torch.tensor(self.alpha, dtype=torch.float32)


def effective_alpha(alpha: float | None, rank: int) -> float:
    """kohya-ss' rule, stated once for the pack: alpha 0 or None means alpha = rank (scale 1)."""
    return float(alpha) if alpha else float(rank)


def alpha_of(tensors: Mapping[str, torch.Tensor], rank: int) -> float:
    """A file's alpha (`effective_alpha`: absent or 0 means rank)."""
    alpha = tensors.get(ALPHA)
    return effective_alpha(float(alpha) if alpha is not None else None, rank)


def fp32_param(t: torch.Tensor, device: torch.device) -> nn.Parameter:
    return nn.Parameter(t.detach().to(device, torch.float32).clone())


def zeros_param(shape: tuple[int, ...], device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))


def random_tensor(shape: tuple[int, ...], generator: torch.Generator, init: str, rank: int) -> torch.Tensor:
    """kaiming-uniform (as nn.Linear's default) or normal(std 1/rank), drawn on the CPU from `generator`
    (so a seed gives the same adapter on every device)."""
    w = torch.empty(shape, dtype=torch.float32)
    if init == "kaiming":
        nn.init.kaiming_uniform_(w, a=5 ** 0.5, generator=generator)
    else:
        nn.init.normal_(w, std=1.0 / rank, generator=generator)
    return w


def channel_scale(x: torch.Tensor, shape: LayerShape, scale: torch.Tensor) -> torch.Tensor:
    """x with each channel multiplied by `scale` (channels,): the last dim of a Linear's input or output,
    dim 1 of a conv's."""
    if shape.is_conv:
        return x * scale.reshape(1, -1, *[1] * (x.dim() - 2))
    return x * scale


def channel_bias(y: torch.Tensor, shape: LayerShape, bias: torch.Tensor | None) -> torch.Tensor:
    """y + bias (out,) on the channel dim (last for a Linear, 1 for a conv); y itself when bias is None."""
    if bias is None:
        return y
    bias = bias.to(y.dtype)
    return y + (bias.reshape(-1, *[1] * (y.dim() - 2)) if shape.is_conv else bias)
