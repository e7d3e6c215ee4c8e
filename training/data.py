"""The training set as the engine sees it: single latents, grouped by shape, and batch choice.

Latents arrive as one batch (N, C, H, W) or a list of batches of different sizes; the engine keeps
one (C, H, W) tensor per image. Batch choice is `torch.randperm(n)[:batch_size]` from the run's
seeded generator (SPEC.md), or an epoch order where every image is seen once per pass.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import torch


def flatten_latents(latents: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """(N, C, H, W) or a list of such batches → N single (C, H, W) latents, in order."""
    batches = [latents] if isinstance(latents, torch.Tensor) else list(latents)
    images = []
    for i, batch in enumerate(batches):
        if batch.dim() != 4:
            raise ValueError(f"latents[{i}]: got shape {tuple(batch.shape)}; expected (batch, channels, height, width)")
        images.extend(batch.unbind(0))
    if not images:
        raise ValueError("latents: no images; give at least one encoded image")
    return images


def check_caption_count(n_captions: int, n_images: int) -> None:
    """One caption for all images, or one per image; anything else names both counts and the fix."""
    if n_captions not in (1, n_images):
        raise ValueError(f"positive: got {n_captions} captions for {n_images} images; "
                         "give 1 for all images, or one per image")


def group_by_shape(indices: Sequence[int], images: Sequence[torch.Tensor]) -> list[list[int]]:
    """Split a batch into same-shape groups (order of first appearance) that can be stacked."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i in indices:
        groups[tuple(images[i].shape)].append(i)
    return list(groups.values())


def batch_indices(n: int, batch_size: int, order: str, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of image indices from the seeded generator."""
    if order == "random":
        while True:
            yield torch.randperm(n, generator=generator)[:batch_size].tolist()
    pending: list[int] = []
    while True:
        if len(pending) < batch_size:
            need = batch_size - len(pending)
            passes = [torch.randperm(n, generator=generator).tolist() for _ in range(-(-need // n))]
            pending += [i for p in passes for i in p]
        batch, pending = pending[:batch_size], pending[batch_size:]
        yield batch
