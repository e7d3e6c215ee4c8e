"""Loading a dataset: peak memory and speed of Encode Training Folder's path (training/dataset.py) on N
synthetic 1024-px photos of mixed aspect ratios, against the latents' bytes and the pixels' bytes.

    python -m comfyui_lora_trainer.bench.dataset [--counts 100,1000,3000] [--quick]

Each N is measured in a fresh process (so its peak RSS is its own): planning the folder, then reading,
fitting and encoding `chunk` 4 images at a time, latents kept in bf16. The VAE is the tiny model's
stand-in made to downscale 8× (`stand_in_vae`: real latent sizes, almost no working memory, so the
peak is the loader's own), and at 1,000 images also a toy VAE encoder (`ToyVAE`: SD's VAE shape at width
32), whose activations for one chunk come on top: a real VAE's working set is its own, the same for any N. Peak RSS is the process's high-water mark (VmHWM) above its
RSS before loading. The target: at 1,000 images at most the latents' bytes + 300 MB. For the same
images, an IMAGE batch (the classic loaders' output, float32 N×1024×1024×3) is the pixels' bytes.
Then the time to the first training step (tiny model, batch 1) with a cold cache and a warm one, with
the toy VAE (whose encode costs real compute, as a real VAE's does, only more).
Results: bench/results/dataset.json and the table in docs/benchmarks.md#loading-a-dataset.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..lora.files import write_atomically
from .run_module import command

RESULTS = Path(__file__).resolve().parent / "results" / "dataset.json"
SHAPES = ((1024, 1024), (1216, 832), (832, 1216), (1344, 768), (3024 // 3, 4032 // 3))  # about a megapixel
PLAN = dict(resolution=1024, step=64, min_side=256, max_side=2048)
MIB = 2 ** 20


def plan(scale: int) -> dict:
    """The bucket settings at 1/`scale` size (the quick run's images are 4× smaller)."""
    return {"resolution": PLAN["resolution"] // scale, "step": PLAN["step"], "min_side": PLAN["min_side"] // scale,
            "max_side": PLAN["max_side"]}


def write_images(folder: Path, n: int, scale: int = 1) -> None:
    """n smooth synthetic photos (JPEG, quality 90) of the SHAPES (1/`scale` size) in turn, each with a caption."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        if (folder / f"{i:05}.jpg").exists():
            continue
        width, height = (side // scale for side in SHAPES[i % len(SHAPES)])
        coarse = rng.integers(0, 256, (height // 64, width // 64, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        image.save(folder / f"{i:05}.jpg", quality=90)
        (folder / f"{i:05}.txt").write_text(f"lrt, photo {i}")


class ToyVAE(torch.nn.Module):
    """A VAE encoder's shape at a toy width: three stride-2 stages of 3×3 convs (width 32) to 4 channels
    at 1/8 size, seeded. It costs real compute per pixel, so a cache hit saves real time, not a no-op."""

    def __init__(self, width: int = 32):
        super().__init__()
        torch.manual_seed(0)
        layers, channels = [], 3
        for _ in range(3):
            layers += [torch.nn.Conv2d(channels, width, 3, stride=2, padding=1), torch.nn.SiLU()]
            channels = width
        self.net = torch.nn.Sequential(*layers, torch.nn.Conv2d(width, 4, 3, padding=1))

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels.permute(0, 3, 1, 2) * 2 - 1)


def _hwm_and_rss() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    field = lambda name: int(next(l for l in status.splitlines() if l.startswith(name)).split()[1]) * 1024  # noqa: E731
    return field("VmHWM:"), field("VmRSS:")


def stand_in_vae(pixels: torch.Tensor) -> torch.Tensor:
    """The tiny model's VAE stand-in made to downscale 8× (an area mean, then its encode): the latents of
    a real VAE's size at almost no working memory, so the peak is the loader's own."""
    from ..tiny.model import encode_images

    return encode_images(torch.nn.functional.avg_pool2d(pixels.permute(0, 3, 1, 2), 8).permute(0, 2, 3, 1))


VAES = {"stand-in": stand_in_vae, "toy": None}  # toy: ToyVAE(), built in the worker


def worker(folder: str, cache: str, train_step: bool, scale: int = 1, vae: str = "stand-in") -> dict:
    """One measurement in this process: load (and optionally one training step); what it cost."""
    from ..training.dataset import by_bucket, encode_buckets, plan_folder
    from ..training.latent_cache import LatentCache

    torch.set_num_threads(1)
    _, before = _hwm_and_rss()
    start = time.perf_counter()
    buckets = encode_buckets(by_bucket(plan_folder(folder, **plan(scale))), VAES[vae] or ToyVAE(), dtype=torch.bfloat16,
                             chunk=4,
                             cache=LatentCache(cache, "stand-in") if cache else None)
    loaded = time.perf_counter() - start
    peak, _ = _hwm_and_rss()
    n = sum(len(b.entries) for b in buckets)
    out = {"images": n, "buckets": len(buckets), "load_s": loaded, "images_per_s": n / loaded,
           "peak_above_start_mib": (peak - before) / MIB,
           "latents_mib": sum(b.latents.numel() * b.latents.element_size() for b in buckets) / MIB,
           "pixels_mib": sum(w * h * 3 * 4 for b in buckets for w, h in [b.size] * len(b.entries)) / MIB,
           "encoded": sum(b.encoded for b in buckets)}
    if train_step:
        out["first_step_s"] = loaded + _one_step(buckets)
    return out


def _one_step(buckets) -> float:
    """Seconds of one tiny-model training step on the loaded latents (batch 1)."""
    from ..tiny.host import tiny_fns
    from ..tiny.model import build_tiny
    from ..tiny.text import encode_captions
    from ..training.config import TrainConfig
    from ..training.loop import train

    model = build_tiny("eps")
    contexts = encode_captions(["lrt"], model.net.config.context_dim)
    start = time.perf_counter()
    train(model.net, tiny_fns(model, contexts), [b.latents for b in buckets],
          TrainConfig(steps=1, training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False))
    return time.perf_counter() - start


def _print(n: int, vae: str, row: dict) -> None:
    print(f"{n} images, {vae}: peak +{row['peak_above_start_mib']:.0f} MiB, latents {row['latents_mib']:.0f} MiB, "
          f"pixels {row['pixels_mib']:.0f} MiB, {row['images_per_s']:.1f} images/s", flush=True)


def _run(*args: str) -> dict:
    done = subprocess.run(command("bench.dataset", "--worker", *args), check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="100,1000,3000")
    parser.add_argument("--quick", action="store_true", help="20 images at 1/4 size, no results file")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        folder, cache, step, scale, vae = args.worker
        print(json.dumps(worker(folder, cache, step == "step", int(scale), vae)))
        return {}
    counts = [20] if args.quick else [int(c) for c in args.counts.split(",")]
    scale = "4" if args.quick else "1"
    toy_at = counts[min(1, len(counts) - 1)]  # the toy VAE's row: at 1,000 in a full run
    results: dict = {"loading": {}, "loading_toy_vae": {}, "first_step": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        for n in counts:
            write_images(folder, n, int(scale))  # adds to the images already there
            results["loading"][str(n)] = row = _run(str(folder), "", "load", scale, "stand-in")
            _print(n, "stand-in", row)
            if n == toy_at:
                results["loading_toy_vae"][str(n)] = row = _run(str(folder), "", "load", scale, "toy")
                _print(n, "toy VAE", row)
        first = Path(tmp) / "first"
        write_images(first, counts[0], int(scale))
        cache = str(Path(tmp) / "cache")
        results["first_step"] = {"cold": _run(str(first), cache, "step", scale, "toy"),
                                 "warm": _run(str(first), cache, "step", scale, "toy")}
        print(f"first step on {counts[0]} images: cold cache {results['first_step']['cold']['first_step_s']:.1f} s, "
              f"warm {results['first_step']['warm']['first_step_s']:.1f} s")
    if not args.quick:
        text = json.dumps(results, indent=1)
        write_atomically(RESULTS, lambda tmp: Path(tmp).write_text(text), "results", overwrite=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
