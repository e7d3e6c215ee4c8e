"""The demo (the README's main job): a LoRA teaches the pretrained tiny base the bundled images' style.

The base (`pretrained.load_pretrained`, made by `pretrain.py`) draws generic flat shapes in plain
colours; the six bundled images have their own palette (navy, coral red, mustard, teal, cream) and a
cream frame. Writes into an output folder: the LoRA `.safetensors` (Save LoRA's name pattern, so it
can be continued), a loss graph PNG, and a sample grid PNG (rows: the training images, the base's
samples, the samples with the LoRA, with the LoRA at strength 0.5; same captions and seeds). Prints,
for the base, the LoRA and the LoRA at 0.5 (`Scores`): the held-out denoising loss on the six
images, the colour distance (earth mover's) of the samples to the training images, and the held-out
denoising loss on fresh procedural pictures (what the base knew). About a minute on 2 CPU cores.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from ..lora import file_metadata, merge_lora, resolve_state_dict, save_lora_file
from ..lora.files import steps_name
from ..training.config import TrainConfig
from ..training.evaluate import colour_distance, heldout_loss
from ..training.images import load_image_folder
from ..training.loop import Hooks, TrainState, train
from ..training.plot import plot_losses
from .host import TINY_BASE, tiny_fns
from .model import TinyDiffusion, build_tiny, decode_latents, encode_images, sample
from .pretrained import GUIDANCE, load_pretrained
from .procedural import fresh_set
from .text import encode_captions

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo_images"
SIZE = 32  # latent side; the stand-in VAE keeps pixels, so images are resized to it
FRESH_PICTURES = 24  # procedural pictures for the "what the base knew" loss
GRID_ROWS = "rows: training images, base, LoRA, LoRA at 0.5"


class Scores(NamedTuple):
    """One model's demo numbers (lower is closer)."""

    images_loss: float  # held-out denoising loss on the six training images
    colour_distance: float  # earth mover's, samples' colours vs the training images' (RGB units)
    procedural_loss: float  # held-out denoising loss on fresh procedural pictures


class DemoResult(NamedTuple):
    paths: dict[str, Path]
    scores: dict[str, Scores]  # "base", "LoRA", "LoRA at 0.5"
    seconds: float


def progress_bar(total: int, stream=sys.stderr):
    """on_step hook drawing `[#####.....] step/total loss lr ETA` on one line."""
    start = time.perf_counter()
    every = 1 if stream.isatty() else max(1, total // 20)  # a log file gets 20 lines, a terminal a live bar

    def on_step(state: TrainState) -> None:
        step, loss, lr = state.step, state.loss, state.lr
        if step % every and step != total:
            return
        done = int(30 * step / total)
        eta = (time.perf_counter() - start) / step * (total - step)
        start_of_line = "\r" if every == 1 else ""
        stream.write(f"{start_of_line}[{'#' * done}{'.' * (30 - done)}] {step}/{total} loss {loss:.4f} lr {lr:.1e} ETA {eta:4.0f}s")
        if step == total or every > 1:
            stream.write("\n")
        stream.flush()

    return on_step


def sample_images(model: TinyDiffusion, contexts: torch.Tensor, seed: int) -> torch.Tensor:
    """One sample per caption (seed + i for the i-th) → images (n, SIZE, SIZE, 3) in [0, 1]."""
    latents = torch.cat([sample(model, contexts[i:i + 1], (1, 4, SIZE, SIZE), steps=20, seed=seed + i, guidance=GUIDANCE)
                         for i in range(contexts.shape[0])])
    return decode_latents(latents)


def grid_row(images: torch.Tensor) -> np.ndarray:
    """images (n, H, W, 3) in [0, 1] → one row, uint8 (H, W·n, 3)."""
    return (torch.cat(list(images), dim=1).numpy() * 255).round().astype(np.uint8)


def sample_grid(model: TinyDiffusion, contexts: torch.Tensor, seed: int) -> np.ndarray:
    """One row of samples, one per caption, as uint8 (H, W·n, 3)."""
    return grid_row(sample_images(model, contexts, seed))


def score(model: TinyDiffusion, contexts: torch.Tensor, latents: torch.Tensor, fresh, seed: int
          ) -> tuple[Scores, torch.Tensor]:
    """The model's Scores and its samples. fresh: (latents, contexts) of procedural pictures."""
    samples = sample_images(model, contexts, seed)
    training_images = decode_latents(latents)
    return Scores(heldout_loss(tiny_fns(model, contexts), latents), colour_distance(samples, training_images),
                  heldout_loss(tiny_fns(model, fresh[1]), fresh[0])), samples


def print_scores(scores: dict[str, Scores]) -> None:
    print(f"{'':12} {'loss on the 6 images':>21} {'colour distance':>16} {'loss on fresh shapes':>21}")
    for name, s in scores.items():
        print(f"{name:12} {s.images_loss:21.4f} {s.colour_distance:16.3f} {s.procedural_loss:21.4f}")


def base_model(kind: str, seed: int) -> TinyDiffusion:
    """The pretrained base for eps; no base is pretrained for v and flow, so they get random weights."""
    if kind == "eps":
        return load_pretrained()
    print(f"No pretrained tiny base for {kind!r}: using random weights (samples will be noise)")
    return build_tiny(kind, seed=seed)


def run_demo(out_dir: Path, steps: int = 400, kind: str = "eps", seed: int = 0) -> DemoResult:
    started = time.perf_counter()
    image_set = load_image_folder(ASSETS, "Stretch", SIZE, SIZE)
    latents = encode_images(image_set.images)
    model = base_model(kind, seed)
    contexts = encode_captions(image_set.captions, model.net.config.context_dim)
    pictures, captions = fresh_set(FRESH_PICTURES, SIZE)
    fresh = (encode_images(pictures), encode_captions(captions, model.net.config.context_dim))
    config = TrainConfig(steps=steps, batch_size=2, learning_rate=2e-3, rank=8, seed=seed,
                         training_dtype="fp32", lora_dtype="fp32", lr_schedule="cosine", warmup_steps=10,
                         gradient_checkpointing=False)  # the tiny model needs no memory saving: faster without
    print(f"Training a rank-{config.rank} LoRA on the tiny {kind} model from {len(image_set.paths)} images "
          f"in {ASSETS} ({steps} steps)")
    scores, rows = {}, [grid_row(decode_latents(latents))]
    scores["base"], samples = score(model, contexts, latents, fresh, seed)
    rows.append(grid_row(samples))
    result = train(model.net, tiny_fns(model, contexts), latents, config, checkpoint_blocks=model.net.blocks,
                   hooks=Hooks(on_step=progress_bar(steps)), base=TINY_BASE)
    weights = resolve_state_dict(result.lora, model.net)
    for name, strength in (("LoRA", 1.0), ("LoRA at 0.5", 0.5)):
        with merge_lora(model.net, weights, strength):
            scores[name], samples = score(model, contexts, latents, fresh, seed)
        rows.append(grid_row(samples))
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = {
        "lora": save_lora_file(out_dir / steps_name("demo_lora", result.total_steps, stamp), result.lora,
                               file_metadata(result.lora, result.total_steps, "full", result.metadata, "demo LoRA")),
        "loss graph": out_dir / f"demo_loss_{stamp}.png",
        f"samples ({GRID_ROWS})": out_dir / f"demo_samples_{stamp}.png",
    }
    Image.fromarray(plot_losses(result.losses, title="Demo training loss")).save(paths["loss graph"])
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(
        paths[f"samples ({GRID_ROWS})"])
    seconds = time.perf_counter() - started
    print_scores(scores)
    print(f"({seconds:.1f}s in all)")
    for what, path in paths.items():
        print(f"wrote {what}: {path}")
    return DemoResult(paths, scores, seconds)
