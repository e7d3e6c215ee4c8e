"""The benchmark's configurations and the one training step each of them times.

A `Case` is a model size × a method × gradient checkpointing off/on, on the bundled tiny model
(tiny/model.py) in fp32 at batch 1, rank 8:

- `floor`: forward + backward of the frozen model with respect to its input only (no trainable
  parameters): the compute any LoRA trainer has to pay, because the gradient must flow back
  through every frozen layer to reach the adapters before it.
- `ours`: one `Trainer.step()` (training/loop.py, the step `train()` loops over) with the engine's
  forward-path adapters (`lora.injection`): LR, the gradient pass (noise, forward, loss, backward),
  the finiteness check (clipping only when the config asks), AdamW step, zero_grad.
  tests/test_bench.py checks that N of these give the same losses and LoRA as `train(steps=N)`.
- `rebuild`: the same step with the LoRA layers run as `W + scale·up·down` rebuilt each forward
  (bench/rebuild.py), on the same trainable parameters.

Gradient checkpointing wraps `model.net.blocks`, and the in-place guard `model.net`, as `train()` does. Each prepared case owns its own
model instance, so every case can stay patched while the benchmark interleaves them.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, NamedTuple

import torch

from ..lora import LoraConfig, LoraNetwork, inject, to_state_dict
from ..tiny.host import tiny_fns
from ..tiny.model import TinyConfig, TinyDiffusion, build_tiny
from ..tiny.text import encode_text
from ..training.checkpointing import training_forward
from ..training.config import TrainConfig
from ..training.loop import GradientPass, ModelFns, Trainer, lora_config_of
from .rebuild import weight_rebuild

SIZES: dict[str, tuple[Callable[[], TinyConfig], int]] = {
    "default": (TinyConfig.default, 32),  # model config, latent height = width
    "wide": (TinyConfig.wide, 64),
}
METHODS = ("floor", "ours", "rebuild")
ALGORITHM_METHODS = ("loha", "lokr", "dora")  # our engine with that algorithm instead of LoRA (docs/algorithms.md#cost-per-training-step)
RANK = 8
CONTEXT_TOKENS = 77  # an SD1.x CLIP context length
CAPTION = "a photo of a red fox sitting in the snow"


@dataclass(frozen=True)
class Case:
    """One configuration; its name reads `size/method/ckpt` or `size/method/plain`."""

    size: str
    method: str
    checkpointing: bool

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size: got {self.size!r}; choose one of {', '.join(SIZES)}")
        if self.method not in METHODS + ALGORITHM_METHODS:
            raise ValueError(f"method: got {self.method!r}; choose one of {', '.join(METHODS + ALGORITHM_METHODS)}")

    @property
    def name(self) -> str:
        return f"{self.size}/{self.method}/{'ckpt' if self.checkpointing else 'plain'}"

    @classmethod
    def parse(cls, name: str) -> Case:
        parts = name.split("/")
        if len(parts) != 3 or parts[2] not in ("ckpt", "plain"):
            raise ValueError(f"case: got {name!r}; write size/method/ckpt or size/method/plain, "
                             "e.g. wide/ours/plain")
        return cls(parts[0], parts[1], parts[2] == "ckpt")


def all_cases(sizes: tuple[str, ...] = tuple(SIZES)) -> list[Case]:
    """Every method with checkpointing off and on; the other algorithms on the wide model, off."""
    core = [Case(s, m, c) for s in sizes for c in (False, True) for m in METHODS]
    return core + [Case("wide", a, False) for a in ALGORITHM_METHODS if "wide" in sizes]


def bench_config(checkpointing: bool, steps: int = 100000, dtype: str = "fp32") -> TrainConfig:
    """fp32 (or `dtype` autocast), rank 8, batch 1, AdamW, constant LR: the benchmark's settings."""
    return TrainConfig(steps=steps, batch_size=1, rank=RANK, training_dtype=dtype, lora_dtype="fp32",
                       gradient_checkpointing=checkpointing)


def bench_inputs(size: str, seed: int = 0) -> tuple[TinyDiffusion, torch.Tensor, torch.Tensor]:
    """(model, context (1, 77, context_dim), latents (1, 4, H, W)) for a size, all seeded."""
    make_config, side = SIZES[size]
    model = build_tiny("eps", make_config(), seed=seed)
    context = encode_text(CAPTION, model.net.config.context_dim, CONTEXT_TOKENS)
    latents = torch.randn(1, model.net.config.in_channels, side, side,
                          generator=torch.Generator().manual_seed(seed))
    return model, context, latents


def lora_config(config: TrainConfig) -> LoraConfig:
    """The LoraConfig `train()` injects for a TrainConfig."""
    return lora_config_of(config)


def file_kib(case: Case) -> float:
    """Size of the case's adapter file in bf16, KiB (0 for the floor, which trains none)."""
    if case.method == "floor":
        return 0.0
    model = bench_inputs(case.size)[0]
    config = bench_config(case.checkpointing)
    if case.method in ALGORITHM_METHODS:
        config = replace(config, algorithm=case.method)
    with inject(model.net, lora_config(config), seed=config.seed) as network:
        sd = to_state_dict(network.weights(), torch.bfloat16)
    return sum(t.numel() * t.element_size() for t in sd.values()) / 1024


class EngineStep:
    """One `Trainer.step()` of the real loop; call → the step's loss."""

    def __init__(self, network: LoraNetwork, fns: ModelFns, latents: torch.Tensor, config: TrainConfig):
        self.trainer = Trainer(network, fns, list(latents.unbind(0)), config)

    def __call__(self) -> float:
        return self.trainer.step()


def floor_step(fns: ModelFns, latents: torch.Tensor, config: TrainConfig) -> Callable[[], float]:
    """The engine's noise → forward → loss → backward with the input as the only leaf needing grad."""

    def denoise(noisy: torch.Tensor, sigma: torch.Tensor, indices: list[int]) -> torch.Tensor:
        return fns.denoise(noisy.requires_grad_(), sigma, indices)

    gradients = GradientPass(fns._replace(denoise=denoise), list(latents.unbind(0)), config,
                             torch.Generator().manual_seed(config.seed))
    return gradients.run


class Prepared(NamedTuple):
    step: Callable[[], float]  # one step; returns its loss
    model: TinyDiffusion  # patched while the `with` lasts


@contextmanager
def prepared(case: Case, seed: int = 0, dtype: str = "fp32") -> Iterator[Prepared]:
    """A fresh model patched for `case`, and its step; the model is restored on exit.

    `dtype` is the training_dtype ("bf16": autocast over fp32 frozen weights, for the profiler).
    """
    model, context, latents = bench_inputs(case.size, seed)
    config = bench_config(case.checkpointing, dtype=dtype)
    if case.method in ALGORITHM_METHODS:
        config = replace(config, algorithm=case.method)
    fns = tiny_fns(model, context)
    with ExitStack() as stack:
        if case.method == "floor":
            step = floor_step(fns, latents, config)
        else:
            network = stack.enter_context(inject(model.net, lora_config(config), seed=config.seed))
            if case.method == "rebuild":
                stack.enter_context(weight_rebuild(model.net, network))
            step = EngineStep(network, fns, latents, config)
        stack.enter_context(training_forward(model.net, model.net.blocks, case.checkpointing))
        yield Prepared(step, model)
