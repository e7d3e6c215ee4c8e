"""What the LoRA learns against what it must not touch: EMA, preservation, a regularisation set and the
optimizers on the pretrained tiny base.

Each variant (fields changed from the demo's settings, training/config.py) trains a LoRA on four of
the six bundled images ("lrtstyle": their palette and frame) for each of 3 seeds and is scored on
- style: the held-out denoising loss (training/evaluate.py, fixed noises and levels) on the two
  bundled images it never trained on, with their captions: what the LoRA learnt of the style;
- fresh shapes: the same loss on 24 fresh procedural pictures (the base's own kind, captions without
  the trigger): what the base knew and the LoRA must keep;
- colour drift: the colour distance (earth mover's, RGB units) between the LoRA's and the base's
  samples for 6 fresh captions without the trigger, same seeds: how far the LoRA moves untouched
  prompts.
Lower is better on all three; the base's own fresh-shapes loss is printed for reference. Differential
output preservation replaces "lrtstyle" by nothing; blank-prompt preservation uses the empty caption;
the regularisation set is 12 procedural pictures from a seed neither pretraining nor the scores use.

    python -m comfyui_lora_trainer.bench.preservation [--steps N] [--seeds N] [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..lora import merge_lora, resolve_state_dict
from ..nodes.preservation import class_caption
from ..tiny.demo import ASSETS, SIZE, sample_images
from ..tiny.host import tiny_fns
from ..tiny.model import encode_images
from ..tiny.pretrained import load_pretrained
from ..tiny.procedural import fresh_set
from ..tiny.text import encode_captions
from ..training.config import TrainConfig
from . import rows
from ..training.evaluate import colour_distance, heldout_loss
from ..training.images import load_image_folder
from ..training.loop import train

RESULTS = Path(__file__).resolve().parent / "results" / "preservation.json"
TRIGGER = "lrtstyle"
HELD_OUT = ("stripes", "sunset")  # the style images no run trains on
FRESH, DRIFT_CAPTIONS, REGULAR = 24, 6, 12
REGULAR_SEED = 424242  # the regularisation set's pictures: a seed pretraining and FRESH_SEED never use
LR = 2e-3
BASE = dict(batch_size=2, learning_rate=LR, rank=8, training_dtype="fp32", lora_dtype="fp32",
            lr_schedule="cosine", warmup_steps=10, gradient_checkpointing=False)  # the demo's

VARIANTS: dict[str, dict[str, object]] = {
    "default (AdamW)": {},
    "EMA 0.99": {"ema_decay": 0.99},
    "DOP × 1": {"dop_multiplier": 1.0, "trigger_word": TRIGGER},
    "blank-prompt × 1": {"blank_prompt_multiplier": 1.0},
    "regularisation set (ratio 0.5, weight 1)": {"regular": True},
    "DOP × 1 + regularisation set": {"dop_multiplier": 1.0, "trigger_word": TRIGGER, "regular": True},
    "DOP × 0.3": {"dop_multiplier": 0.3, "trigger_word": TRIGGER},
    "regularisation set (ratio 0.25)": {"regular": True, "prior_ratio": 0.25},
    "Lion (lr / 3)": {"optimizer": "Lion", "learning_rate": LR / 3},
    "CAME (lr / 10)": {"optimizer": "CAME", "learning_rate": LR / 10},
    "AdamWScheduleFree (constant)": {"optimizer": "AdamWScheduleFree", "lr_schedule": "constant"},
    "Adafactor": {"optimizer": "Adafactor"},
}
SCORES = ("style", "fresh shapes", "colour drift")


class Data:
    """Everything the runs share: the training and held-out style images, the fresh pictures, the
    regularisation set, their captions' contexts, and the base's scores and samples."""

    def __init__(self) -> None:
        images = load_image_folder(ASSETS, "Stretch", SIZE, SIZE)
        names = [Path(p).stem for p in images.paths]
        train_rows = [i for i, n in enumerate(names) if n not in HELD_OUT]
        held_rows = [i for i, n in enumerate(names) if n in HELD_OUT]
        self.model = load_pretrained()
        dim = self.model.net.config.context_dim
        latents = encode_images(images.images)
        self.latents, self.held = latents[train_rows], latents[held_rows]
        captions = [images.captions[i] for i in train_rows]
        self.contexts = encode_captions(captions, dim)
        self.held_contexts = encode_captions([images.captions[i] for i in held_rows], dim)
        self.preserve = encode_captions([class_caption(c, TRIGGER, "") for c in captions], dim)
        self.uncond = encode_captions([""], dim)
        pictures, fresh_captions = fresh_set(FRESH, SIZE)
        self.fresh = (encode_images(pictures), encode_captions(fresh_captions, dim))
        self.drift_contexts = self.fresh[1][:DRIFT_CAPTIONS]
        regular, regular_captions = fresh_set(REGULAR, SIZE, REGULAR_SEED)
        self.regular = encode_images(regular)
        self.regular_contexts = encode_captions(regular_captions, dim)
        self.base_samples = sample_images(self.model, self.drift_contexts, seed=0)
        self.base_fresh = heldout_loss(tiny_fns(self.model, self.fresh[1]), self.fresh[0])
        self.base_style = heldout_loss(tiny_fns(self.model, self.held_contexts), self.held)


def measure(data: Data, overrides: dict[str, object], seed: int, steps: int) -> dict[str, float]:
    """The three scores of a LoRA trained `steps` steps with `overrides`."""
    overrides = dict(overrides)
    regular = overrides.pop("regular", False)
    config = replace(TrainConfig(steps=steps, seed=seed, **BASE), **overrides)
    model = data.model
    contexts = torch.cat([data.contexts, data.regular_contexts]) if regular else data.contexts
    preserve = torch.cat([data.preserve, data.regular_contexts]) if regular else data.preserve
    fns = tiny_fns(model, contexts, data.uncond, preserve)
    result = train(model.net, fns, data.latents, config, regularization=data.regular if regular else None)
    with merge_lora(model.net, resolve_state_dict(result.lora, model.net)):
        return {"style": heldout_loss(tiny_fns(model, data.held_contexts), data.held),
                "fresh shapes": heldout_loss(tiny_fns(model, data.fresh[1]), data.fresh[0]),
                "colour drift": colour_distance(sample_images(model, data.drift_contexts, seed=0), data.base_samples)}


def run(data: Data, steps: int, seeds: int, variants: dict[str, dict]) -> dict:
    table = {}
    for name, overrides in variants.items():
        runs = [measure(data, overrides, seed, steps) for seed in range(seeds)]
        table[name] = {score: {"mean": statistics.fmean(r[score] for r in runs),
                               "std": statistics.stdev(r[score] for r in runs) if seeds > 1 else 0.0,
                               "runs": [r[score] for r in runs]} for score in SCORES}
        print(f"{name}: {runs}", file=sys.stderr, flush=True)  # progress, and a record if stopped
    return table


def markdown(table: dict, base_style: float) -> str:
    """The table; "style kept": the share of the first row's gain on the style loss over the base's that
    a variant keeps ((base − variant) / (base − first row))."""
    lines = ["| variant | " + " | ".join(SCORES) + " | style kept |", "|---" * (len(SCORES) + 2) + "|"]
    base = next(iter(table.values()))
    gain = base_style - base["style"]["mean"]
    for name, row in table.items():
        cells = []
        for score in SCORES:
            text = f"{row[score]['mean']:.4f} ± {row[score]['std']:.4f}"
            if row is not base:
                text += f" ({100 * (row[score]['mean'] / base[score]['mean'] - 1):+.0f} %)"
            cells.append(text)
        cells.append(f"{100 * (base_style - row['style']['mean']) / gain:.0f} %")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 seed, three variants")
    rows.add_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    variants, steps, seeds = VARIANTS, args.steps, args.seeds
    if args.quick:
        steps, seeds = 2, 1
        variants = {k: VARIANTS[k] for k in ("default (AdamW)", "DOP × 1 + regularisation set", "EMA 0.99")}
    if args.only:
        variants, earlier = rows.selected(parser, args, VARIANTS, RESULTS)
    else:
        earlier = None
    started = time.perf_counter()
    data = Data()
    table = run(data, steps, seeds, variants)
    table = rows.merged(table, earlier, VARIANTS)
    settings = {"steps": steps, "seeds": seeds, "size": SIZE, **BASE, "held_out": list(HELD_OUT),
                "base": {"style": data.base_style, "fresh shapes": data.base_fresh},
                "seconds": round(time.perf_counter() - started, 1),
                **({"measured_now": list(variants)} if earlier is not None else {})}
    print(f"After {steps} steps, mean ± std over {seeds} seed(s) (change of the mean vs the first row); the base: "
          f"style {data.base_style:.4f}, fresh shapes {data.base_fresh:.4f}; {settings['seconds']} s\n")
    print(markdown(table, data.base_style))
    report = {"settings": settings, "table": table}
    out = args.json if args.json is not None else (None if args.quick else RESULTS)
    if out is not None:
        out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
