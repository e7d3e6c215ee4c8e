"""Noise-range experts trained in one run, one LoRA each (Wan 2.2 A14B).

Wan 2.2 A14B is two networks of the Wan 2.1 architecture: a high-noise expert for σ ≥ boundary and a
low-noise expert below it (0.875 for T2V, 0.9 for I2V: Wan's `boundary` in wan/configs; its samplers
switch on `t >= boundary · 1000` with t the shifted timestep, 1000·σ for these flow models).

Each optimizer step trains one expert, every row at a noise level in that expert's range: the step first
draws which expert, with the probability that a level drawn from the whole configured distribution lands
in its range (objective.py `window_mass`), then its rows' levels from the distribution truncated to the
range (`draw_percent`'s window). Over the run the levels follow the configured distribution, as when one
model trains. This is musubi-tuner's scheme (wan_train_network.py: the batch's first draw picks the
expert and the other rows are redrawn until they fall in its range), except that musubi trains one LoRA
for both experts, and here each has its own. Only the step's expert needs its weights resident: the host's
`resident` callback makes them so when the expert changes (ComfyUI: load that model, unload the other).
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch import nn

from ..lora import DTYPES, MODULE_PATHS, BaseModel, LoraStateDict, inject, to_state_dict
from ..lora.metadata import PREFIX, ExpertLoras, expert_metadata
from .checkpointing import training_forward
from .config import TrainConfig
from .data import Samples, flatten_latents
from .distributed import current as current_shard
from .loop import Hooks, TrainResult, Trainer, _metadata, _Run, lora_config_of
from .objective import ModelFns, Objective, expert_range, window_mass

EXPERT_STEPS = PREFIX + "expert_steps"  # how many of the run's steps trained this expert


@dataclass(frozen=True)
class Expert:
    """One expert: its name (`high_noise`, `low_noise`: objective.py `expert_range`), its frozen network, how
    the engine drives it, the blocks gradient checkpointing wraps, and `resident`, called when a step is about
    to train it after another expert's step (the host's weight swap; None: nothing to do)."""

    name: str
    net: nn.Module
    fns: ModelFns
    checkpoint_blocks: Sequence[nn.Module] = ()
    resident: Callable[[], None] | None = None


class Router:
    """Picks each optimizer step's expert: one uniform draw against the experts' shares of the configured
    distribution; returns that expert's Objective (which draws inside its range) and makes it resident."""

    def __init__(self, experts: Sequence[Expert], config: TrainConfig, device: torch.device):
        self.experts = list(experts)
        self.objectives = [Objective(e.fns, config, device, sigma_range=expert_range(e.name, config.expert_boundary))
                           for e in self.experts]
        shares = [window_mass(config, o.window) for o in self.objectives]
        self.shares = [s / sum(shares) for s in shares]
        self.current: str | None = None  # the resident expert

    def pick(self, generator: torch.Generator) -> Objective:
        u, edge = float(torch.rand(1, generator=generator)), 0.0
        chosen = len(self.experts) - 1
        for i, share in enumerate(self.shares[:-1]):
            edge += share
            if u < edge:
                chosen = i
                break
        expert = self.experts[chosen]
        if expert.name != self.current:
            if expert.resident is not None:
                expert.resident()
            self.current = expert.name
        return self.objectives[chosen]


def train_experts(experts: Sequence[Expert], latents: torch.Tensor | Sequence[torch.Tensor], config: TrainConfig, *,
                  hooks: Hooks | None = None, base: BaseModel | None = None,
                  samples: Samples | None = None) -> TrainResult:
    """Train one LoRA per expert in one run (the module docstring: each step one expert, in its range); every
    network is left exactly as it was, also on error. The result's `lora` is an ExpertLoras: the first expert's
    LoRA, with every expert's under `experts` (each file's metadata names its expert and range), and its
    `experts` lists the expert each step trained. `base` names the model for the files (the experts are one
    architecture). No checkpoints (`hooks.save` is not called), text encoder or preservation losses yet.
    """
    names = [e.name for e in experts]
    if sorted(names) != ["high_noise", "low_noise"]:
        raise ValueError(f"experts: got {names}; give a high_noise and a low_noise expert")
    if config.expert != "none":
        raise ValueError(f"expert: got {config.expert}, but both experts train in this run (each on its own range); "
                         "set expert to none, or train one expert alone with only its model")
    for name in ("text_encoder_lr", "dop_multiplier", "blank_prompt_multiplier"):
        if getattr(config, name):
            raise ValueError(f"{name}: got {getattr(config, name)}, but a run of two experts does not train it yet; "
                             f"set {name} to 0, or train each expert in a run of its own (the options' expert)")
    started = time.time()
    images = flatten_latents(latents)
    samples = samples or Samples.plain(len(images))
    samples.check(images)
    device = images[0].device
    router = Router(experts, config, device)  # refuses options a model cannot take, before patching
    naming = base.naming if base is not None else MODULE_PATHS
    with ExitStack() as stack:
        network = forward = None
        for expert in experts:
            injected = inject(expert.net, lora_config_of(config), seed=config.seed, device=device)
            if network is None:  # the first expert's paths as they are, the others' after their name
                network = stack.enter_context(injected)
            else:
                try:
                    network.join(injected, prefix=expert.name + ".", apart=False)  # the same LR
                except BaseException:
                    injected.remove()
                    raise
            entered = stack.enter_context(training_forward(expert.net, expert.checkpoint_blocks,
                                                           config.gradient_checkpointing))
            forward = entered if forward is None else forward
        trainer = Trainer(network, experts[0].fns, images, config, 0, current_shard(), samples, router=router)
        shown = [images[alternatives[0]] for alternatives in samples.alternatives]
        run = _ExpertRun(trainer, replace(hooks or Hooks(), save=None), (shown, base, started, naming), names)
        return run.loop(forward)


def split_weights(weights: dict, names: Sequence[str]) -> dict[str, dict]:
    """A joined network's weights (the first expert's paths as they are, the others' after `<name>.`) → per
    expert, on its own module paths."""
    out: dict[str, dict] = {name: {} for name in names}
    for path, w in weights.items():
        owner = next((n for n in names[1:] if path.startswith(n + ".")), names[0])
        out[owner][path[len(owner) + 1:] if owner != names[0] else path] = w
    return out


class _ExpertRun(_Run):
    """The loop of `_Run` (no validation, no resume); its result is one LoRA per expert of `names`."""

    def __init__(self, trainer: Trainer, hooks: Hooks, describe: tuple, names: Sequence[str]) -> None:
        super().__init__(trainer, hooks, None, 0, describe)
        self.names = list(names)

    def result(self, cancelled: bool = False, checkpoint: str | None = None) -> TrainResult:
        (images, base, started, naming), trainer, config = self.describe, self.trainer, self.config
        total = trainer.existing_steps + trainer.step_count
        loras = {}
        with trainer.evaluation(saving=True):
            share = trainer.network.difference_share()
            for name, weights in split_weights(trainer.network.weights(), self.names).items():
                sd = {k: v.clone() for k, v in to_state_dict(weights, DTYPES[config.lora_dtype], naming).items()}
                meta = {**_metadata(config, total, sd, images, base, share, started),
                        **expert_metadata(name, config.expert_boundary), EXPERT_STEPS: str(trainer.experts.count(name))}
                loras[name] = LoraStateDict(sd, meta)
        lora = ExpertLoras(loras, self.names[0])
        return TrainResult(lora, list(trainer.losses), total, cancelled, lora.metadata, [], checkpoint,
                           experts=list(trainer.experts))
