"""One layer's trainable parts: an algorithm's adapter (lora/algos/) and weight/bias differences.

Layers an adapter cannot serve (weights of fewer than 2 dims such as norms, grouped convs) train a
full weight difference `diff` instead, and any bias a bias difference `diff_b` (keys as ComfyUI's
loader reads them). An adapter's forward is `base(x) + h(x)`; the bias difference rides in h.

Parameters are fp32 master weights; they are cast to the input's dtype in the forward pass, so a
bf16 (or autocast) forward stays bf16.

Bases as ComfyUI holds them: a layer's weight may be fp8, rest on the offload device while the
layer computes elsewhere (ComfyUI's lowvram: `comfy/ops.py` `cast_bias_weight` casts it inside the
layer's forward), or be a tensor subclass that is not a plain tensor (`comfy/quant_ops.py`
QuantizedTensor, GGUF's GGMLTensor). Adapters read only the layer's shape attributes and the
input's device and dtype. The two paths that must read the weight itself (a weight difference, and
DoRA's norm) take it through `base_weight`, which casts a plain tensor to the compute device and
dtype, the way the layer's own cast does, and refuses any other weight with an error naming the layer.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch
from torch import nn

from .algos import Algorithm, LayerShape
from .algos.lora import DOWN, UP
from .keys import ALPHA, DIFF, DIFF_B
from .patching import swapped_items

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LayerWeights(NamedTuple):
    """One layer's tensors as a file holds them: the algorithm (None: differences only) and
    {key suffix: tensor}, alpha a 0-d tensor. down/up/alpha/diff/diff_b read the common suffixes."""

    algorithm: str | None
    tensors: Mapping[str, torch.Tensor]

    @property
    def down(self) -> torch.Tensor | None:
        return self.tensors.get(DOWN)

    @property
    def up(self) -> torch.Tensor | None:
        return self.tensors.get(UP)

    @property
    def alpha(self) -> float | None:
        alpha = self.tensors.get(ALPHA)
        return float(alpha) if alpha is not None else None

    @property
    def diff(self) -> torch.Tensor | None:
        return self.tensors.get(DIFF)

    @property
    def diff_b(self) -> torch.Tensor | None:
        return self.tensors.get(DIFF_B)


def layer_shape(module: nn.Module) -> LayerShape | None:
    """The shapes of a Linear or ungrouped Conv1d/2d/3d (ComfyUI's op classes subclass these), from
    the layer's attributes; None for any other layer (it takes a weight difference).

    A module that is no nn.Linear but has integer `in_features` / `out_features` and computes
    `x @ W.T + b` counts as a Linear: ComfyUI's mixed-precision/quantized Linear
    (`comfy/ops.py` mixed_precision_ops) is an nn.Module of that kind, whose weight is a QuantizedTensor.
    """
    if isinstance(module, nn.Linear) or _linear_like(module):
        return LayerShape(module.out_features, module.in_features)
    if isinstance(module, CONV_TYPES) and module.groups == 1:
        padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        return LayerShape(module.out_channels, module.in_channels, tuple(module.kernel_size), tuple(module.stride),
                          padding, tuple(module.dilation), module.padding_mode)
    return None


def _linear_like(module: nn.Module) -> bool:
    inp, out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    weight = module._parameters.get("weight")
    return (type(inp) is int and type(out) is int and weight is not None and tuple(weight.shape) == (out, inp)
            and not isinstance(module, nn.Bilinear))


def readable_weight(name: str, module: nn.Module, part: str = "weight") -> torch.Tensor:
    """The layer's `part` (weight or bias) as it rests, if its values can be read; else ValueError
    naming the layer: on the "meta" device (not materialised), or a tensor subclass (ComfyUI's
    QuantizedTensor, GGUF's GGMLTensor: its data are not the weight's values)."""
    tensor = getattr(module, part)
    if type(tensor) not in (torch.Tensor, nn.Parameter):
        raise ValueError(f"layer {name}: its {part} is a {type(tensor).__name__} (quantized), not a plain tensor, and "
                         "this needs its values (DoRA's norm, or a weight difference for train_norms / "
                         "train_biases); use lora, loha or lokr and turn train_norms off for such a base, or "
                         "load the model unquantized")
    if tensor.device.type == "meta":
        raise ValueError(f"layer {name}: its {part} is on the meta device (not loaded), and this needs its values "
                         "(DoRA's norm, or a weight difference); load the model's weights first")
    return tensor


def base_weight(name: str, module: nn.Module, device: torch.device, dtype: torch.dtype,
                part: str = "weight") -> torch.Tensor:
    """`readable_weight` cast to `device` and `dtype`: what the layer's own cast computes with (fp8 and
    offloaded weights are cast; no copy when already there)."""
    return readable_weight(name, module, part).to(device, dtype)


def can_take_lora(module: nn.Module) -> bool:
    return layer_shape(module) is not None


class DiffAdapter(nn.Module):
    """Trainable `diff` (weight difference) and/or `diff_b` (bias difference) for one layer, fp32 zeros."""

    def __init__(self, weight_shape: tuple[int, ...] | None, bias_shape: tuple[int, ...] | None, device: torch.device):
        super().__init__()
        zeros = lambda shape: nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))  # noqa: E731
        self.diff = zeros(weight_shape) if weight_shape is not None else None
        self.diff_b = zeros(bias_shape) if bias_shape is not None else None

    def patched_params(self, name: str, module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The module's weight and bias, plus the differences, on the input's device in the compute dtype
        (`compute_dtype`), read through `base_weight` (never the weight's own device or dtype). Both are
        given even when only one has a difference, so the layer's op sees one dtype for both."""
        dtype = compute_dtype(x)
        params = {}
        for part, diff in (("weight", self.diff), ("bias", self.diff_b)):
            if getattr(module, part, None) is not None:
                params[part] = base_weight(name, module, x.device, dtype, part)
                if diff is not None:
                    params[part] = params[part] + diff.to(x.device, dtype)
        return params


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in for input x: x's, or float32 under autocast (which casts each op's
    tensors itself, so the fp32 sum loses nothing). ComfyUI's cast ops cast the weight to x's dtype too."""
    return torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype


class LayerAdapter(nn.Module):
    """All trainable parts of one layer, and the forward that replaces the layer's own.

    With an algorithm: `base(x) + h(x) [+ diff_b]`. Without (norms, grouped convs): the layer runs
    on `weight + diff`, `bias + diff_b`.
    """

    skip: Callable[[], bool] | None = None  # training-time module dropout: True skips the adapter for this call
    bypass: bool = False  # the adapter is off: the layer computes as the base's (LoraNetwork.bypassed)

    def __init__(self, algo: Algorithm | None, diff: DiffAdapter | None, name: str = ""):
        super().__init__()
        self.algo = algo
        self.diffs = diff
        self.name = name  # the layer's module path, for errors

    def run(self, module: nn.Module, base_forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.bypass or self.skip is not None and self.algo is not None and self.skip():
            return base_forward(x)
        if self.algo is None:
            # the module's own forward on weight + diff (torch.func.functional_call would call the
            # patched forward again and recurse)
            with swapped_items(module._parameters, self.diffs.patched_params(self.name, module, x)):
                return base_forward(x)
        diff_b = self.diffs.diff_b if self.diffs is not None else None
        return self.algo.run(base_forward, x, diff_b)

    def export(self) -> LayerWeights:
        """The fp32 master tensors, detached (no copies)."""
        tensors = dict(self.algo.export()) if self.algo is not None else {}
        if self.diffs is not None and self.diffs.diff is not None:
            tensors[DIFF] = self.diffs.diff.detach()
        if self.diffs is not None and self.diffs.diff_b is not None:
            tensors[DIFF_B] = self.diffs.diff_b.detach()
        return LayerWeights(self.algo.NAME if self.algo is not None else None, tensors)


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def build_adapter(module: nn.Module, make: Callable[[LayerShape], Algorithm], train_weights: bool,
                  train_biases: bool, device: torch.device, name: str = "") -> LayerAdapter | None:
    """One dispatch from layer type to adapter kind; None if the layer has nothing to train.

    `make(shape)` builds the algorithm for a Linear/Conv layer; other layers with a weight get a
    `diff` when `train_weights`, layers with a bias a `diff_b` when `train_biases`. A layer that needs
    a weight difference but whose weight cannot be read (`base_weight`) is refused here, before the
    model is patched.
    """
    weight, bias = _param(module, "weight"), _param(module, "bias")
    shape = layer_shape(module) if weight is not None else None
    algo = make(shape) if shape is not None else None
    weight_shape = tuple(weight.shape) if weight is not None and algo is None and train_weights else None
    bias_shape = tuple(bias.shape) if bias is not None and train_biases else None
    has_diffs = weight_shape is not None or bias_shape is not None
    diff = DiffAdapter(weight_shape, bias_shape, device) if has_diffs else None
    if algo is None and diff is None:
        return None
    if algo is None:  # the layer runs on weight + diff: its weight and bias are read each step
        for part in ("weight", "bias"):
            if _param(module, part) is not None:
                readable_weight(name, module, part)
    return LayerAdapter(algo, diff, name)

