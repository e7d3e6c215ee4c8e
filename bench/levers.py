"""The memory levers on the bundled tiny model: what each saves, what it costs in time, and the estimate.

    python -m comfyui_lora_trainer.bench.levers [--quick] [--json PATH] [--repeats N]

The model is the tiny denoiser at SD1.x width (TinyConfig.wide(): 320 channels, context 768), its
Linear/Conv/norm layers storing bf16 weights and casting them in forward as ComfyUI's do
(bench/bases.py `cast_layers`), 64×64×4 latents, batch 2, LoRA rank 16, fp32 compute on the CPU.
Cases, each on top of `base` (AdamW, no checkpointing):
- checkpointing: gradient checkpointing per block (Train LoRA's default);
- step_in_backward: each adapter stepped as its gradient is made (training/optim.py BackwardSteps);
- AdamW8bit: bitsandbytes' 8-bit moments;
- offload: the frozen Linear/Conv weights rest off the compute device (on "meta", values held aside,
  as ComfyUI's partial loading keeps them in RAM) and are cast in on use; with checkpointing, as it
  is used;
- all: checkpointing + step_in_backward + AdamW8bit + offload.
Memory per case: the estimate (training/memory.py, fake tensors) and the same two steps run for real
under the live-bytes counter, above the weights; plus the weights resident on the compute device.
Time per step: every case's steps interleaved in one process (one step of each in turn, after a
warm-up), the median of `repeats`, so machine noise hits all alike. The CPU cannot show an offload's
real cost (a host-to-device copy per layer on a GPU; bench/gpu_check.py measures that there).
Writes JSON (default bench/results/levers.json) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch

from ..lora import inject
from ..tiny.host import tiny_fns
from ..tiny.model import TinyConfig, build_tiny
from ..training.checkpointing import training_forward
from ..training.config import TrainConfig
from ..training.loop import Trainer, lora_config_of
from ..training.memory import MIB, estimate
from .bases import cast_layers
from .speed import machine, write_json

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "levers.json"
BASE = TrainConfig(batch_size=2, rank=16, gradient_checkpointing=False, training_dtype="fp32", lora_dtype="fp32",
                   learning_rate=1e-4)
CASES: dict[str, tuple[dict, bool]] = {  # name → (TrainConfig changes, offloaded weights)
    "base": ({}, False),
    "checkpointing": ({"gradient_checkpointing": True}, False),
    "step_in_backward": ({"step_in_backward": True}, False),
    "AdamW8bit": ({"optimizer": "AdamW8bit"}, False),
    "offload": ({}, True),
    "offload+checkpointing": ({"gradient_checkpointing": True}, True),
    "all": ({"gradient_checkpointing": True, "step_in_backward": True, "optimizer": "AdamW8bit"}, True),
}


def build(offload: bool, quick: bool):
    """The model, its ModelFns and the latents (bf16 cast layers; `offload`: Linear/Conv weights off-device)."""
    torch.manual_seed(0)
    config = TinyConfig(width=64, context_dim=128) if quick else TinyConfig.wide()
    model = build_tiny("eps", config)
    cast_layers(model.net, torch.bfloat16, offload=offload)
    for p in model.net.parameters():
        p.requires_grad_(False)
    size = 16 if quick else 64
    contexts = torch.randn(1, 77, config.context_dim, generator=torch.Generator().manual_seed(1))
    latents = torch.randn(4, 4, size, size, generator=torch.Generator().manual_seed(2))
    return model, tiny_fns(model, contexts), latents


def memory(name: str, quick: bool) -> dict[str, object]:
    changes, offload = CASES[name]
    model, fns, latents = build(offload, quick)
    config = replace(BASE, **changes)
    blocks = list(model.net.blocks)
    guess = estimate(model.net, fns, latents, config, checkpoint_blocks=blocks)
    real = estimate(model.net, fns, latents, config, checkpoint_blocks=blocks, fake=False)
    return {"estimate": guess.as_dict(), "measured": real.as_dict(), "ratio": guess.step / real.step}


def seconds_per_step(repeats: int, quick: bool) -> dict[str, float]:
    """Median seconds per optimizer step of every case, interleaved in this process (each case its own model)."""
    times: dict[str, list[float]] = {name: [] for name in CASES}
    names = list(CASES)
    with ExitStack() as stack:
        trainers = {}
        for name, (changes, offload) in CASES.items():
            model, fns, latents = build(offload, quick)
            config = replace(BASE, **changes, steps=repeats + 2)
            network = stack.enter_context(inject(model.net, lora_config_of(config), seed=0, device="cpu"))
            stack.enter_context(training_forward(model.net, list(model.net.blocks), config.gradient_checkpointing))
            trainers[name] = Trainer(network, fns, list(latents.unbind(0)), config)
        for repeat in range(repeats + 1):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                started = time.perf_counter()
                trainers[name].step()
                if repeat:  # the first round warms up
                    times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def run(repeats: int, quick: bool) -> dict[str, object]:
    cases = {name: memory(name, quick) for name in CASES}
    for name, seconds in seconds_per_step(repeats, quick).items():
        cases[name]["seconds_per_step"] = seconds
    return {"settings": {"model": "tiny, 64 wide" if quick else "tiny, SD1.x width (320, context 768)",
                         "latent": [2, 4, 16, 16] if quick else [2, 4, 64, 64], "rank": BASE.rank,
                         "base": "bf16, cast in forward", "compute": "fp32 cpu", "repeats": repeats},
            "machine": machine(), "cases": cases}


def markdown(result: dict[str, object]) -> str:
    cases = result["cases"]
    base = cases["base"]
    lines = ["| case | weights on device | step (estimate) | step (measured) | estimate/measured | saved vs base "
             "| s/step | time vs base |", "|---|---|---|---|---|---|---|---|"]
    for name, r in cases.items():
        step, measured = r["estimate"]["step_mib"], r["measured"]["step_mib"]
        saved = 1 - (r["estimate"]["total_mib"] / base["estimate"]["total_mib"])
        lines.append(f"| {name} | {r['estimate']['weights_mib']:.1f} MiB | {step:.1f} MiB | {measured:.1f} MiB | "
                     f"{r['ratio']:.3f} | {saved:+.0%} | {r['seconds_per_step']:.3f} | "
                     f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and few repeats (the smoke test)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    result = run(args.repeats or (2 if args.quick else 10), args.quick)
    print(markdown(result))
    write_json(result, args.json)


if __name__ == "__main__":
    main()
