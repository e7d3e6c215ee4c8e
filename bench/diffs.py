"""Do the norm and bias differences earn their place? The measurement behind docs/files.md#why-norm-and-bias-differences-are-off-by-default, on the tiny model.

With `target="all"` the trainer trains, besides each Linear/Conv layer's LoRA, a full weight
difference `diff` for every norm and a bias difference `diff_b` for every bias (lora/layers.py).
diffusers and A1111's LoRA module do not read diff/diff_b on LoRA layers, so a portable file drops
them. This bench trains the same LoRA (seed, steps, LR, rank, images) as the demo does
(tiny/demo.py: 400 steps, batch 2, LR 2e-3 cosine with 10 warm-up steps, rank 8, fp32) with:

    a  norms + biases (train_norms=True, train_biases=True; today's default)
    b  neither        c  norms only        d  biases only
    e  a, evaluated with every `.diff` / `.diff_b` key removed (what a portable file of a gives)

Held-out images: the six demo images are split into three folds of two; run r trains on four images
with seed r and is measured on fold r's two, which it never saw. The held-out loss is the native-
space denoising MSE (as training/evaluate.py's `heldout_loss`, whose images are the training ones)
at `levels` fixed noise levels (evenly spaced percents through the schedule) × `noise_seeds` fixed
noises per image, drawn from their own generator.
Paired differences (same run, other variant) are reported besides mean ± sample std over runs.

Share of effect of the differences in a:
  weight share  Σ‖diff‖² + Σ‖diff_b‖² over Σ of those plus Σ‖ΔW‖² (ΔW = (alpha/rank)·up@down);
  output share  mean squared change of the network's native output on the held-out inputs caused
                by the differences alone (base + diffs) over that caused by the whole LoRA; and the
                change from dropping them (a against e) over the whole LoRA's.

The tiny model is random, never pre-trained (tiny/model.py), so "held-out" measures what a
LoRA learns that carries to unseen images of the same style, not a fine-tune of a real SD1.x UNet.

    python -m comfyui_lora_trainer.bench.diffs [--quick] [--steps N] [--seeds N] [--jobs N] [--json PATH]

Prints a markdown table; writes JSON (default bench/results/diffs.json; --quick writes none unless
--json is given). Runs are spread over `--jobs` processes (default: the CPU count), one thread each.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from ..lora import merge_lora, resolve_state_dict, save_lora_file
from ..lora.algos import ALGORITHMS
from ..lora.keys import ALPHA, DIFF, DIFF_B
from ..tiny.demo import ASSETS, SIZE
from ..tiny.host import tiny_fns
from ..tiny.model import TinyDiffusion, build_tiny, encode_images
from ..tiny.text import encode_captions
from ..training.config import TrainConfig
from ..training.images import load_image_folder
from ..training.loop import output_coefficient, train

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "diffs.json"
FOLDS = 3
EVAL_SEED = 20240612  # the fixed noises; never the training stream
CHUNK = 8  # samples per evaluation forward
FILE_DTYPE = torch.bfloat16  # TrainConfig's default lora_dtype: the file a user gets


class Variant(NamedTuple):
    label: str
    train_norms: bool
    train_biases: bool


TRAINED = {"a": Variant("norms + biases (default)", True, True), "b": Variant("no norms, no biases", False, False),
           "c": Variant("norms only", True, False), "d": Variant("biases only", False, True)}
PORTABLE = ("e", "a with diff/diff_b dropped (portable)")
LABELS = {**{k: v.label for k, v in TRAINED.items()}, PORTABLE[0]: PORTABLE[1]}


@dataclass(frozen=True)
class Settings:
    steps: int = 400
    seeds: int = 3  # runs per variant; run r uses seed r and held-out fold r % FOLDS
    noise_seeds: int = 4
    levels: int = 10  # noise-level percents (i + 0.5) / levels: 0.05 … 0.95 for 10
    jobs: int = 1

    def config(self, variant: Variant, seed: int) -> TrainConfig:
        """The demo's settings (tiny/demo.py), fp32, no checkpointing (speed only)."""
        return TrainConfig(steps=self.steps, batch_size=2, learning_rate=2e-3, rank=8, seed=seed,
                           training_dtype="fp32", lora_dtype="fp32", lr_schedule="cosine",
                           warmup_steps=min(10, self.steps - 1), gradient_checkpointing=False,
                           train_norms=variant.train_norms, train_biases=variant.train_biases)


class EvalSet(NamedTuple):
    """Fixed denoising inputs, batched: noisy (B,C,H,W), sigma (B,), context (B,L,D), x0, c(σ) (B,1,1,1)."""

    noisy: torch.Tensor
    sigma: torch.Tensor
    context: torch.Tensor
    x0: torch.Tensor
    scale: torch.Tensor


def eval_set(model: TinyDiffusion, latents: torch.Tensor, contexts: torch.Tensor, settings: Settings) -> EvalSet:
    """Every image × `levels` × `noise_seeds` noises from EVAL_SEED; latents (N,C,H,W), contexts (N,L,D)."""
    fns = tiny_fns(model, contexts)
    generator = torch.Generator().manual_seed(EVAL_SEED)
    count = settings.levels * settings.noise_seeds
    x0 = latents.repeat_interleave(count, dim=0)
    percents = (torch.arange(settings.levels) + 0.5) / settings.levels
    sigma = fns.percent_to_sigma(percents.repeat(settings.noise_seeds)).repeat(latents.shape[0])
    noise = torch.randn(x0.shape, generator=generator)
    return EvalSet(fns.noise_scaling(sigma, noise, x0), sigma, contexts.repeat_interleave(count, dim=0), x0,
                   output_coefficient(fns, sigma))


@torch.no_grad()
def native_output(model: TinyDiffusion, data: EvalSet, sd: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The prediction in native space (x0 / c(σ)) with `sd` merged in (None: the base model)."""
    merged = merge_lora(model.net, resolve_state_dict(sd, model.net)) if sd else nullcontext()
    with merged:  # in chunks: full-resolution attention holds a (heads, 1024, 1024) map per sample
        return torch.cat([model.denoise(data.noisy[i:i + CHUNK], data.sigma[i:i + CHUNK], data.context[i:i + CHUNK])
                          for i in range(0, data.sigma.shape[0], CHUNK)]) / data.scale


def mean_square(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.mean((a - b) ** 2).item()


def only(sd: dict[str, torch.Tensor], diffs: bool) -> dict[str, torch.Tensor]:
    """The diff/diff_b keys of `sd` (diffs=True), or every other key (False: a portable file)."""
    return {k: v for k, v in sd.items() if k.endswith((f".{DIFF}", f".{DIFF_B}")) == diffs}


def weight_shares(sd: dict[str, torch.Tensor], model: TinyDiffusion) -> dict[str, float]:
    """Shares of Σ‖·‖²_F over every layer's ΔW, diff and diff_b that diff and diff_b carry."""
    modules = dict(model.net.named_modules())
    squares = {"adapter": 0.0, DIFF: 0.0, DIFF_B: 0.0}
    for path, w in resolve_state_dict(sd, model.net).items():
        if w.algorithm is not None:
            delta = ALGORITHMS[w.algorithm].delta(w.tensors, modules[path].weight.detach().float())
            squares["adapter"] += delta.square().sum().item()
        for key in (DIFF, DIFF_B):
            if w.tensors.get(key) is not None:
                squares[key] += w.tensors[key].float().square().sum().item()
    total = sum(squares.values())
    return {"diff": squares[DIFF] / total, "diff_b": squares[DIFF_B] / total,
            "diffs": (squares[DIFF] + squares[DIFF_B]) / total}


def file_bytes(sd: dict[str, torch.Tensor], metadata: dict[str, object]) -> int:
    """Size of the safetensors file Save LoRA writes for `sd` in FILE_DTYPE (alpha stays fp32)."""
    tensors = {k: v if k.endswith(f".{ALPHA}") else v.to(FILE_DTYPE) for k, v in sd.items()}
    with tempfile.TemporaryDirectory() as folder:
        return save_lora_file(Path(folder) / "lora.safetensors", tensors, metadata).stat().st_size


def parameter_count(sd: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for k, v in sd.items() if not k.endswith(f".{ALPHA}"))


def run_one(key: str, seed: int, settings: Settings) -> dict[str, dict[str, float]]:
    """Train variant `key` with `seed` on all folds but `seed % FOLDS`; measure it (for a also e)."""
    if settings.jobs > 1:
        torch.set_num_threads(1)  # one process per core; threads within one would stall each other
    image_set = load_image_folder(ASSETS, "Stretch", SIZE, SIZE)
    latents = encode_images(image_set.images)
    model = build_tiny("eps")
    contexts = encode_captions(image_set.captions, model.net.config.context_dim)
    held = [i for i in range(latents.shape[0]) if i % FOLDS == seed % FOLDS]
    trained = [i for i in range(latents.shape[0]) if i not in held]
    started = time.perf_counter()
    result = train(model.net, tiny_fns(model, contexts[trained]), latents[trained],
                   settings.config(TRAINED[key], seed))
    seconds = time.perf_counter() - started
    print(f"trained {key} (seed {seed}) in {seconds:.0f}s", file=sys.stderr, flush=True)
    heldout = eval_set(model, latents[held], contexts[held], settings)
    seen = eval_set(model, latents[trained], contexts[trained], settings)
    base = native_output(model, heldout)
    tail = result.losses[-max(1, len(result.losses) // 10):]

    def measure(sd: dict[str, torch.Tensor], out: torch.Tensor) -> dict[str, float]:
        """out: the native output of base + sd on `heldout`."""
        return {"heldout": mean_square(out, heldout.x0 / heldout.scale),
                "base_heldout": mean_square(base, heldout.x0 / heldout.scale),
                "train_fixed": mean_square(native_output(model, seen, sd), seen.x0 / seen.scale),
                "train_loss_end": statistics.fmean(tail), "params": parameter_count(sd),
                "file_bytes": file_bytes(sd, result.metadata), "train_s": seconds}

    full = native_output(model, heldout, result.lora)
    rows = {key: measure(result.lora, full)}
    if key == "a":
        portable = only(result.lora, diffs=False)
        without = native_output(model, heldout, portable)
        rows[PORTABLE[0]] = measure(portable, without)
        whole = mean_square(full, base)
        diffs_alone = native_output(model, heldout, only(result.lora, diffs=True))
        rows[key] |= {f"weight_share_{k}": v for k, v in weight_shares(result.lora, model).items()}
        rows[key] |= {"output_share_diffs_alone": mean_square(diffs_alone, base) / whole,
                      "output_share_dropped": mean_square(full, without) / whole}
    return rows


def run_all(settings: Settings) -> dict[str, list[dict[str, float]]]:
    """variant → one measurement dict per seed (seed order)."""
    tasks = [(key, seed) for seed in range(settings.seeds) for key in TRAINED]
    if settings.jobs > 1:
        # fork before any torch work in this process, so no OpenMP pool is inherited
        with ProcessPoolExecutor(settings.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            done = list(pool.map(run_one, *zip(*tasks), [settings] * len(tasks)))
    else:
        done = [run_one(key, seed, settings) for key, seed in tasks]
    runs: dict[str, list[dict[str, float]]] = {key: [] for key in LABELS}
    for rows in done:
        for key, values in rows.items():
            runs[key].append(values)
    return runs


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """variant → measure → {mean, std}, plus `heldout_vs_a`: the paired held-out difference to a."""
    summary = {}
    for key, per_seed in runs.items():
        summary[key] = {name: spread([r[name] for r in per_seed]) for name in per_seed[0]}
        summary[key]["heldout_vs_a"] = spread([r["heldout"] - a["heldout"] for r, a in zip(per_seed, runs["a"])])
    return summary


def fmt(s: dict[str, float], digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| variant | held-out loss | Δ vs a (paired) | base held-out | train loss (end) | train-image loss "
             "| trainable params | file bytes (bf16) |", "|---|---|---|---|---|---|---|---|"]
    for key, s in summary.items():
        lines.append(f"| {key}: {LABELS[key]} | {fmt(s['heldout'])} | {fmt(s['heldout_vs_a'])} | "
                     f"{fmt(s['base_heldout'])} | {fmt(s['train_loss_end'])} | {fmt(s['train_fixed'])} | "
                     f"{s['params']['mean']:.0f} | {s['file_bytes']['mean']:.0f} |")
    a = summary["a"]
    lines += ["", "Share of effect of diff/diff_b in a (mean ± std over seeds):", "",
              f"- weight share (‖·‖²_F): diff {fmt(a['weight_share_diff'])}, diff_b {fmt(a['weight_share_diff_b'])}, "
              f"together {fmt(a['weight_share_diffs'])}",
              f"- output share (held-out, native space): diffs alone {fmt(a['output_share_diffs_alone'])}, "
              f"dropping them (a vs e) {fmt(a['output_share_dropped'])} of the whole LoRA's change"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 steps, 2 noise levels: a smoke run")
    parser.add_argument("--steps", type=int, help="training steps per run (default 400, as the demo)")
    parser.add_argument("--seeds", type=int, help="runs per variant (default 3)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--json", type=Path, help=f"where to write results (default {DEFAULT_JSON}, none with --quick)")
    args = parser.parse_args(argv)
    settings = Settings(steps=2, seeds=1, noise_seeds=1, levels=2) if args.quick else Settings()
    settings = replace(settings, steps=args.steps or settings.steps, seeds=args.seeds or settings.seeds,
                       jobs=max(1, min(args.jobs, settings.seeds * len(TRAINED))))
    started = time.perf_counter()
    summary = summarize(run_all(settings))
    report = {"settings": asdict(settings), "train_config": settings.config(TRAINED["a"], 0).as_metadata(),
              "folds": FOLDS, "variants": LABELS, "results": summary,
              "seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__, "python": sys.version.split()[0]}
    print(markdown(summary))
    print(f"\n{settings.seeds} runs per variant, {settings.steps} steps, {report['seconds']}s")
    path = args.json or (None if args.quick else DEFAULT_JSON)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
