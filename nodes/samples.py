"""What a LATENT and its captions carry besides the latents, read into the engine's samples
(training/data.py `Samples`). No ComfyUI import, so it tests offline.

- `noise_mask` (ComfyUI's own key, set by Set Latent Noise Mask or Encode Training Folder): the loss
  mask, any size, (B or 1, 1, H, W) or (B or 1, H, W), white = train; brought to each latent's size.
- `lora_trainer_flipped` (B, C, h, w) and `lora_trainer_flipped_mask`: each image's mirror image,
  encoded once; one of the two is drawn each time the image is used.
- `lora_trainer_repeats` (B ints): kohya repeat counts; a sample with N repeats is drawn N times as often.
- A caption whose entries all carry `lora_trainer_caption_variant` in their options is a set of
  variants (shuffled or dropped tags), one drawn per use, not one combined caption.
The original images keep their indices (0…N−1, each with its caption as given) and the extra
alternatives come after them, so data without extras trains exactly as before.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import torch

from ..training.data import Samples, latent_mask

NOISE_MASK = "noise_mask"
FLIPPED = "lora_trainer_flipped"
FLIPPED_MASK = "lora_trainer_flipped_mask"
REPEATS = "lora_trainer_repeats"
VARIANT = "lora_trainer_caption_variant"


class Expanded(NamedTuple):
    images: list[torch.Tensor]  # the originals, then the extra alternatives
    captions: list[list[int]]  # conditioning entries per image
    samples: Samples


def _rows(latent: Mapping, key: str, n: int, what: str) -> list:
    """`latent[key]`'s rows, one per image of the batch (a batch of one is shared); Nones without it."""
    value = latent.get(key)
    if value is None:
        return [None] * n
    if isinstance(value, torch.Tensor):
        if key in (NOISE_MASK, FLIPPED_MASK) and value.dim() == 2:
            value = value[None]
        rows = list(value.unbind(0))
    else:
        rows = list(value)
    if len(rows) == 1:
        return rows * n
    if len(rows) != n:
        raise ValueError(f"{what}: its {key} has {len(rows)} rows for {n} images; give one per image, or one for all")
    return rows


def extras(latents: Sequence[Mapping], what: str = "latents") -> dict[str, list]:
    """Each extra key's rows over all LATENTs, in the order the latents flatten in."""
    out: dict[str, list] = {NOISE_MASK: [], FLIPPED: [], FLIPPED_MASK: [], REPEATS: []}
    for latent in latents:
        n = latent["samples"].shape[0]
        for key in out:
            out[key] += _rows(latent, key, n, what)
    return out


def is_variant_set(entries: Sequence) -> bool:
    """True when these conditioning entries are caption variants (all tagged), not a combined caption."""
    return len(entries) > 1 and all(isinstance(e[1], Mapping) and VARIANT in e[1] for e in entries)


def caption_choices(caption: list[int], entries: Sequence) -> list[list[int]]:
    """An image's caption alternatives: its entries grouped by variant, or the one caption as given."""
    if not is_variant_set([entries[e] for e in caption]):
        return [caption]
    groups: dict[int, list[int]] = {}
    for e in caption:
        groups.setdefault(entries[e][1][VARIANT], []).append(e)
    return list(groups.values())


def expand(images: list[torch.Tensor], captions: list[list[int]], entries: Sequence, latents: Sequence[Mapping],
           what: str = "latents") -> Expanded:
    """The engine's images, captions and samples from the latents' extras and the caption variants."""
    rows = extras(latents, what)
    out_images, out_captions = list(images), [list(c) for c in captions]
    masks: list[torch.Tensor | None] = [_mask(m, x) for m, x in zip(rows[NOISE_MASK], images)]
    alternatives = []
    for i, image in enumerate(images):
        choices = caption_choices(captions[i], entries)
        out_captions[i] = choices[0]
        versions = [(image, masks[i])]
        if rows[FLIPPED][i] is not None:
            versions.append((_shaped(rows[FLIPPED][i], image, what), _mask(rows[FLIPPED_MASK][i], image)))
        mine = [i]
        for v, (latent, mask) in enumerate(versions):
            for c, caption in enumerate(choices):
                if v == 0 and c == 0:
                    continue
                mine.append(len(out_images))
                out_images.append(latent)
                out_captions.append(caption)
                masks.append(mask)
        alternatives += [mine] * _repeats(rows[REPEATS][i], what)
    return Expanded(out_images, out_captions, Samples(alternatives, masks))


def _shaped(flipped: torch.Tensor, image: torch.Tensor, what: str) -> torch.Tensor:
    if flipped.numel() != image.numel():
        raise ValueError(f"{what}: a flipped latent {tuple(flipped.shape)} does not match its image's "
                         f"{tuple(image.shape)}; encode both with the same VAE at the same size")
    return flipped.reshape(image.shape).to(image.dtype)


def _mask(mask: torch.Tensor | None, image: torch.Tensor) -> torch.Tensor | None:
    return None if mask is None else latent_mask(mask.float(), image.shape)


def _repeats(value, what: str) -> int:
    count = 1 if value is None else int(value)
    if count < 1:
        raise ValueError(f"{what}: a repeat count of {count}; give 1 or more")
    return count


def bucket_latent(latents: torch.Tensor, flipped: torch.Tensor | None, masks: torch.Tensor | None,
                  flipped_masks: torch.Tensor | None, repeats: Sequence[int]) -> dict:
    """One bucket as a LATENT carrying its extras under the keys `expand` reads."""
    latent = {"samples": latents}
    if masks is not None:
        latent[NOISE_MASK] = masks
    if flipped is not None:
        latent[FLIPPED] = flipped
        if flipped_masks is not None:
            latent[FLIPPED_MASK] = flipped_masks
    if any(r != 1 for r in repeats):
        latent[REPEATS] = list(repeats)
    return latent


def variant_conditioning(variants: Sequence[list]) -> list:
    """One CONDITIONING from each variant's CONDITIONING: their entries, tagged as variants when more than one."""
    if len(variants) == 1:
        return variants[0]
    return [[entry[0], {**entry[1], VARIANT: k}] for k, conditioning in enumerate(variants) for entry in conditioning]
