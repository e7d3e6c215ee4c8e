"""Applying a LoRA to a plain torch model by merging it into the weights, and undoing it exactly.

`W ← W + strength · ΔW` with ΔW the layer's algorithm's (lora/algos/; for LoRA `(alpha/rank) · up @ down`,
for DoRA `W' − W`), plus `diff`, `diff_b`. The originals
are kept, so undoing copies them back bit-exactly rather than subtracting (which would round).
Used outside ComfyUI (demo, tests); inside ComfyUI the nodes use ComfyUI's own LoRA patching.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .algos import ALGORITHMS
from .layers import LayerWeights


class MergedLora:
    """Handle of a merged LoRA; `undo()` (or leaving the `with` block) restores the weights."""

    def __init__(self, originals: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self._originals = originals  # name → (parameter, saved copy)

    def undo(self) -> None:
        with torch.no_grad():
            for param, saved in self._originals.values():
                param.copy_(saved)
        self._originals = {}

    def __enter__(self) -> MergedLora:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()


def layer_deltas(w: LayerWeights, module: nn.Module) -> dict[str, torch.Tensor]:
    """{"weight": ΔW, "bias": Δb} of one layer, fp32; a part is absent when the LoRA has none."""
    deltas = {}
    if w.algorithm is not None:
        weight = module.weight.detach().float()
        tensors = {k: t.to(weight.device) for k, t in w.tensors.items()}
        deltas["weight"] = ALGORITHMS[w.algorithm].delta(tensors, weight)
    if w.diff is not None:
        deltas["weight"] = deltas.get("weight", 0) + w.diff.float()
    if w.diff_b is not None:
        deltas["bias"] = w.diff_b.float()
    return deltas


def merge_lora(model: nn.Module, weights: Mapping[str, LayerWeights], strength: float = 1.0) -> MergedLora:
    """Add `strength ·` each layer's delta to `model`'s weights in place (negative strength allowed).

    `weights` is module path → LayerWeights as `formats.resolve_state_dict` returns it.
    """
    modules = dict(model.named_modules())
    originals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for path, w in weights.items():
            for name, delta in layer_deltas(w, modules[path]).items():
                param = getattr(modules[path], name)
                originals[f"{path}.{name}"] = (param, param.detach().clone())
                param.add_((strength * delta).to(param.device, param.dtype))
    return MergedLora(originals)
