"""The demo (the README's main job): train a LoRA on the tiny model from the bundled images.

Writes into an output folder: the LoRA `.safetensors` (Save LoRA's name pattern, so it can be
continued), a loss graph PNG, and a sample grid PNG (rows: the training images, the base model's samples, the
samples with the LoRA; same captions and seeds). Runs on CPU in well under two minutes.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..lora import file_metadata, merge_lora, resolve_state_dict, save_lora_file
from ..training.config import TrainConfig
from ..training.evaluate import heldout_loss
from ..training.images import load_image_folder
from ..training.loop import Hooks, TrainState, train
from ..training.plot import plot_losses
from .text import encode_captions
from .host import TINY_BASE, tiny_fns
from .model import build_tiny, decode_latents, encode_images, sample

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo_images"
SIZE = 32  # latent side; the stand-in VAE keeps pixels, so images are resized to it


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


def sample_grid(model, contexts: torch.Tensor, seed: int) -> np.ndarray:
    """One row of samples, one per caption, as uint8 (H, W·n, 3)."""
    latents = torch.cat([sample(model, contexts[i:i + 1], (1, 4, SIZE, SIZE), steps=20, seed=seed + i)
                         for i in range(contexts.shape[0])])
    images = decode_latents(latents)  # (n, H, W, 3)
    return (torch.cat(list(images), dim=1).numpy() * 255).round().astype(np.uint8)


def run_demo(out_dir: Path, steps: int = 400, kind: str = "eps", seed: int = 0) -> dict[str, Path]:
    started = time.perf_counter()
    image_set = load_image_folder(ASSETS, "Stretch", SIZE, SIZE)
    latents = encode_images(image_set.images)
    model = build_tiny(kind, seed=seed)
    contexts = encode_captions(image_set.captions, model.net.config.context_dim)
    config = TrainConfig(steps=steps, batch_size=2, learning_rate=2e-3, rank=8, seed=seed,
                         training_dtype="fp32", lora_dtype="fp32", lr_schedule="cosine", warmup_steps=10)
    print(f"Training a rank-{config.rank} LoRA on the tiny {kind} model from {len(image_set.paths)} images "
          f"in {ASSETS} ({steps} steps)")
    before_grid = sample_grid(model, contexts, seed)
    fns = tiny_fns(model, contexts)
    heldout_before = heldout_loss(fns, latents)
    result = train(model.net, fns, latents, config, checkpoint_blocks=model.net.blocks,
                   hooks=Hooks(on_step=progress_bar(steps)), base=TINY_BASE)
    weights = resolve_state_dict(result.lora, model.net)
    with merge_lora(model.net, weights):
        after_grid = sample_grid(model, contexts, seed)
        heldout_after = heldout_loss(fns, latents)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = {
        "lora": save_lora_file(out_dir / f"demo_lora_{result.total_steps}_steps_{stamp}_.safetensors", result.lora,
                               file_metadata(result.lora, result.total_steps, "full", result.metadata, "demo LoRA")),
        "loss graph": out_dir / f"demo_loss_{stamp}.png",
        "samples (rows: training images, before, after)": out_dir / f"demo_samples_{stamp}.png",
    }
    Image.fromarray(plot_losses(result.losses, title="Demo training loss")).save(paths["loss graph"])
    reference = (torch.cat(list(decode_latents(latents)), dim=1).numpy() * 255).round().astype(np.uint8)
    grid = np.concatenate([reference, before_grid, after_grid], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(
        paths["samples (rows: training images, before, after)"])
    print(f"Held-out denoising loss: {heldout_before:.4f} before, {heldout_after:.4f} after "
          f"({time.perf_counter() - started:.1f}s in all)")
    for what, path in paths.items():
        print(f"wrote {what}: {path}")
    return paths
