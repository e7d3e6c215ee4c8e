"""Pretrain the tiny base from scratch on procedural pictures (writes assets/tiny_base.safetensors).

Owns the one full-parameter training loop of the pack (the engine trains only LoRAs): a fresh
`TinyDenoiser` learns to denoise the pictures of `procedural.py` with the epsilon objective of
Ho et al. 2020 ("Denoising Diffusion Probabilistic Models": predict the added noise, MSE) on the
SD1.x schedule of `schedules.py`, AdamW, linear warmup then cosine decay, gradient clipping, and an
exponential moving average of the weights (what is shipped, as DDPM and latent diffusion ship theirs).
Each picture's epsilon MSE is weighted by σ² + 1, which makes it the v-prediction loss of Salimans
& Ho 2022 ("Progressive Distillation"): with the plain epsilon loss, high noise levels (where the
composition and the caption's colours are decided) weigh 1/σ² as much in x0 terms, and a first
run of 2000 steps sampled coloured blobs ignoring the caption's colours. The base has text positions
(TinyConfig.text_positions): without them the 1600-step base swapped the shape's and the
background's colours in two of six samples looked at: a caption was a set of words to it.

Deterministic: one seed drives the weights' initialisation, the pictures and the noises, and the
thread count is fixed (`torch.set_num_threads`), so a rerun on the same machine and torch gives
bit-identical weights (`pretrained.weights_digest`). The file's metadata holds the settings JSON,
its hash, the hash of this script and of the picture generator, the steps and the final loss.

Usage: python -m comfyui_lora_trainer.tiny.pretrain [--out FILE] [--steps N]   (scripts/pretrain.sh)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from safetensors.torch import save_file

from . import procedural
from ..lora.files import write_atomically
from ..training.evaluate import heldout_loss
from .host import tiny_fns
from .model import TinyDenoiser, build_tiny, decode_latents, encode_images, sample
from .pretrained import BASE_FILE, FORMAT, GUIDANCE, base_config, load_pretrained, settings_digest, weights_digest
from .schedules import EpsSchedule, NUM_TIMESTEPS
from .text import word_vector, tokenize

CONTEXT_LENGTH = 8  # tokens, as text.encode_text


@dataclass(frozen=True)
class PretrainSettings:
    """Everything the shipped weights depend on. `width`, `outer_self_attention` and `text_positions`
    pick the TinyConfig (`pretrained.base_config`); `size` is the picture side in pixels (= latent
    side: the stand-in VAE keeps pixels). Two threads on an idle 2-core machine: about 0.24 s/step at
    batch 16, 10000 steps in about 40 minutes (the full-resolution self-attention, left out, would
    double that); anything else running on those cores slows it several times."""

    steps: int = 10000
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # pictures trained with the empty caption (zeros), for guidance at sampling
    seed: int = 0
    threads: int = 2
    size: int = 32
    width: int = 32
    outer_self_attention: bool = False  # TinyConfig's: off, a step takes 40% of the time
    text_positions: bool = True  # TinyConfig's: so the caption can say which colour is the shape's

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "threads", "size", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainSettings.{name}: got {getattr(self, name)}; give 1 or more")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"PretrainSettings.ema_decay: got {self.ema_decay}; give a value in [0, 1)")
        if self.seed == procedural.FRESH_SEED:
            raise ValueError(f"PretrainSettings.seed: got {self.seed}, the held-out sets' seed; pick another")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class PretrainResult(NamedTuple):
    state_dict: dict[str, torch.Tensor]  # the EMA weights, float32
    losses: list[float]  # per step, of the trained (not EMA) weights
    seconds: float


def learning_rate(step: int, s: PretrainSettings) -> float:
    """1) linear warmup over `warmup_steps`; 2) cosine from `learning_rate` down to
    `learning_rate · min_lr_ratio` at the last step."""
    if step < s.warmup_steps:
        return s.learning_rate * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - 1 - s.warmup_steps)
    floor = s.learning_rate * s.min_lr_ratio
    return floor + (s.learning_rate - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def source_digest() -> str:
    """SHA-256 (hex) of this script and the picture generator, as text."""
    texts = [Path(path).read_text(encoding="utf-8") for path in (procedural.__file__, __file__)]
    return settings_digest("\n".join(texts))


def _contexts(captions: list[str], dim: int, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """Captions → (B, CONTEXT_LENGTH, dim), as text.encode_captions, each word's vector drawn once."""
    context = torch.zeros(len(captions), CONTEXT_LENGTH, dim)
    for row, caption in enumerate(captions):
        for i, word in enumerate(tokenize(caption)[:CONTEXT_LENGTH]):
            if word not in cache:
                cache[word] = word_vector(word, dim)
            context[row, i] = cache[word]
    return context


def pretrain(settings: PretrainSettings, on_step: Callable[[int, float, float], None] | None = None
             ) -> PretrainResult:
    """Train a TinyDenoiser from scratch; the global torch thread count and RNG are restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            return _train(settings, on_step)
    finally:
        torch.set_num_threads(threads)


def _train(s: PretrainSettings, on_step: Callable[[int, float, float], None] | None) -> PretrainResult:
    started = time.perf_counter()
    net = TinyDenoiser(base_config(asdict(s))).train()
    ema = copy.deepcopy(net).requires_grad_(False)
    schedule = EpsSchedule()
    optimizer = torch.optim.AdamW(net.parameters(), lr=s.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    pictures = np.random.default_rng(s.seed)
    noises = torch.Generator().manual_seed(s.seed)
    words: dict[str, torch.Tensor] = {}
    losses = []
    for step in range(s.steps):
        lr = learning_rate(step, s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, captions = procedural.draw_batch(pictures, s.batch_size, s.size)
        x0 = encode_images(images)
        # A uniform timestep per picture, its sigma from the schedule's table; eps target.
        sigma = schedule.sigmas[torch.randint(0, NUM_TIMESTEPS, (s.batch_size,), generator=noises)]
        noise = torch.randn(x0.shape, generator=noises)
        noisy = schedule.noise_scaling(sigma, noise, x0)
        context = _contexts(captions, net.config.context_dim, words)
        context[torch.rand(s.batch_size, generator=noises) < s.caption_dropout] = 0.0  # the empty caption
        out = net(schedule.calculate_input(sigma, noisy), schedule.timestep(sigma), context)
        per_picture = (out - noise).square().mean(dim=(1, 2, 3))
        loss = (per_picture * (sigma ** 2 + 1.0)).mean()  # the v loss, see the module docstring
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), s.max_grad_norm)
        optimizer.step()
        # EMA w_ema ← d·w_ema + (1 − d)·w, with d ramping up from 0.1 so the random start fades out.
        decay = min(s.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for kept, trained in zip(ema.parameters(), net.parameters()):
                kept.lerp_(trained, 1.0 - decay)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1], lr)
    state_dict = {name: t.detach().clone().contiguous() for name, t in ema.state_dict().items()}
    return PretrainResult(state_dict, losses, time.perf_counter() - started)


def file_metadata(settings: PretrainSettings, result: PretrainResult) -> dict[str, str]:
    """The file's metadata (`pretrained.METADATA_KEYS`); final_loss is the mean of the last 100 steps."""
    settings_json = settings.to_json()
    tail = result.losses[-100:]
    return {"format": FORMAT, "settings": settings_json, "settings_sha256": settings_digest(settings_json),
            "source_sha256": source_digest(), "weights_sha256": weights_digest(result.state_dict),
            "steps": str(settings.steps), "final_loss": f"{sum(tail) / len(tail):.6f}",
            "seconds": f"{result.seconds:.1f}", "torch": torch.__version__}


def save_base(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Written atomically (lora/files.py), replacing an earlier base at `path`."""
    return write_atomically(path, lambda tmp: save_file(state_dict, tmp, metadata=metadata), "tiny base", overwrite=True)


def fresh_losses(path: Path, pictures: int = 64) -> tuple[float, float]:
    """Held-out denoising loss (training/evaluate.py) on `pictures` fresh procedural pictures, for
    the base in `path` and for the random-weight model of the same shape (`build_tiny`)."""
    pretrained = load_pretrained(path)
    images, captions = procedural.fresh_set(pictures, PretrainSettings.size)
    latents = encode_images(images)
    contexts = _contexts(captions, pretrained.net.config.context_dim, {})
    random = build_tiny("eps", pretrained.net.config)
    return heldout_loss(tiny_fns(pretrained, contexts), latents), heldout_loss(tiny_fns(random, contexts), latents)


def shape_scores(path: Path, pictures: int = 24) -> tuple[tuple[float, float], tuple[float, float]]:
    """Whether the base draws what its captions say: the base in `path` samples (classifier-free guidance
    `GUIDANCE`, 20 steps, seed i for the i-th) the captions of the first `pictures` fresh procedural
    pictures of circles, squares, triangles and rings. Returns (share of samples whose drawn shape is the
    caption's, mean colour error) for the base and for random weights (`procedural.recognise_shapes`)."""
    pretrained = load_pretrained(path)
    images, captions = procedural.fresh_set(4 * pictures, PretrainSettings.size)
    captions = [c for c in captions if procedural.caption_parts(c)[0] in procedural.CENTRED_SHAPES][:pictures]
    contexts = _contexts(captions, pretrained.net.config.context_dim, {})
    templates = procedural.shape_templates(PretrainSettings.size)
    scores = []
    for model in (pretrained, build_tiny("eps", pretrained.net.config)):
        side = PretrainSettings.size
        samples = decode_latents(torch.cat([sample(model, contexts[i:i + 1], (1, 4, side, side), steps=20, seed=i,
                                                   guidance=GUIDANCE) for i in range(len(captions))]))
        drawn, errors = procedural.recognise_shapes(samples, captions, templates)
        right = sum(shape == procedural.caption_parts(c)[0] for shape, c in zip(drawn, captions))
        scores.append((right / len(captions), sum(errors) / len(errors)))
    return scores[0], scores[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BASE_FILE, help=f"file to write (default {BASE_FILE})")
    parser.add_argument("--steps", type=int, default=PretrainSettings.steps, help="steps (shorter runs: tries)")
    parser.add_argument("--width", type=int, default=PretrainSettings.width, help="TinyConfig width (tries)")
    parser.add_argument("--threads", type=int, default=PretrainSettings.threads,
                        help="torch threads (the weights are bit-identical only for the same count)")
    args = parser.parse_args(argv)
    settings = replace(PretrainSettings(), steps=args.steps, width=args.width, threads=args.threads)
    every = max(1, settings.steps // 50)

    def log(step: int, loss: float, lr: float) -> None:
        if step % every == 0 or step == settings.steps:
            print(f"step {step}/{settings.steps} loss {loss:.4f} lr {lr:.2e}", flush=True)

    print(f"Pretraining the tiny base: {settings.to_json()}", flush=True)
    result = pretrain(settings, log)
    metadata = file_metadata(settings, result)
    save_base(args.out, result.state_dict, metadata)
    print(f"wrote {args.out} ({result.seconds:.0f}s, final loss {metadata['final_loss']}, "
          f"weights {metadata['weights_sha256'][:16]})", flush=True)
    trained, random = fresh_losses(args.out)
    print(f"Held-out denoising loss on fresh procedural pictures: {trained:.4f} pretrained, {random:.4f} "
          f"random weights", flush=True)
    (right, error), (right_random, error_random) = shape_scores(args.out)
    print(f"Samples of fresh captions of centred shapes: {right:.0%} draw the caption's shape, mean colour error "
          f"{error:.3f} (random weights: {right_random:.0%}, {error_random:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
