"""ComfyUI glue for Train LoRA's high_noise_model: both experts of Wan 2.2 A14B in one run
(training/experts.py), `model` being the low-noise expert.

Imported only when the node runs. The high-noise expert gets its own guider (`Guider_Basic`), which
prepares it as the main guider prepares `model`: ComfyUI loads it and encodes the captions for it. Its
sampler (`_Nested`) only keeps the prepared model wrap and runs the training sampler of `model` inside,
so both experts' callables exist while the engine trains. Only one expert's weights are resident at a
time: before a step of the other expert, ComfyUI's model management unloads this one (`model_unload`,
as `free_memory` does) and loads that one (`load_models_gpu`); on the CPU both stay where they are.
"""
from __future__ import annotations

import logging
from typing import Callable

import comfy.model_management
import comfy.samplers
import torch
from comfy_extras.nodes_custom_sampler import Guider_Basic

from ..training.experts import Expert, train_experts
from ..training.checkpointing import model_blocks
from ..training.config import TrainConfig
from ..training.loop import ModelFns, TrainResult
from .common import NONE_LORA

log = logging.getLogger(__name__)

LOW, HIGH = "low_noise", "high_noise"
# Train LoRA's settings a two-expert run does not take yet, and the value that turns each off
_UNSUPPORTED = {"save_every": 0, "resume": "", "offload": False, "ema_decay": 0.0, "text_encoder_lr": 0.0,
                "dop_multiplier": 0.0, "blank_prompt_multiplier": 0.0}


def check_experts(model, high_noise_model, config: TrainConfig, existing_lora: str, connected: dict[str, bool]) -> None:
    """ValueError naming the input when the two models are not two experts of one architecture, or the run asks
    for what a two-expert run does not do yet. `connected`: Train LoRA's optional inputs, connected or not."""
    if high_noise_model.model is model.model:
        raise ValueError("high_noise_model: is the same model as model; connect the high-noise expert here and the "
                         "low-noise expert to model (Wan 2.2 A14B: wan2.2_t2v_high_noise_14B and …_low_noise_14B)")
    kinds = [type(m.model.model_config).__name__ for m in (model, high_noise_model)]
    shapes = [{k: tuple(v.shape) for k, v in m.model.diffusion_model.state_dict().items()}
              for m in (model, high_noise_model)]
    if kinds[0] != kinds[1] or shapes[0] != shapes[1]:
        differ = "a " + kinds[1] + " model" if kinds[0] != kinds[1] else "a model of other layer shapes"
        raise ValueError(f"high_noise_model: {differ}, but model is a {kinds[0]}; the two experts must be one "
                         "architecture (Wan 2.2 A14B's high-noise and low-noise models, both loaded the same way)")
    if config.expert != "none":
        raise ValueError(f"expert: got {config.expert}, but high_noise_model is connected, which trains both experts; "
                         "set the options' expert to none, or disconnect high_noise_model to train one expert")
    for name, off in _UNSUPPORTED.items():
        if getattr(config, name) != off:
            raise ValueError(f"{name}: got {getattr(config, name)!r}, but a run of both experts does not take it yet; "
                             f"set it to {off!r}, or train each expert in a run of its own (the options' expert)")
    if existing_lora not in (None, "", NONE_LORA):
        raise ValueError("existing_lora: a run of both experts starts fresh; set it to None, or continue each "
                         "expert's file in a run of its own (the options' expert)")
    for name, on in connected.items():
        if on:
            raise ValueError(f"{name}: a run of both experts does not take it yet; disconnect it, or train each "
                             "expert in a run of its own (the options' expert)")


class HighNoiseExpert:
    """The high-noise expert of the run: its guider, and once that prepared it, its model wrap and extra args."""

    def __init__(self, patcher, conds: list, seed: int):
        self.patcher, self.seed = patcher, seed
        self.guider = Guider_Basic(patcher)
        self.guider.set_conds(conds)
        self.wrap = None
        self.extra_args: dict = {}
        self.switches = 0

    def nest(self, sampler: comfy.samplers.Sampler, model_wrap, sigmas, extra_args, callback, noise, latent_image,
             denoise_mask, disable_pbar) -> torch.Tensor:
        """Run the high-noise expert's guider; its sampler keeps the wrap and runs `sampler` (the training
        sampler, called by the main guider with `model_wrap`) inside, with both experts prepared."""
        expert = self

        class _Nested(comfy.samplers.Sampler):
            def sample(self, wrap, sigmas_, extra_args_, *args, **kwargs):
                expert.wrap, expert.extra_args = wrap, extra_args_
                try:
                    sampler.sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                   disable_pbar)
                finally:
                    expert.wrap = None
                return torch.zeros_like(noise)

        self.guider.sample(torch.zeros_like(latent_image), torch.zeros_like(latent_image), _Nested(),
                           torch.tensor([1.0, 0.0]), seed=self.seed)
        return torch.zeros_like(latent_image)

    def train(self, sampler, low_wrap, net, fns: ModelFns, latents: list[torch.Tensor], release, shaped_conds,
              base_model_of) -> TrainResult:
        """Both experts through the engine: `model` (low noise, `net` and `fns`) first, then this one, whose
        captions are prepared for it (`shaped_conds(wrap)`) and its inference tensors released (`release`)."""
        high_base = self.wrap.inner_model
        release(high_base.diffusion_model)
        high_fns = sampler._model_fns(self.wrap, high_base.model_sampling, self.extra_args, sampler.captions,
                                      [x.shape for x in sampler.latents], conds=shaped_conds(self.wrap))
        patchers = {LOW: low_wrap.model_patcher, HIGH: self.wrap.model_patcher}
        experts = [Expert(LOW, net, fns, model_blocks(net), self._resident(LOW, patchers)),
                   Expert(HIGH, high_base.diffusion_model, high_fns, model_blocks(high_base.diffusion_model),
                          self._resident(HIGH, patchers))]
        result = train_experts(experts, latents, sampler.config, hooks=sampler.hooks.hooks(),
                               base=base_model_of(low_wrap.inner_model), samples=sampler.samples)
        log.info("Train LoRA: experts: %s; %d switches, each leaving only the step's expert loaded",
                 ", ".join(f"{name} {result.experts.count(name)} steps" for name in (HIGH, LOW)), self.switches)
        return result

    def _resident(self, name: str, patchers: dict) -> Callable[[], None]:
        """Make expert `name` the one loaded: unload the other (ComfyUI's `model_unload`, as `free_memory` does),
        load this one (`load_models_gpu`), and check in ComfyUI's list of loaded models that it is so."""
        mine = patchers[name]
        others = [p for n, p in patchers.items() if n != name]

        def resident() -> None:
            loaded = comfy.model_management.current_loaded_models
            for i in reversed(range(len(loaded))):
                if loaded[i].model is not None and any(loaded[i].model.is_clone(p) for p in others):
                    loaded[i].model_unload()
                    loaded.pop(i)
            comfy.model_management.load_models_gpu([mine])
            held = [n for n, p in patchers.items() if any(m.model is not None and m.model.is_clone(p) for m in loaded)]
            if held != [name]:
                raise RuntimeError(f"Train LoRA: switching to the {name} expert left {held} loaded")
            self.switches += 1

        return resident
