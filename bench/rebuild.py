"""The weight-rebuild reference: the same LoRA applied as `W + scale·up·down`, rebuilt every forward.

This is what ComfyUI core does when it trains or applies a LoRA outside its bypass mode (the patched
weight is computed and the layer runs `F.linear` / `conv` on it). The benchmark compares it with the
engine's forward-path adapters (`base(x) + scale·up(down(x))`, lora/algos/lora.py) on the same trainable
`down` / `up` / `diff_b` parameters, so both train the same LoRA and only the arithmetic differs.

`weight_rebuild(model, network)` swaps the forward of every layer that has a LoRA for one that
rebuilds its weight; layers without one (norms: `weight + diff`) already rebuild and keep the
engine's forward. On exit the engine's injected forwards are put back, so `network.remove()` then
restores the model exactly as usual.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from ..lora import LoraNetwork
from ..lora.algos.functional import layer_op
from ..lora.layers import LayerAdapter
from ..lora.patching import swapped_forwards


def rebuilt_params(module: nn.Module, adapter: LayerAdapter) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W + ΔW, b + diff_b) in the base weight's layout and dtype; b None if no bias."""
    weight = module.weight + adapter.algo.weight_delta().to(module.weight.dtype)
    bias = module.bias
    diffs = adapter.diffs
    if bias is not None and diffs is not None and diffs.diff_b is not None:
        bias = bias + diffs.diff_b.to(bias.dtype)
    return weight, bias


def _rebuild_forward(module: nn.Module, adapter: LayerAdapter) -> Callable[[Callable], Callable[[torch.Tensor], torch.Tensor]]:
    def wrap(_injected: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            weight, bias = rebuilt_params(module, adapter)
            return layer_op(adapter.algo.shape, x, weight, bias)

        return forward

    return wrap


@contextmanager
def weight_rebuild(model: nn.Module, network: LoraNetwork) -> Iterator[None]:
    """Run `network`'s adapted layers by rebuilding their weights each forward, while inside the `with`.

    `network` must be active (injected into `model`); its parameters stay the trainable ones.
    Restores the injected forwards in `finally` (lora/patching.py).
    """
    if not network.active:
        raise ValueError("network: not injected; use weight_rebuild inside `with inject(model, ...)`")
    swaps = [(model.get_submodule(network.paths[key]), _rebuild_forward(model.get_submodule(network.paths[key]), adapter))
             for key, adapter in network.adapters.items() if adapter.algo is not None]
    with swapped_forwards(swaps):
        yield
