"""LoRA Text Encoder: train the text encoder too (docs/nodes.md#lora-text-encoder-loratrainer_textencoder).

A chained options node (its `options` output goes to Train LoRA's `options` input, or to another options
node), as LoRA Preservation is. It carries the CLIP to train and `text_encoder_lr`; Train LoRA then puts
LoRA adapters on the CLIP (SD1.x: CLIP-L; SDXL: CLIP-L and CLIP-G) and encodes each step's captions
through it, with gradients (nodes/comfy_text_encoder.py).

The captions' text: the conditioning that Load Captioned Image Set, Encode Training Folder, Encode
Training Clips and LoRA Preservation make carries the text each entry was encoded from (caption variants
included), so nothing more is needed with them. Captions encoded elsewhere (CLIPTextEncode) get their text
from the `captions` input: one for all images, or one per image.
"""
from __future__ import annotations

from typing import Any

from ..training.config import TEXT_ENCODER
from .conditioning import CAPTION_KEY
from .families import TEXT_ENCODERS
from .options import ChainedOptions, TextEncoderInput, TrainingOptions, merged
from .widgets import widgets

DEFAULT_TEXT_ENCODER_LR = 5e-5  # the node's default, kohya's usual text_encoder_lr (the field's own 0 means off)


def trained_clips(clip_class: str, lr: float) -> tuple[str, ...]:
    """The CLIPs of a text encoder of class `clip_class` that train (nodes/families.py `TEXT_ENCODERS`); a
    ValueError naming text_encoder_lr for any other text encoder."""
    names = TEXT_ENCODERS.get(clip_class)
    if names is None:
        raise ValueError(f"text_encoder_lr: got {lr}, but this model's text encoder ({clip_class}) is not trained "
                         "here; text-encoder LoRAs train for SD1.x and SDXL (kohya's lora_te_ keys); set "
                         "text_encoder_lr to 0")
    return names


def entry_texts(entries: list, training: list[list[int]], captions: list[str] | None) -> dict[int, str]:
    """Conditioning entry → the text to encode it from: the text it carries (`CAPTION_KEY`), else for a
    training image's entry its caption in `captions` (one for all images, or one per image). A ValueError
    naming `captions` when a training image's entry has neither, or when images sharing an entry have
    different captions."""
    texts = {e: entry[1][CAPTION_KEY] for e, entry in enumerate(entries)
             if isinstance(entry[1], dict) and isinstance(entry[1].get(CAPTION_KEY), str)}
    if captions is not None and len(captions) not in (1, len(training)):
        raise ValueError(f"captions: got {len(captions)} captions for {len(training)} images; give 1 for all images, "
                         "or one per image")
    given: dict[int, str] = {}
    for image, used in enumerate(training):
        for e in used:
            if e in texts:
                continue
            if captions is None:
                raise ValueError(f"captions: the text encoder trains on each caption's text, but image {image + 1}'s "
                                 "positive was encoded by another node (e.g. CLIPTextEncode), which keeps no text; "
                                 "connect the captions as text to LoRA Text Encoder's captions input, or encode them "
                                 "with Load Captioned Image Set or Encode Training Folder")
            text = captions[0] if len(captions) == 1 else captions[image]
            if given.setdefault(e, text) != text:
                raise ValueError(f"captions: images share one positive but have different captions ({given[e][:40]!r}, "
                                 f"{text[:40]!r}); give one CONDITIONING per image, or one caption")
    return {**texts, **given}


class LoRATextEncoder(ChainedOptions):
    DESCRIPTION = ("Trains the text encoder too (SD1.x and SDXL): LoRA adapters on the CLIP learn with the "
                   "diffusion model's, so a new trigger word comes to mean something. Chain into Train LoRA's "
                   "options input; apply the result with Load LoRA Model's clip input (or core's LoraLoader).")
    INPUT_IS_LIST = True  # the captions come as a list

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        fields = widgets(TEXT_ENCODER)
        kind, spec = fields["text_encoder_lr"]
        fields["text_encoder_lr"] = (kind, {**spec, "default": DEFAULT_TEXT_ENCODER_LR})
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The model's text encoder (from the same checkpoint loader): trained "
                                  "with the LoRA; ComfyUI's copy for other nodes stays as it is."}),
            },
            "optional": {
                **cls.CHAIN,
                "captions": ("STRING", {"forceInput": True, "tooltip": "The training captions as text, one for all "
                                        "images or one per image; only for captions encoded by another node "
                                        "(CLIPTextEncode): this pack's loaders keep each caption's text."}),
                **fields,
            },
        }

    def execute(self, clip: list, options: list | None = None, captions: list | None = None,
                **values: Any) -> tuple[TrainingOptions]:
        values = {k: v[0] for k, v in values.items()}
        texts = [str(c) for c in captions] if captions else None
        return (merged(options[0] if options else None, values, None, text_encoder=TextEncoderInput(clip[0], texts)),)
