"""Which loss space trains better? Native (eps / v / flow velocity) against x0 (ComfyUI core's).

For each parameterisation of the tiny model, trains the same LoRA (same seed, images, settings) once
with each loss space, and reports the held-out denoising error (training/evaluate.py: fixed noise
levels and noises, never the training draws) before and after, measured in both spaces.

    python -m comfyui_lora_trainer.bench.loss_space [--steps N]
"""
from __future__ import annotations

import argparse
import json

import torch

from ..lora import merge_lora, resolve_state_dict
from ..tiny.demo import ASSETS, SIZE
from ..tiny.host import tiny_fns
from ..tiny.model import build_tiny, encode_images
from ..tiny.text import encode_captions
from ..training.config import TrainConfig
from ..training.evaluate import heldout_loss
from ..training.images import load_image_folder
from ..training.loop import train


def compare(kind: str, steps: int) -> dict[str, dict[str, float]]:
    image_set = load_image_folder(ASSETS, "Stretch", SIZE, SIZE)
    latents = encode_images(image_set.images)
    model = build_tiny(kind)
    contexts = encode_captions(image_set.captions, model.net.config.context_dim)
    fns = tiny_fns(model, contexts)
    rows = {"base": {s: heldout_loss(fns, latents, s) for s in ("native", "x0")}}
    for space in ("native", "x0"):
        config = TrainConfig(steps=steps, batch_size=2, learning_rate=2e-3, loss_space=space,
                             training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)
        result = train(model.net, fns, latents, config)
        with merge_lora(model.net, resolve_state_dict(result.lora, model.net)):
            rows[f"trained in {space}"] = {s: heldout_loss(fns, latents, s) for s in ("native", "x0")}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {}
    print(f"| model | LoRA | held-out native | held-out x0 |\n|---|---|---|---|")
    for kind in ("eps", "v", "flow"):
        results[kind] = compare(kind, args.steps)
        for row, values in results[kind].items():
            print(f"| {kind} | {row} | {values['native']:.4f} | {values['x0']:.4f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
