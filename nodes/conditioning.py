"""Train LoRA's `positive` input as ComfyUI hands it over (INPUT_IS_LIST): one flat list of conditioning
entries and how many entries each caption has. No ComfyUI import, so it tests offline.

A CONDITIONING is a list of entries `[tensor, {options}]`: one from a text encode, several from a
ConditioningCombine, which is one combined caption (its prompts applied together, as when sampling).
The list input holds one CONDITIONING per upstream item.

ComfyUI core's dataset nodes use the other reading, the one core's TrainLoraNode has: each *entry* is
one image's caption. ResolutionBucket (comfy_extras/nodes_dataset.py) gives one LATENT per bucket,
batched (Bi, C, H, W), and beside it one list of Bi entries, the i-th the caption of the bucket's
i-th image; LoadTrainingDataset gives back whatever was saved, ResolutionBucket's form included. Such
a list looks exactly like a ConditioningCombine of Bi prompts, so the data alone cannot tell them
apart; the node that feeds `positive` can (the workflow is a hidden input of the node):
`PER_IMAGE_ENTRIES` are read entry by entry, one caption per image, checked against the latents.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

# core's nodes whose conditioning output holds one entry per image (a list per bucket)
PER_IMAGE_ENTRIES = ("ResolutionBucket", "LoadTrainingDataset")
# the conditioning key of an edit model's reference images, a list of latents (core's ReferenceLatent appends)
REFERENCE_KEY = "reference_latents"


# the text an entry was encoded from, which this pack's encoders keep on it: a trained text encoder
# (nodes/text_encoder.py) encodes it again each step
CAPTION_KEY = "lora_trainer_caption"


def with_caption(conditioning: list, text: str) -> list:
    """`conditioning` with every entry marked as encoded from `text` (`CAPTION_KEY`); the entries are copies."""
    return [[tensor, {**options, CAPTION_KEY: text}] for tensor, options in conditioning]


# an inpainting (or image-to-video) model's image beside the latent and its mask, as core's
# InpaintModelConditioning and WanImageToVideo set them
CONCAT_KEY = "concat_latent_image"
CONCAT_MASK_KEY = "concat_mask"


def with_concat_image(conditioning: list, latent, mask) -> list:
    """`conditioning` with the image beside the latent and its mask, set on every entry as core's
    InpaintModelConditioning (the masked image's latent (1, C, h, w), the mask (1, 1, h, w), 1 = paint) and
    WanImageToVideo (the start video's latent (1, C, T, h, w), the mask (1, 1, T, h, w), 1 = generate) set
    them; the entries are copies."""
    return [[tensor, {**options, CONCAT_KEY: latent, CONCAT_MASK_KEY: mask}] for tensor, options in conditioning]


def with_reference(conditioning: list, latent) -> list:
    """`conditioning` with `latent` (1, C, h, w) appended to every entry's reference latents, as core's
    ReferenceLatent node sets them; the entries are copies (the input is not changed)."""
    return [[tensor, {**options, REFERENCE_KEY: [*options.get(REFERENCE_KEY, []), latent]}]
            for tensor, options in conditioning]


def source_class(prompt: Any, node_id: Any, input_name: str) -> str | None:
    """The class of the node that feeds `input_name` of node `node_id` in the API-format `prompt`
    (ComfyUI's hidden PROMPT and UNIQUE_ID), or None when that cannot be told."""
    if not isinstance(prompt, Mapping):
        return None
    link = ((prompt.get(str(node_id)) or {}).get("inputs") or {}).get(input_name)
    if not (isinstance(link, (list, tuple)) and len(link) == 2):
        return None  # not a link
    source = prompt.get(str(link[0]))
    return source.get("class_type") if isinstance(source, Mapping) else None


def per_image(positive: Sequence, batch_sizes: Sequence[int], source: str, what: str = "positive") -> list:
    """`source`'s per-bucket entry lists → one CONDITIONING per image, in the order the latents flatten
    in; a ValueError naming `what` when a bucket's captions do not match its LATENT's images."""
    if len(positive) != len(batch_sizes):
        raise ValueError(f"{what}: got {len(positive)} caption lists from {source} for {len(batch_sizes)} LATENTs; "
                         f"connect {source}'s latents and conditioning outputs together, both to this node")
    for index, (bucket, size) in enumerate(zip(positive, batch_sizes)):
        if len(bucket) != size:
            raise ValueError(f"{what}: {source}'s bucket {index} has {len(bucket)} captions for the {size} images of "
                             f"its LATENT; connect {source}'s latents and conditioning outputs together")
    return [[entry] for bucket in positive for entry in bucket]


def captions_of(positive: Sequence, batch_sizes: Sequence[int], source: str | None,
                what: str = "positive") -> list:
    """One CONDITIONING per caption: as the input came, or, from `PER_IMAGE_ENTRIES`, one per image."""
    if source in PER_IMAGE_ENTRIES:
        return per_image(positive, batch_sizes, source, what)
    return list(positive)


def flat_conditioning(positive: Sequence) -> tuple[list, list[int]]:
    """CONDITIONINGs → (one flat list of [tensor, options] entries, entries per CONDITIONING)."""
    return [entry for conditioning in positive for entry in conditioning], [len(c) for c in positive]


def latent_shaped(value) -> bool:
    """A tensor of 4 or more dimensions (a latent, an image, a mask), or a non-empty list of them."""
    if isinstance(value, torch.Tensor):
        return value.dim() >= 4
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(latent_shaped(v) for v in value)


def hold_latent_inputs(entries: list) -> tuple[list, dict[int, dict]]:
    """`entries` ([tensor, options] pairs) for the guider, without the options that have a latent's shape;
    and those options by entry index."""
    given, held = [], {}
    for i, (tensor, options) in enumerate(entries):
        shaped = {k: v for k, v in options.items() if latent_shaped(v)} if isinstance(options, dict) else {}
        if shaped:
            held[i] = shaped
            options = {k: v for k, v in options.items() if k not in shaped}
        given.append([tensor, options])
    return given, held
