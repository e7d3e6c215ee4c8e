"""What does each training option do? Held-out denoising loss after a fixed step budget, per option,
against the defaults, on the tiny model in its three parameterisations (eps, v, flow).

For each option (one field changed from the defaults, training/config.py) and each of 3 seeds (LoRA
init, batch choice, noise), trains a LoRA on the demo images and reports the held-out denoising
error in the model's native space (training/evaluate.py: fixed noise levels and noises, never the
training draws), as the mean over seeds ± their standard deviation, and the change of the mean
against the defaults. Flow-only options are "n/a" on eps and v; Prodigy needs `prodigyopt`.

    python -m comfyui_lora_trainer.bench.options [--steps N] [--seeds N] [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..lora import merge_lora, resolve_state_dict
from ..tiny.demo import ASSETS
from ..tiny.host import tiny_fns
from ..tiny.model import build_tiny, encode_images
from ..tiny.text import encode_captions
from ..training.config import TrainConfig
from . import rows
from ..training.evaluate import heldout_loss
from ..training.images import load_image_folder
from ..training.loop import train

KINDS = ("eps", "v", "flow")
SIZE = 16  # latent side: small enough for the whole table in minutes on a CPU
LR = 2e-3
FLOW_ONLY = {"flow_shift"}
RESULTS = Path(__file__).resolve().parent / "results" / "options.json"

VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "timestep_sampling logit_normal (0, 1)": {"timestep_sampling": "logit_normal"},
    "timestep_sampling sigmoid (scale 1)": {"timestep_sampling": "sigmoid"},
    "min/max_timestep 100–900": {"min_timestep": 100, "max_timestep": 900},
    "flow_shift fixed 1 (no shift)": {"flow_shift": "fixed", "flow_shift_value": 1.0},
    "flow_shift resolution (Flux)": {"flow_shift": "resolution"},
    "loss_weighting min_snr (γ 5)": {"loss_weighting": "min_snr"},
    "loss_weighting debiased": {"loss_weighting": "debiased"},
    "noise_offset 0.05": {"noise_offset": 0.05},
    "multires_noise 6 × 0.3": {"multires_noise_iterations": 6},
    "ip_noise_gamma 0.1": {"ip_noise_gamma": 0.1},
    "network_dropout 0.1": {"network_dropout": 0.1},
    "rank_dropout 0.1": {"rank_dropout": 0.1},
    "module_dropout 0.1": {"module_dropout": 0.1},
    "caption_dropout 0.1": {"caption_dropout": 0.1},
    "weight_decay 0.1": {"weight_decay": 0.1},
    "lora_plus_ratio 16": {"lora_plus_ratio": 16.0},
    "optimizer Adafactor": {"optimizer": "Adafactor"},
    "optimizer Prodigy (lr 1)": {"optimizer": "Prodigy", "learning_rate": 1.0},
    "optimizer Lion (lr / 3)": {"optimizer": "Lion", "learning_rate": LR / 3},
    "optimizer CAME (lr / 10)": {"optimizer": "CAME", "learning_rate": LR / 10},
    "optimizer AdamWScheduleFree": {"optimizer": "AdamWScheduleFree"},
    "ema_decay 0.95": {"ema_decay": 0.95},
    "cosine_with_restarts × 3": {"lr_schedule": "cosine_with_restarts", "lr_restarts": 3},
    "cosine to min_learning_rate 10 %": {"lr_schedule": "cosine", "min_learning_rate": LR / 10},
}


PACKAGES = {"Prodigy": "prodigyopt", "Lion": "pytorch_optimizer", "CAME": "pytorch_optimizer",
            "AdamWScheduleFree": "schedulefree"}


def available(overrides: dict[str, object], kind: str) -> bool:
    if FLOW_ONLY & set(overrides) and kind != "flow":
        return False
    package = PACKAGES.get(str(overrides.get("optimizer")))
    return package is None or importlib.util.find_spec(package) is not None


def measure(kind: str, overrides: dict[str, object], seed: int, steps: int) -> float:
    """Held-out native loss of a LoRA trained `steps` steps with `overrides` (fresh model each time)."""
    image_set = load_image_folder(ASSETS, "Stretch", SIZE, SIZE)
    latents = encode_images(image_set.images)
    model = build_tiny(kind)
    contexts = encode_captions(image_set.captions, model.net.config.context_dim)
    uncond = encode_captions([""], model.net.config.context_dim)
    config = replace(TrainConfig(steps=steps, batch_size=2, learning_rate=LR, seed=seed, training_dtype="fp32",
                                 lora_dtype="fp32", gradient_checkpointing=False), **overrides)
    result = train(model.net, tiny_fns(model, contexts, uncond), latents, config)
    with merge_lora(model.net, resolve_state_dict(result.lora, model.net)):
        return heldout_loss(tiny_fns(model, contexts), latents, "native")


def run(steps: int, seeds: int, kinds: tuple[str, ...], variants: dict[str, dict]) -> dict:
    table: dict[str, dict[str, dict[str, float] | None]] = {}
    for name, overrides in variants.items():
        table[name] = {}
        for kind in kinds:
            if not available(overrides, kind):
                table[name][kind] = None
                continue
            losses = [measure(kind, overrides, seed, steps) for seed in range(seeds)]
            table[name][kind] = {"mean": statistics.fmean(losses),
                                 "std": statistics.stdev(losses) if len(losses) > 1 else 0.0, "runs": losses}
            print(f"{name} / {kind}: {losses}", file=sys.stderr, flush=True)  # progress, and a record if stopped
    return table


def markdown(table: dict, kinds: tuple[str, ...]) -> str:
    lines = ["| option | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    base = table["default"]
    for name, row in table.items():
        cells = []
        for kind in kinds:
            cell = row[kind]
            if cell is None:
                cells.append("n/a")
                continue
            text = f"{cell['mean']:.4f} ± {cell['std']:.4f}"
            if name != "default":
                text += f" ({100 * (cell['mean'] / base[kind]['mean'] - 1):+.1f} %)"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per option (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 seed, eps, a few options")
    rows.add_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    kinds, variants, steps, seeds = KINDS, VARIANTS, args.steps, args.seeds
    if args.quick:
        kinds, steps, seeds = ("eps",), 2, 1
        variants = {k: VARIANTS[k] for k in ("default", "loss_weighting min_snr (γ 5)", "rank_dropout 0.1",
                                             "flow_shift resolution (Flux)")}
    if args.only:
        variants, merged_into = rows.selected(parser, args, VARIANTS, RESULTS, ("default",))
    else:
        merged_into = None
    started = time.perf_counter()
    table = run(steps, seeds, kinds, variants)
    table = rows.merged(table, merged_into, VARIANTS)
    settings = {"steps": steps, "seeds": seeds, "kinds": list(kinds), "size": SIZE, "learning_rate": LR,
                "batch_size": 2, "seconds": round(time.perf_counter() - started, 1)}
    if merged_into is not None:
        settings["measured_now"] = list(variants)  # the other rows are the earlier run's
    print(f"Held-out native denoising loss after {steps} steps, mean ± std over {seeds} seed(s) "
          f"(change of the mean vs default); {settings['seconds']} s\n")
    print(markdown(table, kinds))
    report = {"settings": settings, "table": table}
    out = args.json if args.json is not None else (None if args.quick else RESULTS)
    if out is not None:
        out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
