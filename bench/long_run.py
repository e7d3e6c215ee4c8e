"""Memory over a long run: RSS and peak RSS every N steps of a 2,000-step run on the tiny model with
checkpoints, validation and previews on (docs/benchmarks.md#memory-over-a-long-run).

The run does the kinds of work Train LoRA does in ComfyUI around its steps, on the bundled tiny model:
- checkpoints: nodes/checkpoints.py's CheckpointWriter as `Hooks.save` (a LoRA file and its training
  state every `save_every` steps, `keep_last` pruning the older ones);
- validation: training/validation.py's Validation on two held-out demo images with their captions;
- previews: every `preview_every` steps, from the on_step hook, the live LoRA (its adapters sit in
  the network while train() runs) samples the demo's way (tiny/demo.py `sample_grid`) under
  training/isolation.py's `isolated` (no_grad, global RNG forked); the PNG goes to the output folder,
  and the labelled grid of every preview so far (training/grid.py) is rebuilt from the PNGs and saved,
  as nodes/comfy_preview.py's Previewer does at the end.

Measured every `sample_every` steps (from the on_step hook, before that step's preview): RSS
(`VmRSS`) and the peak RSS since the last sample (`VmHWM`, reset to the current RSS after each
reading by writing "5" to /proc/self/clear_refs; where that fails the high-water mark is cumulative
and the report says so), plus the count of objects the garbage collector tracks. After `warmup`
steps the growth per 100 steps is the least-squares slope of each series. Step time: the median
time between two steps' on_step calls minus the hook's own work (so it holds the optimizer step,
and on some steps the validation or a checkpoint); the totals per kind of work are reported too.
The machine is shared and noisy: times are indicative, memory is what this measures.

`--trace` is for diagnosis: tracemalloc runs from the warm-up on, each sample after that runs a full
garbage collection first (the count it frees goes into the sample: cyclic garbage waiting for Python's
collector is no leak), and the report lists the allocation sites whose live memory grew most between
the first and the last snapshot. tracemalloc's own memory then counts in the RSS figures.

    python -m comfyui_lora_trainer.bench.long_run [--steps N] [--size N] [--threads N] [--quick] [--trace]
                                                  [--json PATH] [--output DIR]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..lora.files import steps_name, write_atomically
from ..nodes.checkpoints import CheckpointWriter
from ..tiny.demo import ASSETS, sample_grid
from ..tiny.host import TINY_BASE, tiny_fns
from ..tiny.model import TinyDiffusion, build_tiny, encode_images
from ..tiny.text import encode_captions
from ..training.config import TrainConfig
from ..training.grid import labelled_grid
from ..training.images import load_image_folder
from ..training.isolation import isolated
from ..training.loop import Hooks, TrainState, train
from ..training.validation import Validation
from .speed import reset_peak_rss

ROOT = Path(__file__).resolve().parent.parent
TRACE_FRAMES = 25
RESULTS = Path(__file__).resolve().parent / "results" / "long_run.json"
TARGET_MIB_PER_100 = 1.0  # peak RSS growth per 100 steps after warm-up (docs/benchmarks.md#memory-over-a-long-run)
HELD_OUT = 2  # the last demo images are the validation set


def read_status() -> dict[str, float]:
    """VmRSS and VmHWM of this process in MiB (Linux /proc/self/status; empty elsewhere)."""
    found: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return found


def slope_per_100(steps: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of values over steps, × 100 (growth per 100 steps); nan with fewer than 2 points."""
    if len(steps) < 2 or len(set(steps)) < 2:
        return float("nan")
    return float(np.polyfit(np.asarray(steps, dtype=float), np.asarray(values, dtype=float), 1)[0] * 100.0)


class Timed:
    """Wraps a callable, adding its wall time to `seconds`."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args):
        start = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


class TimedValidation:
    """A Validator whose loss() time is counted."""

    def __init__(self, validation: Validation):
        self.every = validation.every
        self.loss = Timed(validation.loss)


class Previews:
    """The previews of a run: sample with the live LoRA, save the PNG, rebuild and save the grid."""

    def __init__(self, model: TinyDiffusion, contexts: torch.Tensor, folder: Path, seed: int = 0):
        self.model, self.contexts, self.folder, self.seed = model, contexts, folder, seed
        self.taken: list[tuple[int, Path]] = []  # grows by design: one entry per preview
        folder.mkdir(parents=True, exist_ok=True)

    def take(self, step: int) -> None:
        with isolated(self.model.net):
            row = sample_grid(self.model, self.contexts, self.seed)
        path = self.folder / steps_name("preview", step, 1, ".png")
        Image.fromarray(row).save(path)
        self.taken.append((step, path))
        images = []
        for _, png in self.taken:  # read back, as the node's grid() does
            with Image.open(png) as img:
                images.append(np.asarray(img.convert("RGB")))
        grid = labelled_grid(images, [f"step {s}" for s, _ in self.taken])
        Image.fromarray(grid).save(self.folder / "grid.png")


class Recorder:
    """The on_step hook: memory every `sample_every` steps, then the preview when one is due."""

    def __init__(self, sample_every: int, previews: Previews, preview_every: int, trace_from: int | None = None):
        self.sample_every, self.previews, self.preview_every = sample_every, previews, preview_every
        self.trace_from = trace_from  # step to start tracemalloc at (diagnosis; None: off)
        self.snapshots: list[tracemalloc.Snapshot] = []  # the first and the latest after the start
        self.samples: list[dict[str, float]] = []
        self.gaps: list[float] = []  # seconds between one hook's end and the next one's start
        self.hook_seconds = {"previews": 0.0, "measuring": 0.0}
        self.peak_reset = False
        self.started = self.last = time.perf_counter()

    def start(self, state: TrainState) -> None:
        self.sample(state.step)
        self.last = time.perf_counter()

    def sample(self, step: int) -> None:
        begin = time.perf_counter()
        status = read_status()
        self.samples.append({"step": step, "rss_mib": round(status.get("VmRSS", float("nan")), 3),
                             "peak_mib": round(status.get("VmHWM", float("nan")), 3),
                             "gc_objects": len(gc.get_objects()), "seconds": round(begin - self.started, 2)})
        self.peak_reset = reset_peak_rss()
        if self.trace_from is not None and step >= self.trace_from:
            self.trace()
        last = self.samples[-1]
        print(f"step {step}: RSS {last['rss_mib']:.1f} MiB, peak {last['peak_mib']:.1f} MiB, "
              f"{last['gc_objects']} objects, {last['seconds']} s", file=sys.stderr, flush=True)  # progress
        self.hook_seconds["measuring"] += time.perf_counter() - begin

    def trace(self) -> None:
        if not tracemalloc.is_tracing():
            tracemalloc.start(TRACE_FRAMES)
            return
        self.samples[-1]["collected"] = gc.collect()  # garbage in cycles, not a leak: gone from the snapshot
        self.snapshots[1:] = []
        self.snapshots.append(tracemalloc.take_snapshot())

    def traced_growth(self, top: int = 10) -> list[dict[str, object]]:
        """The allocation sites (tracebacks) that grew most between the first and the latest snapshot: what
        stays alive, since each snapshot follows a full garbage collection."""
        if len(self.snapshots) < 2:
            return []
        keep = [tracemalloc.Filter(False, tracemalloc.__file__)]
        first, last = (snap.filter_traces(keep) for snap in self.snapshots)
        stats = sorted(last.compare_to(first, "traceback"), key=lambda st: st.size_diff, reverse=True)[:top]
        return [{"kib": round(st.size_diff / 1024, 1), "blocks": st.count_diff,
                 "where": [f"{_short(f.filename)}:{f.lineno}" for f in reversed(st.traceback)][:8]} for st in stats]

    def __call__(self, state: TrainState) -> None:
        now = time.perf_counter()
        self.gaps.append(now - self.last)
        if state.step % self.sample_every == 0:
            self.sample(state.step)
        if state.step % self.preview_every == 0:
            begin = time.perf_counter()
            self.previews.take(state.step)
            self.hook_seconds["previews"] += time.perf_counter() - begin
        self.last = time.perf_counter()


def _short(filename: str) -> str:
    """A traceback file name without the folders before the package or site-packages."""
    for marker in ("site-packages/", str(ROOT.parent) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return re.sub(r"^.*/lib/python3\.\d+/", "", filename)


def growth(samples: list[dict[str, float]], warmup: int) -> dict[str, float]:
    """Per-100-step least-squares growth of each series over the samples after `warmup` steps."""
    after = [s for s in samples if s["step"] >= warmup]
    steps = [s["step"] for s in after]
    return {"rss_mib": slope_per_100(steps, [s["rss_mib"] for s in after]),
            "peak_mib": slope_per_100(steps, [s["peak_mib"] for s in after]),
            "gc_objects": slope_per_100(steps, [s["gc_objects"] for s in after]),
            "samples": len(after)}


def run(steps: int, out: Path, *, size: int = 16, save_every: int = 100, keep_last: int = 3,
        validation_every: int = 50, preview_every: int = 200, sample_every: int = 100, warmup: int = 300,
        seed: int = 0, trace: bool = False) -> dict:
    """Train `steps` steps with everything on, writing into the folder `out`; returns the report."""
    image_set = load_image_folder(ASSETS, "Stretch", size, size)
    latents = encode_images(image_set.images)
    model = build_tiny("eps", seed=seed)
    contexts = encode_captions(image_set.captions, model.net.config.context_dim)
    train_latents, val_latents = latents[:-HELD_OUT], latents[-HELD_OUT:]
    config = TrainConfig(steps=steps, batch_size=2, learning_rate=2e-3, rank=8, seed=seed, training_dtype="fp32",
                         lora_dtype="fp32", lr_schedule="cosine", warmup_steps=10, gradient_checkpointing=True,
                         save_every=save_every, keep_last=keep_last, checkpoint_prefix="loras/checkpoints/long_run")
    writer = CheckpointWriter(out, config, list(train_latents.unbind(0)), len(image_set.captions) - HELD_OUT)
    save = Timed(writer.save)
    validator = TimedValidation(Validation(tiny_fns(model, contexts[-HELD_OUT:]), val_latents, config,
                                           validation_every))
    recorder = Recorder(sample_every, Previews(model, contexts[:2], out / "lora_previews", seed), preview_every,
                        warmup if trace else None)
    started = time.perf_counter()
    result = train(model.net, tiny_fns(model, contexts[:-HELD_OUT]), train_latents, config,
                   checkpoint_blocks=model.net.blocks, base=TINY_BASE, validator=validator,
                   hooks=Hooks(on_step=recorder, on_start=recorder.start, save=save))
    total = time.perf_counter() - started
    traced = recorder.traced_growth()
    grown = growth(recorder.samples, warmup)
    tracemalloc.stop()
    left = sorted(p.name for p in (out / "loras" / "checkpoints").glob("*.safetensors"))
    return {
        "settings": {"steps": steps, "size": size, "batch_size": config.batch_size, "rank": config.rank,
                     "training_images": len(train_latents), "validation_images": HELD_OUT,
                     "gradient_checkpointing": config.gradient_checkpointing, "save_every": save_every,
                     "keep_last": keep_last, "validation_every": validation_every, "preview_every": preview_every,
                     "sample_every": sample_every, "warmup": warmup, "tracemalloc": trace,
                     "peak": "since the previous sample (VmHWM reset)" if recorder.peak_reset
                     else "since the process started (VmHWM could not be reset)"},
        "machine": machine(),
        "growth_per_100_steps": grown,
        "target": {"peak_mib_per_100_steps_below": TARGET_MIB_PER_100, "met": grown["peak_mib"] < TARGET_MIB_PER_100},
        "samples": recorder.samples,
        "time": {"total_s": round(total, 1), "step_ms_median": round(1000 * statistics.median(recorder.gaps), 2),
                 "checkpoints_s": round(save.seconds, 1), "validation_s": round(validator.loss.seconds, 1),
                 "previews_s": round(recorder.hook_seconds["previews"], 1),
                 "measuring_s": round(recorder.hook_seconds["measuring"], 2)},
        "work": {"steps": len(result.losses), "checkpoints_written": save.calls, "checkpoints_left": left,
                 "validations": len(result.validation), "previews": len(recorder.previews.taken),
                 "final_loss": result.losses[-1], "final_validation_loss": result.validation[-1][1]},
        **({"traced_growth": traced} if trace else {}),
    }


def machine() -> dict[str, object]:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average": load}


def summary(report: dict) -> str:
    g, t, w = report["growth_per_100_steps"], report["time"], report["work"]
    s = report["settings"]
    return (f"{s['steps']} steps ({w['checkpoints_written']} checkpoints, keep_last {s['keep_last']} → "
            f"{len(w['checkpoints_left'])} left; {w['validations']} validations; {w['previews']} previews) in "
            f"{t['total_s']} s, median step {t['step_ms_median']} ms\n"
            f"growth per 100 steps after step {s['warmup']} ({g['samples']} samples): RSS {g['rss_mib']:+.3f} MiB, "
            f"peak RSS {g['peak_mib']:+.3f} MiB (target < {report['target']['peak_mib_per_100_steps_below']} MiB: "
            f"{'PASS' if report['target']['met'] else 'MISS'}), "
            f"gc-tracked objects {g['gc_objects']:+.1f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 steps, everything every 10–20 steps")
    parser.add_argument("--json", type=Path, default=None, help=f"write the report here (default {RESULTS.name} "
                        "in bench/results for a full run, nothing for --quick)")
    parser.add_argument("--output", type=Path, default=None, help="output folder for checkpoints and previews "
                        "(default a temporary folder, deleted after)")
    parser.add_argument("--trace", action="store_true", help="diagnosis: tracemalloc from the warm-up on, and the "
                        "allocation sites that grew most in the report (its own memory then counts in the figures)")
    parser.add_argument("--size", type=int, default=16, help="training latent side (default 16; previews sample "
                        "at the demo's 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a busy machine more "
                        "threads stall on each other)")
    args = parser.parse_args(argv)
    for name in ("steps", "size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: got {getattr(args, name)}; give 1 or more")
    torch.set_num_threads(args.threads)
    every = (dict(save_every=10, keep_last=2, validation_every=5, preview_every=20, sample_every=5, warmup=10)
             if args.quick else {})
    steps = 40 if args.quick else args.steps
    with tempfile.TemporaryDirectory(prefix="lora_long_run_") as tmp:
        out = args.output if args.output is not None else Path(tmp)
        report = run(steps, out, size=args.size, trace=args.trace, **every)
    print(summary(report))
    target = args.json if args.json is not None else (None if args.quick else RESULTS)
    if target is not None:
        text = json.dumps(report, indent=1)
        write_atomically(target, lambda tmp: Path(tmp).write_text(text), "results", overwrite=True)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
