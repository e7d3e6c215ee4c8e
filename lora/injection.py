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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .algos import ALGORITHMS, AlgoOptions, Algorithm, LayerShape, effective_alpha
from .keys import kohya_name
from .layers import LayerAdapter, LayerWeights, build_adapter, readable_weight
from .patching import swapped_forwards
from .targets import TARGETS, TEXT_ENCODER_TARGET, in_target

log = logging.getLogger(__name__)

INITS = ("kaiming", "normal")
_MARK = "__lora_trainer_patch__"


@dataclass(frozen=True)
class LoraConfig:
    """What to inject: the adapter fields of Train LoRA (training/config.py), under the names the lora/ layer
    uses, with the node's defaults (`lora_config_of` maps one to the other; a test checks the defaults
    agree). alpha None or 0 means alpha = rank (`effective_alpha`).

    conv_rank / conv_alpha (kohya's conv_dim / conv_alpha) set conv layers apart; None means "as
    Linear layers": conv_rank = rank, and conv_alpha = alpha (or, with a conv_rank given,
    conv_alpha = conv_rank). `factor` is LoKr's split (-1: the most square).
    """

    rank: int = 8
    alpha: float | None = None
    init: str = "kaiming"
    include: str | None = None  # regex on the module path; None selects every eligible layer
    exclude: str | None = None
    algorithm: str = "lora"
    target: str = "all"  # lora/targets.py
    train_norms: bool = False  # weight differences for layers no adapter serves (norms, grouped convs)
    train_biases: bool = False  # bias differences
    conv_rank: int | None = None
    conv_alpha: float | None = None
    factor: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank: got {self.rank!r}; give an integer of 1 or more")
        if self.alpha is not None and self.alpha < 0:
            raise ValueError(f"alpha: got {self.alpha}; give 0 or more (0 means alpha = rank)")
        if self.init not in INITS:
            raise ValueError(f"init: got {self.init!r}; choose one of {', '.join(INITS)}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: got {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.conv_rank is not None and (not isinstance(self.conv_rank, int) or self.conv_rank < 1):
            raise ValueError(f"conv_rank: got {self.conv_rank!r}; give an integer of 1 or more, or None (= rank)")
        if self.conv_alpha is not None and self.conv_alpha < 0:
            raise ValueError(f"conv_alpha: got {self.conv_alpha}; give 0 or more (0 means conv_alpha = conv_rank)")
        if self.target not in (*TARGETS, TEXT_ENCODER_TARGET):
            raise ValueError(f"target: got {self.target!r}; choose one of {', '.join(TARGETS)}")
        AlgoOptions(factor=self.factor)  # validates factor
        for name in ("include", "exclude"):
            _check_pattern(name, getattr(self, name))

    def options(self, shape: LayerShape) -> AlgoOptions:
        """The rank, alpha, init and factor of one layer (conv layers may have their own rank/alpha)."""
        rank, alpha = self.rank, effective_alpha(self.alpha, self.rank)
        if shape.is_conv and (self.conv_rank is not None or self.conv_alpha):
            rank = self.conv_rank or self.rank
            alpha = effective_alpha(self.conv_alpha, rank) if self.conv_rank or self.conv_alpha else alpha
        return AlgoOptions(rank=rank, alpha=alpha, init=self.init, factor=self.factor)

    def selects(self, path: str, module: nn.Module | None = None) -> bool:
        """The target preset (given the module) and the include/exclude patterns on its path."""
        if module is not None and not in_target(self.target, path, module):
            return False
        if self.include is not None and not re.search(self.include, path):
            return False
        return self.exclude is None or not re.search(self.exclude, path)


def _check_pattern(name: str, pattern: str | None) -> None:
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{name}: {pattern!r} is not a valid regular expression ({err}); fix or clear it") from None


class LoraNetwork(nn.Module):
    """The adapters injected into one model: their parameters, their weights, and `remove()`.

    Use as a context manager: `with inject(model, cfg) as net: ...` restores the model on exit.
    """

    def __init__(self, model: nn.Module, targets: dict[str, nn.Module], adapters: dict[str, LayerAdapter]):
        super().__init__()
        self.paths = {kohya_name(p): p for p in adapters}  # ModuleDict keys may not contain dots
        self.adapters = nn.ModuleDict({kohya_name(p): a for p, a in adapters.items()})
        self._targets = targets  # plain dict: the model's modules must not become ours
        self._forwards = ExitStack()
        self._saved_grad = {id(p): p.requires_grad for p in model.parameters()}
        self._model_params = list(model.parameters())
        self._joined: set[int] = set()
        self.active = False

    def join(self, other: LoraNetwork, prefix: str = "", apart: bool = True) -> None:
        """Take over the adapters of another model's network (a text encoder's, injected with a `prefix`): one
        network to train, save and remove; with `apart`, `joined_parameters()` are theirs (trained at their own
        LR). Their paths must differ from ours: `prefix` goes before each of theirs here (another expert of the
        same model, whose paths are ours, joined not apart)."""
        if prefix:
            other.paths = {kohya_name(prefix + p): prefix + p for p in other.paths.values()}
            other.adapters = nn.ModuleDict({kohya_name(prefix + p): other.adapters[kohya_name(p)]
                                            for p in (path[len(prefix):] for path in other.paths.values())})
            other._targets = {prefix + p: m for p, m in other._targets.items()}
        shared = sorted(set(self.adapters) & set(other.adapters))
        if shared:
            raise ValueError(f"join: both networks have the layer {other.paths[shared[0]]}; inject one with a prefix")
        self.paths.update(other.paths)
        self.adapters.update(other.adapters)
        if apart:
            self._joined.update(id(p) for p in other.parameters())
        self._targets.update(other._targets)
        self._forwards.enter_context(other._forwards.pop_all())  # removed with ours
        self._saved_grad.update(other._saved_grad)
        self._model_params += other._model_params
        other.active = False

    def joined_parameters(self) -> list[nn.Parameter]:
        """The parameters of the adapters taken over by `join` (a text encoder's)."""
        return [p for p in self.parameters() if id(p) in self._joined]

    def weights(self) -> dict[str, LayerWeights]:
        """module path → the fp32 master tensors (detached views, not copies)."""
        return {self.paths[k]: a.export() for k, a in self.adapters.items()}

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """Every adapter off inside the block: the model computes exactly as the base (preservation's target)."""
        for adapter in self.adapters.values():
            adapter.bypass = True
        try:
            yield
        finally:
            for adapter in self.adapters.values():
                adapter.bypass = False

    def difference_share(self) -> float:
        """The diff / diff_b tensors' share of the whole weight change, by squared Frobenius norm
        (adapters' ΔW plus the differences): what a portable file, which leaves them out, loses."""
        total = differences = 0.0
        with torch.no_grad():
            for adapter in self.adapters.values():
                if adapter.algo is not None:
                    total += float(adapter.algo.weight_delta().float().square().sum())
                for diff in (adapter.diffs.diff, adapter.diffs.diff_b) if adapter.diffs is not None else ():
                    if diff is not None:
                        differences += float(diff.square().sum())
        total += differences
        return differences / total if total > 0 else 0.0

    def _patch(self) -> None:
        for p in self._model_params:
            if p.requires_grad:  # only where it changes: a quantized weight (a tensor subclass) refuses the call
                p.requires_grad_(False)
        swaps = [(module, _wrapper(module, self.adapters[kohya_name(path)])) for path, module in self._targets.items()]
        self._forwards.enter_context(swapped_forwards(swaps))
        self.active = True

    def remove(self) -> None:
        """Restore every forward and requires_grad flag; safe to call twice."""
        self._forwards.close()
        for p in self._model_params:
            if p.requires_grad != self._saved_grad[id(p)]:
                p.requires_grad_(self._saved_grad[id(p)])
        self.active = False

    def __enter__(self) -> LoraNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _wrapper(module: nn.Module, adapter: LayerAdapter) -> Callable[[Callable], Callable[..., torch.Tensor]]:
    def wrap(base_forward: Callable) -> Callable[..., torch.Tensor]:
        def forward(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            return adapter.run(module, lambda inp: base_forward(inp, *args, **kwargs), x)

        setattr(forward, _MARK, True)
        return forward

    return wrap


def is_injected(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), _MARK, False)


def eligible_modules(model: nn.Module, config: LoraConfig, prefix: str = "") -> dict[str, nn.Module]:
    """Modules that own a `weight` or `bias` parameter and pass the config's target and name filter, by their
    path with `prefix` before it (the name filter sees that)."""
    found = {}
    for path, module in model.named_modules():
        own = module._parameters
        if not path or not (isinstance(own.get("weight"), torch.Tensor) or isinstance(own.get("bias"), torch.Tensor)):
            if path and own:
                log.debug("no adapter for %s: parameters %s are not weight/bias", path, list(own))
            continue
        if config.selects(prefix + path, module):
            found[prefix + path] = module
    return found


def inject(
    model: nn.Module,
    config: LoraConfig,
    seed: int = 0,
    weights: dict[str, LayerWeights] | None = None,
    device: torch.device | str | None = None,
    prefix: str = "",
) -> LoraNetwork:
    """Wrap every selected layer of `model` as `base(x) + h(x)` (the config's algorithm) and freeze it.

    `seed` drives the random init (layer order is the model's module order). `weights` (module path →
    LayerWeights, from `formats.resolve_state_dict`) resumes a trained adapter exactly; its algorithm,
    rank and alpha win over the config's. `device` is where the layers compute (under ComfyUI's
    offloading not where their weights rest), chosen by `adapter_device`. Raises ValueError if the
    model is already injected, or a layer whose weight must be read (DoRA, a weight difference)
    has one that cannot be (meta, quantized): the error names the layer. `prefix` goes before every
    module path (in the patterns, `weights` and the network's paths): a second model's layers, such as a
    text encoder's (`text_encoder.`), stay apart from the first's once joined (`LoraNetwork.join`).
    """
    if any(is_injected(m) for m in model.modules()):
        raise ValueError("model: already has LoRA adapters injected; remove() them before injecting again")
    weights = weights or {}
    generator = torch.Generator().manual_seed(seed)
    at = adapter_device(model, device)
    targets, adapters = {}, {}
    for path, module in eligible_modules(model, config, prefix).items():
        loaded = weights.get(path)
        make = _maker(path, module, config, generator, at, loaded)
        # a continued file's differences are continued with it, whatever train_norms / train_biases say
        train_weights = config.train_norms or (loaded is not None and loaded.diff is not None)
        train_biases = config.train_biases or (loaded is not None and loaded.diff_b is not None)
        adapter = build_adapter(module, make, train_weights, train_biases, at, path)
        if adapter is None:
            continue
        if adapter.algo is None:
            log.debug("weight difference instead of an adapter for %s (%s)", path, type(module).__name__)
        if loaded is not None:
            _load_diffs(adapter, loaded)
        targets[path], adapters[path] = module, adapter
    if not adapters:
        raise ValueError(_nothing_selected(config, prefix))
    _log_continued(weights, adapters, config)
    network = LoraNetwork(model, targets, adapters)
    network._patch()
    return network


def adapter_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The one place that decides where adapters live: the device the layers compute on.

    Under ComfyUI's low-VRAM loading a layer's weight rests on the offload device and is cast onto
    the compute device inside the layer's forward (`comfy/ops.py` cast_bias_weight), so no weight's
    device says where the layer computes: the caller gives it (the training loop: the latents'
    device). None is for a model wholly on one real device (tests, scripts): that device; a model
    whose parameters rest on several devices, or on "meta", is refused.
    """
    if device is not None:
        return torch.device(device)
    resting = {p.device for p in model.parameters()}
    if len(resting) > 1 or any(d.type == "meta" for d in resting):
        names = ", ".join(sorted(str(d) for d in resting))
        raise ValueError(f"device: not given, and the model's weights rest on {names} (offloaded or not loaded); "
                         "give the device the layers compute on")
    return resting.pop() if resting else torch.device("cpu")


def _maker(path: str, module: nn.Module, config: LoraConfig, generator: torch.Generator, device: torch.device,
           loaded: LayerWeights | None) -> Callable[[LayerShape], Algorithm]:
    """The builder of one layer's algorithm: fresh (drawing from `generator` in every case, so the
    other layers' init does not depend on which ones a file holds), or the file's. An algorithm that
    reads the base weight (DoRA) gets it through `readable_weight`, checked here before the model is
    patched."""
    weight = lambda: readable_weight(path, module)  # noqa: E731 (fetched when needed: DoRA's norm)

    def make(shape: LayerShape) -> Algorithm:
        chosen = ALGORITHMS[loaded.algorithm if loaded is not None and loaded.algorithm else config.algorithm]
        if chosen.READS_WEIGHT:
            weight()
        fresh = ALGORITHMS[config.algorithm].create(shape, config.options(shape), generator, device, weight)
        if loaded is None or loaded.algorithm is None:
            return fresh
        return chosen.load(shape, loaded.tensors, device, weight)

    return make


def _nothing_selected(config: LoraConfig, prefix: str = "") -> str:
    """The error for a selection that leaves nothing to train, in the node's input names."""
    if prefix:  # a second model's layers: a text encoder's
        return (f"include_layers / exclude_layers: {config.include or ''!r} / {config.exclude or ''!r} select no "
                f"layer of the text encoder (paths such as '{prefix}text_model.encoder.layers.0.mlp.fc1'); widen "
                "include_layers, narrow exclude_layers, or set text_encoder_lr to 0")
    chosen = [f"target {config.target!r}"]
    chosen += [f"{name} {value!r}" for name, value in (("include_layers", config.include),
                                                        ("exclude_layers", config.exclude)) if value]
    return (f"include_layers / exclude_layers / target: {', '.join(chosen)} select no layer of this model that can "
            "be trained; widen include_layers (its regex must match module paths such as 'input_blocks.1.1'), "
            "narrow or clear exclude_layers, or choose target 'all'")


def _log_continued(weights: dict[str, LayerWeights], adapters: dict[str, LayerAdapter], config: LoraConfig) -> None:
    """Say what a continued file brings beyond the settings: differences trained although train_norms /
    train_biases are off, and layers left out (not selected), whose tensors the output will not have."""
    diffs = sum(1 for w in weights.values() for t in (w.diff, w.diff_b) if t is not None)
    if diffs and not (config.train_norms and config.train_biases):
        log.info("the LoRA continued holds %d weight/bias differences (diff/diff_b); they are trained on with it "
                 "(train_norms / train_biases off apply to layers it does not hold)", diffs)
    left_out = sorted(set(weights) - set(adapters))
    if left_out:
        log.warning("the LoRA continued has %d layers that target / include_layers / exclude_layers leave out "
                    "(first: %s); they are not trained and not in the output LoRA; widen the selection to keep "
                    "them", len(left_out), left_out[0])


def _load_diffs(adapter: LayerAdapter, loaded: LayerWeights) -> None:
    """Copy a file's diff / diff_b into the adapter's fp32 master weights (shapes checked by formats)."""
    if adapter.diffs is None:
        return
    with torch.no_grad():
        if loaded.diff is not None and adapter.diffs.diff is not None:
            adapter.diffs.diff.copy_(loaded.diff)
        if loaded.diff_b is not None and adapter.diffs.diff_b is not None:
            adapter.diffs.diff_b.copy_(loaded.diff_b)
