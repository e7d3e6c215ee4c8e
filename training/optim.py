"""Optimizers and the learning-rate schedule (the loss functions live in training/objective.py).

`lr_at(step)` is a pure function (nanoGPT's `get_lr` shape): 1) linear warmup from 0, then
2) constant, linear decay, cosine decay, or cosine with hard restarts (`lr_restarts` cycles, as
Hugging Face's `get_cosine_with_hard_restarts_schedule_with_warmup`), decaying to
`min_learning_rate` (0 by default) over the remaining steps.

`make_optimizer` builds the optimizer of the config's name with its default hyper-parameters besides
the LR and `weight_decay`. Adafactor is torch's own, with its step made absolute (`ADAFACTOR_EPS`).
The optional ones come from maintained packages, imported only when chosen (`_OPTIONAL`): Prodigy
from `prodigyopt`; AdamW8bit from `bitsandbytes` (AdamW whose two moments are stored as 8-bit codes
with a scale per block of 256, fp32 for tensors under 4096 elements); Lion (Chen et al. 2023) and
CAME (Luo et al. 2023) from `pytorch_optimizer`, one pure-torch package with both; AdamWScheduleFree
(Defazio et al. 2024) from `schedulefree`, its authors' package. LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models")
puts the `up` matrices in a parameter group whose LR is `lora_plus_ratio` times the base LR: each
group's "lr_ratio" scales the schedule's LR.
"""
from __future__ import annotations

import importlib
import math
from typing import Collection, Iterable

import torch

from .config import TrainConfig

_TORCH_OPTIMIZERS = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "RMSprop": torch.optim.RMSprop,
    "Adafactor": torch.optim.Adafactor,
}
UP_SUFFIX = "lora_up"  # the LoRA/DoRA parameter LoRA+ speeds up


# optional optimizers: name → (module, class, the pip package that provides it)
_OPTIONAL = {
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "Lion": ("pytorch_optimizer", "Lion", "pytorch_optimizer"),
    "CAME": ("pytorch_optimizer", "CAME", "pytorch_optimizer"),
    "AdamWScheduleFree": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
}
# Adafactor's eps2 bounds the weights' RMS its step is relative to: torch's 1e-3 gives a zero-initialised
# up matrix steps of 1e-3·lr. At 1 the step is the LR for any weight of RMS ≤ 1 (every LoRA's), as
# transformers' Adafactor with relative_step=False, scale_parameter=False (kohya's advice for LoRAs).
ADAFACTOR_EPS = (None, 1.0)


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name not in _OPTIONAL:
        return _TORCH_OPTIMIZERS[name]
    module, attribute, package = _OPTIONAL[name]
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError:
        raise ImportError(f"optimizer: {name} needs the optional package {package}, which is not installed; install "
                          f"it with the Python that runs ComfyUI (python -m pip install {package}), or choose "
                          "AdamW") from None


def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], config: TrainConfig,
                 text_encoder: Collection[int] = ()) -> list[dict]:
    """One group, or with LoRA+ two: the rest (lr_ratio 1) and the up matrices (lr_ratio = lora_plus_ratio).
    The parameters whose id is in `text_encoder` (a trained text encoder's) get groups of their own after
    those, their lr_ratio times text_encoder_lr / learning_rate."""
    named = list(named)
    ratio = config.text_encoder_lr / config.learning_rate
    groups = []
    for ours, scale in ((False, 1.0), (True, ratio)):
        part = [(n, p) for n, p in named if (id(p) in text_encoder) == ours]
        if ours and not part:
            continue
        if config.lora_plus_ratio == 1.0:
            groups.append({"params": [p for _, p in part], "lr_ratio": scale})
            continue
        groups.append({"params": [p for n, p in part if not n.endswith(UP_SUFFIX)], "lr_ratio": scale})
        groups.append({"params": [p for n, p in part if n.endswith(UP_SUFFIX)], "lr_ratio": scale * config.lora_plus_ratio})
    return groups


def make_optimizer(named: Iterable[tuple[str, torch.nn.Parameter]], config: TrainConfig,
                   text_encoder: Collection[int] = ()) -> torch.optim.Optimizer | BackwardSteps:
    """The config's optimizer over `named` (name, parameter) pairs, at the config's LR (`text_encoder`: the
    ids of a text encoder's, at text_encoder_lr: `param_groups`); with `step_in_backward`, one per parameter,
    stepped in the backward pass (BackwardSteps)."""
    groups = param_groups(named, config, text_encoder)
    params = [p for g in groups for p in g["params"]]
    kwargs: dict[str, object] = {"lr": config.learning_rate}
    if config.weight_decay >= 0:  # -1: the optimizer's own default
        kwargs["weight_decay"] = config.weight_decay
    fusable = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    if config.optimizer in ("AdamW", "Adam") and fusable:  # one fused kernel instead of a loop over tensors
        kwargs["fused"] = True
    if config.optimizer == "Adafactor":
        kwargs["eps"] = ADAFACTOR_EPS
    kind = _optimizer_class(config.optimizer)
    if config.step_in_backward:
        steps = []
        for g in groups:
            for p in g["params"]:
                # optimizer_on_cpu: the optimizer steps an fp32 copy in RAM, whose values go back to the adapter
                host = torch.nn.Parameter(p.detach().to("cpu", copy=True)) if config.optimizer_on_cpu else None
                steps.append((p, host, kind([{**g, "params": [host if host is not None else p]}], **kwargs)))
        return BackwardSteps(steps)
    optimizer = kind(groups, **kwargs)
    if config.optimizer == "AdamWScheduleFree":  # schedule-free: steps only in its training mode (loop.py `evaluation`)
        optimizer.train()
    return optimizer


class BackwardSteps:
    """Gradients released as they are made: each parameter has an optimizer of its own, stepped from the
    parameter's post-accumulate-grad hook as soon as backward has its gradient, which is then freed. So
    the step never holds every gradient at once (kohya's --fused_backward_pass, PyTorch's "optimizer in
    backward" recipe). For an optimizer whose update of a parameter reads only that parameter (AdamW, Adam,
    SGD, RMSprop, Adafactor, AdamW8bit, Lion, CAME) the result is bit-identical to one step over all of
    them; a rule that needs every gradient first (clipping the total norm, summing micro-batches, averaging
    over processes, Prodigy's shared step size) cannot run this way (TrainConfig and Trainer refuse those).

    Presents the optimizer interface the Trainer uses: `param_groups` (each parameter's group, so the
    schedule's LR reaches them), `step()` (nothing left to do), `zero_grad`, `state`, and a
    `state_dict()` in torch's layout over all parameters, so checkpoints and resume work unchanged."""

    def __init__(self, optimizers: list[tuple[torch.nn.Parameter, torch.nn.Parameter | None, torch.optim.Optimizer]]):
        """`optimizers`: (parameter, its copy in RAM that the optimizer steps or None, optimizer)."""
        self.steps = optimizers
        self.optimizers = [o for _, _, o in optimizers]
        self.armed = True
        self.handles = [p.register_post_accumulate_grad_hook(self._stepper(p, host, o)) for p, host, o in optimizers]

    @property
    def param_groups(self) -> list[dict]:
        """Every parameter's group (the live ones: loading a state replaces them)."""
        return [g for o in self.optimizers for g in o.param_groups]

    def arm(self, armed: bool) -> None:
        """Whether the next backward steps (the step's last); before it, gradients accumulate as usual (a
        batch of several latent sizes runs one backward per size)."""
        self.armed = armed

    def _stepper(self, param: torch.nn.Parameter, host: torch.nn.Parameter | None, optimizer: torch.optim.Optimizer):
        def step(_param: torch.nn.Parameter) -> None:
            if self.armed:
                _apply(param, host, optimizer)
        return step

    def step(self) -> None:
        """Each parameter stepped when its gradient was made; one whose gradient came only before the last
        backward (an adapter module dropout skipped then) steps now."""
        for param, host, optimizer in self.steps:
            if param.grad is not None:
                _apply(param, host, optimizer)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def state_dict(self) -> dict:
        state, groups = {}, []
        for i, optimizer in enumerate(self.optimizers):
            own = optimizer.state_dict()
            if own["state"]:
                state[i] = own["state"][0]
            groups.append({**own["param_groups"][0], "params": [i]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """The saved optimizer state; the copies in RAM (optimizer_on_cpu) take the adapters' values, which
        the caller loaded first."""
        with torch.no_grad():
            for param, host, _ in self.steps:
                if host is not None:
                    host.copy_(param)
        state, groups = state_dict["state"], state_dict["param_groups"]
        if len(groups) != len(self.optimizers):
            raise ValueError(f"resume: the training state has {len(groups)} optimizer groups, this run "
                             f"{len(self.optimizers)} parameters; it was saved without step_in_backward, or for "
                             "other layers: match step_in_backward to the saved run, or clear resume")
        for i, optimizer in enumerate(self.optimizers):
            own = state.get(i, state.get(str(i)))
            optimizer.load_state_dict({"state": {0: own} if own is not None else {},
                                       "param_groups": [{**groups[i], "params": [0]}]})

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _apply(param: torch.nn.Parameter, host: torch.nn.Parameter | None, optimizer: torch.optim.Optimizer) -> None:
    """One optimizer step of one parameter, its gradient then freed; with a copy in RAM (optimizer_on_cpu),
    the gradient goes there, the step runs there, and the new values come back."""
    if host is None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return
    host.grad, param.grad = param.grad.to("cpu", torch.float32), None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        param.copy_(host)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's LR into every group, times the group's lr_ratio (LoRA+)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `config.steps`."""
    base, floor, warmup, total = config.learning_rate, config.min_learning_rate, config.warmup_steps, config.steps
    # 1) warmup: linear from base/warmup up to base
    if step < warmup:
        return base * (step + 1) / warmup
    # 2) decay over the steps after warmup, from base to the floor
    if config.lr_schedule == "constant" or total <= warmup:
        return base
    progress = (step - warmup) / (total - warmup)
    if config.lr_schedule == "linear":
        return floor + (base - floor) * (1.0 - progress)
    if config.lr_schedule == "cosine_with_restarts":
        progress = (progress * config.lr_restarts) % 1.0  # each cycle restarts at base
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
