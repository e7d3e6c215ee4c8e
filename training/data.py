"""The training set as the engine sees it: single latents, grouped by shape, and batch choice.

Latents arrive as one batch (N, C, H, W) or a list of batches of different sizes; the engine keeps
one (C, H, W) tensor per image. Video latents (N, C, T, H, W) (Wan) are the same with one more axis:
one (C, T, H, W) tensor per video; any rank from 4 up is taken, and only same-shape latents share a batch. Batch choice is `torch.randperm(n)[:batch_size]` from the run's
seeded generator (docs/options.md#what-each-option-does), or an epoch order where every image is seen once per pass.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import torch


def flatten_latents(latents: torch.Tensor | Sequence[torch.Tensor], what: str = "latents") -> list[torch.Tensor]:
    """(N, C, H, W) or a list of such batches → N single (C, H, W) latents, in order; video batches
    (N, C, T, H, W) → N single (C, T, H, W) latents. `what` names the input in errors."""
    batches = [latents] if isinstance(latents, torch.Tensor) else list(latents)
    images = []
    for i, batch in enumerate(batches):
        if batch.dim() < 4:
            raise ValueError(f"{what}[{i}]: got shape {tuple(batch.shape)}; expected (batch, channels, height, width), "
                             "or (batch, channels, frames, height, width) for video; give a VAE-encoded LATENT")
        images.extend(batch.unbind(0))
    if not images:
        raise ValueError(f"{what}: no images; give at least one encoded image")
    return images


def model_latents(batches: Sequence[torch.Tensor], channels: int | None, dimensions: int | None, model_name: str,
                  what: str = "latents") -> list[torch.Tensor]:
    """Make these latents fit this model, in one call: LATENT batches → single latents (`flatten_latents`),
    image latents given a frame axis for a model of 3-D latents (`as_model_rank`), then refused, naming
    `what` and the model, when their channels (`check_latent_channels`) or rank (`check_latent_rank`) are
    not the model's. `channels` / `dimensions`: the model's latent format's (None: not known, unchecked)."""
    images = flatten_latents(batches, what)
    if isinstance(dimensions, int):
        images = as_model_rank(images, dimensions)
    if isinstance(channels, int):
        check_latent_channels(images, channels, model_name, what)
    if isinstance(dimensions, int):  # video latents for an image model: refused, naming the model
        check_latent_rank(images, dimensions, model_name, what)
    return images


def check_caption_count(n_captions: int, n_images: int, what: str = "positive") -> None:
    """One caption for all images, or one per image; anything else names the input (`what`), both
    counts and the fix."""
    if n_captions not in (1, n_images):
        raise ValueError(f"{what}: got {n_captions} captions for {n_images} images; "
                         "give 1 for all images, or one per image")


def caption_entries(entry_counts: Sequence[int], n_images: int, what: str = "positive") -> list[list[int]]:
    """Which conditioning entries each image trains with: one list of entry indices per image.

    `entry_counts[i]` is how many entries the i-th CONDITIONING holds: 1 for a text encode, several
    for a ConditioningCombine, whose prompts are one combined caption, as when sampling with it.
    One CONDITIONING serves every image; otherwise there must be one per image (else a ValueError
    naming `what`).
    """
    check_caption_count(len(entry_counts), n_images, what)
    starts = [sum(entry_counts[:i]) for i in range(len(entry_counts))]
    combined = [list(range(start, start + count)) for start, count in zip(starts, entry_counts)]
    return combined * n_images if len(combined) == 1 else combined


def describe_captions(entry_counts: Sequence[int], n_images: int) -> str:
    """One line saying how the captions reach the images, e.g. for a ConditioningCombine."""
    combined = sum(1 for c in entry_counts if c > 1)
    if len(entry_counts) == 1:
        what = (f"one combined caption ({entry_counts[0]} prompts, e.g. from ConditioningCombine) for every image"
                if combined else "one caption for every image")
    else:
        what = "one caption per image" + (f" ({combined} of them combined from several prompts)" if combined else "")
    return f"Train LoRA: {n_images} images, {what}"


def check_latent_channels(images: Sequence[torch.Tensor], channels: int, model_name: str, what: str = "latents") -> None:
    """Every (C, H, W) or (C, T, H, W) latent has the model's `channels`; else a ValueError naming the VAE/model mismatch."""
    wrong = next((x for x in images if x.shape[0] != channels), None)
    if wrong is None:
        return
    got = wrong.shape[0]
    raise ValueError(
        f"{what}: they have {got} channels, but this model ({model_name}) takes {channels}-channel latents; the "
        f"images were encoded with the VAE of another model ({_vae_family(got)}); encode them with the VAE that "
        f"belongs to this model ({_vae_family(channels)}), e.g. its checkpoint loader's VAE output")


def as_model_rank(images: list[torch.Tensor], dimensions: int) -> list[torch.Tensor]:
    """Image latents (C, H, W) for a model of 3-D latents (Wan, Qwen-Image: `dimensions` 3) get a
    frame axis, (C, 1, H, W), as ComfyUI's sampler gives them (`fix_empty_latent_channels`); others
    are returned as they are. Without it the model's 5-D latent scaling would broadcast them wrong."""
    if dimensions != 3:
        return images
    return [x.unsqueeze(1) if x.dim() == 3 else x for x in images]


def check_latent_rank(images: Sequence[torch.Tensor], dimensions: int, model_name: str, what: str = "latents") -> None:
    """Video latents (C, T, H, W) for a model of image latents (`dimensions` 2, its latent format's
    spatial axes) are a ValueError naming the model; else nothing. (Models of 3-D latents, Wan and
    Qwen-Image, also take single images, so 4-D latents are not refused for them.)"""
    wrong = next((x for x in images if x.dim() - 1 > dimensions), None)
    if wrong is None or dimensions >= 3:
        return
    raise ValueError(f"{what}: they are video latents {tuple(wrong.shape)} (channels, frames, height, width), but this "
                     f"model ({model_name}) takes image latents (channels, height, width); train a video model (e.g. "
                     "Wan) on them, or encode single images with this model's VAE")


def _vae_family(channels: int) -> str:
    families = {4: "4 channels: SD1.x/SDXL", 16: "16 channels: SD3/Flux", 128: "128 channels: Flux 2"}
    return families.get(channels, f"{channels} channels")


def oversized_batch_note(batch_size: int, n_images: int, order: str) -> str | None:
    """One line for a batch_size above the image count (what each step then trains on), else None."""
    if batch_size <= n_images:
        return None
    if order == "random":
        what = f"each step trains on all {n_images} images once"
    else:
        what = f"each step fills its {batch_size} places by repeating images"
    return f"Train LoRA: batch_size {batch_size} is larger than the {n_images} images; {what}"


class Samples:
    """What the batch order draws from: `alternatives[s]` are the images (indices into the latents) that
    sample s trains as, one drawn each time the sample is used (the image itself, its flipped copy, its
    caption variants); a sample listed twice (kohya repeats) is drawn twice as often. `masks[i]` is image
    i's loss mask (1, …) at its latent's size, or None (trains everywhere); `masks` None: no image has one.
    With one alternative per sample nothing extra is drawn, so plain data draws as before samples existed."""

    def __init__(self, alternatives: Sequence[Sequence[int]], masks: Sequence[torch.Tensor | None] | None = None):
        self.alternatives = [list(a) for a in alternatives]
        self.masks = list(masks) if masks is not None and any(m is not None for m in masks) else None
        self.varied = any(len(a) > 1 for a in self.alternatives)

    @classmethod
    def plain(cls, n: int) -> "Samples":
        return cls([[i] for i in range(n)])

    def __len__(self) -> int:
        return len(self.alternatives)

    def check(self, images: Sequence[torch.Tensor]) -> None:
        """Every alternative names an image, and every mask has its image's size; else ValueError."""
        if not self.alternatives or any(not a for a in self.alternatives):
            raise ValueError("samples: every sample needs at least one image")
        bad = next((i for a in self.alternatives for i in a if not 0 <= i < len(images)), None)
        if bad is not None:
            raise ValueError(f"samples: image {bad} does not exist ({len(images)} images)")
        if self.masks is None:
            return
        if len(self.masks) != len(images):
            raise ValueError(f"masks: got {len(self.masks)} masks for {len(images)} images; give one (or None) per image")
        for i, (mask, image) in enumerate(zip(self.masks, images)):
            if mask is not None and tuple(mask.shape) != (1, *image.shape[1:]):
                raise ValueError(f"masks: mask {i} is {tuple(mask.shape)}, its latent {tuple(image.shape)}; "
                                 "give masks at the latent's size (latent_mask)")

    def pick(self, drawn: Sequence[int], generator: torch.Generator) -> list[int]:
        """The image each drawn sample trains as this time: one alternative, uniformly, from `generator`."""
        if not self.varied:
            return [self.alternatives[s][0] for s in drawn]
        u = torch.rand(len(drawn), generator=generator).tolist()
        choices = [self.alternatives[s] for s in drawn]
        return [a[min(int(x * len(a)), len(a) - 1)] for a, x in zip(choices, u)]

    def masks_of(self, group: Sequence[int], x0: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, …) masks of the images `group` (ones where an image has none), or None without masks."""
        if self.masks is None:
            return None
        ones = torch.ones((1, *x0.shape[2:]))  # also for images after the masks' (a regularisation set's)
        return torch.stack([ones if i >= len(self.masks) or self.masks[i] is None else self.masks[i].float().cpu()
                            for i in group]).to(x0.device)


def latent_mask(mask: torch.Tensor, latent_shape: Sequence[int]) -> torch.Tensor:
    """A pixel mask (H, W) or (1, H, W), values in [0, 1], → (1, …) at the latent's spatial size
    (`latent_shape` (C, h, w) or (C, T, h, w)): each latent cell the mean of the pixels it covers (area
    downsampling), repeated over frames for video."""
    mask = mask.float().reshape(1, 1, *mask.shape[-2:])
    size = tuple(latent_shape[-2:])
    small = torch.nn.functional.interpolate(mask, size=size, mode="area") if mask.shape[-2:] != size else mask
    small = small.reshape(1, *size).clamp(0, 1)
    if len(latent_shape) > 3:
        small = small.unsqueeze(1).expand(1, *latent_shape[1:-2], *size).contiguous()
    return small


def group_by_shape(indices: Sequence[int], images: Sequence[torch.Tensor]) -> list[list[int]]:
    """Split a batch into same-shape groups (order of first appearance) that can be stacked."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i in indices:
        groups[tuple(images[i].shape)].append(i)
    return list(groups.values())


class BatchOrder:
    """Batch choice from the run's seeded generator. random: `randperm(n)[:batch_size]` each step
    (docs/options.md#what-each-option-does); epoch: every image once per pass, a pass drawn as a fresh randperm when needed.
    `pending` (the rest of the current pass) is all the state besides the generator."""

    def __init__(self, n: int, batch_size: int, order: str, pending: Sequence[int] = ()):
        self.n, self.batch_size, self.order = n, batch_size, order
        self.pending = list(pending)

    def next(self, generator: torch.Generator) -> list[int]:
        if self.order == "random":
            return torch.randperm(self.n, generator=generator)[:self.batch_size].tolist()
        if len(self.pending) < self.batch_size:
            need = self.batch_size - len(self.pending)
            passes = [torch.randperm(self.n, generator=generator).tolist() for _ in range(-(-need // self.n))]
            self.pending += [i for p in passes for i in p]
        batch, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
        return batch


def batch_indices(n: int, batch_size: int, order: str, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of image indices from the seeded generator (BatchOrder)."""
    batches = BatchOrder(n, batch_size, order)
    while True:
        yield batches.next(generator)
