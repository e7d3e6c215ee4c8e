"""Injecting adapters into any `torch.nn.Module`, and taking them out again without a trace.

The layer's `forward` is swapped, not the module replaced (as kohya-ss does), so the model's
state_dict keys never change. Adapters live in the returned `LoraNetwork`, never inside the model;
`remove()` (or leaving the `with` block, also on an exception or ComfyUI's interrupt, which
`except Exception` would not catch) restores every forward and every `requires_grad` flag, after
which the model's state_dict and outputs are bit-identical to before.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .keys import kohya_name
from .layers import LayerAdapter, LayerWeights, build_adapter

log = logging.getLogger(__name__)

INITS = ("kaiming", "normal")
_MARK = "__lora_trainer_patch__"


@dataclass(frozen=True)
class LoraConfig:
    """What to inject. alpha None or 0 means alpha = rank (scale 1), as in kohya-ss."""

    rank: int = 8
    alpha: float | None = None
    init: str = "kaiming"
    train_diffs: bool = True  # weight differences for <2-D weights, bias differences for biases
    include: str | None = None  # regex on the module path; None selects every eligible layer
    exclude: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank: got {self.rank!r}; give an integer of 1 or more")
        if self.alpha is not None and self.alpha < 0:
            raise ValueError(f"alpha: got {self.alpha}; give 0 or more (0 means alpha = rank)")
        if self.init not in INITS:
            raise ValueError(f"init: got {self.init!r}; choose one of {', '.join(INITS)}")

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha) if self.alpha else float(self.rank)

    def selects(self, path: str) -> bool:
        if self.include is not None and not re.search(self.include, path):
            return False
        return self.exclude is None or not re.search(self.exclude, path)


class LoraNetwork(nn.Module):
    """The adapters injected into one model: their parameters, their weights, and `remove()`.

    Use as a context manager: `with inject(model, cfg) as net: ...` restores the model on exit.
    """

    def __init__(self, model: nn.Module, targets: dict[str, nn.Module], adapters: dict[str, LayerAdapter]):
        super().__init__()
        self.paths = {kohya_name(p): p for p in adapters}  # ModuleDict keys may not contain dots
        self.adapters = nn.ModuleDict({kohya_name(p): a for p, a in adapters.items()})
        self._targets = targets  # plain dict: the model's modules must not become ours
        self._saved_forwards: dict[str, object] = {}
        self._saved_grad = {id(p): p.requires_grad for p in model.parameters()}
        self._model_params = list(model.parameters())
        self.active = False

    def weights(self) -> dict[str, LayerWeights]:
        """module path → the fp32 master tensors (detached views, not copies)."""
        return {self.paths[k]: a.export() for k, a in self.adapters.items()}

    def _patch(self) -> None:
        for p in self._model_params:
            p.requires_grad_(False)
        for path, module in self._targets.items():
            self._saved_forwards[path] = module.__dict__.get("forward")
            module.forward = _patched_forward(module, self.adapters[kohya_name(path)])
        self.active = True

    def remove(self) -> None:
        """Restore every forward and requires_grad flag; safe to call twice."""
        for path, saved in self._saved_forwards.items():
            module = self._targets[path]
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved
        self._saved_forwards.clear()
        for p in self._model_params:
            p.requires_grad_(self._saved_grad[id(p)])
        self.active = False

    def __enter__(self) -> LoraNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _patched_forward(module: nn.Module, adapter: LayerAdapter) -> Callable[..., torch.Tensor]:
    base_forward = module.forward

    def forward(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return adapter.run(module, lambda inp: base_forward(inp, *args, **kwargs), x)

    setattr(forward, _MARK, True)
    return forward


def is_injected(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), _MARK, False)


def eligible_modules(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    """Modules that own a `weight` or `bias` parameter and pass the config's name filter."""
    found = {}
    for path, module in model.named_modules():
        own = module._parameters
        if not path or not (isinstance(own.get("weight"), torch.Tensor) or isinstance(own.get("bias"), torch.Tensor)):
            if path and own:
                log.debug("no adapter for %s: parameters %s are not weight/bias", path, list(own))
            continue
        if config.selects(path):
            found[path] = module
    return found


def inject(
    model: nn.Module,
    config: LoraConfig,
    seed: int = 0,
    weights: dict[str, LayerWeights] | None = None,
) -> LoraNetwork:
    """Wrap every selected layer of `model` as `base(x) + scale·up(down(x))` and freeze the model.

    `seed` drives the random `down` init (layer order is the model's module order). `weights`
    (module path → LayerWeights, from `formats.resolve_state_dict`) resumes a trained LoRA exactly;
    its rank and alpha win over the config's. Raises ValueError if the model is already injected.
    """
    if any(is_injected(m) for m in model.modules()):
        raise ValueError("model: already has LoRA adapters injected; remove() them before injecting again")
    weights = weights or {}
    generator = torch.Generator().manual_seed(seed)
    targets, adapters = {}, {}
    for path, module in eligible_modules(model, config).items():
        loaded = weights.get(path)
        rank, alpha = config.rank, config.effective_alpha
        if loaded is not None and loaded.down is not None:  # a file's rank and alpha win
            rank = loaded.down.shape[0]
            alpha = loaded.alpha or float(rank)
        adapter = build_adapter(module, rank, alpha, config.train_diffs)
        if adapter is None:
            continue
        if adapter.lora is None:
            log.debug("weight difference instead of LoRA for %s (%s)", path, type(module).__name__)
        else:
            adapter.lora.reset(generator, config.init)
        if loaded is not None:
            _load_layer(adapter, loaded)
        targets[path], adapters[path] = module, adapter
    network = LoraNetwork(model, targets, adapters)
    network._patch()
    return network


def _load_layer(adapter: LayerAdapter, loaded: LayerWeights) -> None:
    """Copy a file's tensors into an adapter's fp32 master weights (shapes checked by formats)."""
    with torch.no_grad():
        if adapter.lora is not None and loaded.down is not None:
            adapter.lora.lora_down.weight.copy_(loaded.down.reshape(adapter.lora.lora_down.weight.shape))
            adapter.lora.lora_up.weight.copy_(loaded.up.reshape(adapter.lora.lora_up.weight.shape))
        if adapter.diffs is not None:
            if loaded.diff is not None and adapter.diffs.diff is not None:
                adapter.diffs.diff.copy_(loaded.diff)
            if loaded.diff_b is not None and adapter.diffs.diff_b is not None:
                adapter.diffs.diff_b.copy_(loaded.diff_b)
