"""LoRA Preservation: what a LoRA must leave as the base had it
(docs/nodes.md#lora-preservation-loratrainer_preservation).

A second options node, chained like the LoRA Options nodes (its `options` output goes to Train LoRA's
`options` input, or to another options node). Its widgets are TrainConfig's "preservation" fields
(training/config.py); its inputs carry what those need:
- `clip` and `captions` (the captions as text, e.g. Encode Training Folder's `captions` output):
  differential output preservation's captions, each with `trigger_word` replaced by `class_word`
  (`class_caption`), encoded here with that CLIP, one CONDITIONING per training image;
- `regularization_latents` and `regularization_positive`: a regularisation set of class images and
  their captions (DreamBooth's prior preservation), mixed into the batches at `prior_ratio`.
Blank-prompt preservation uses the options node's `unconditional` input, as caption dropout does.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from ..training.config import PRESERVATION
from .options import ChainedOptions, Regularization, TrainingOptions, merged
from .widgets import widgets

log = logging.getLogger(__name__)


def class_caption(caption: str, trigger: str, class_word: str) -> str:
    """`caption` with every whole-word `trigger` (any case) replaced by `class_word`, and the spaces and
    commas an empty `class_word` leaves behind tidied."""
    pattern = re.compile(r"(?<!\w)" + re.escape(trigger.strip()) + r"(?!\w)", re.IGNORECASE)
    text = pattern.sub(class_word.strip(), caption)
    if not class_word.strip():
        text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)
        text = re.sub(r"\s{2,}", " ", text).strip(" ,")
    return text


def class_captions(captions: list[str], trigger: str, class_word: str) -> list[str]:
    """Every caption's class caption; a ValueError naming trigger_word when no caption has the trigger."""
    if not captions:
        raise ValueError("captions: none connected, but dop_multiplier is above 0; connect the captions as text (e.g. "
                         "Encode Training Folder's or Load Captioned Image Set's captions output)")
    out = [class_caption(c, trigger, class_word) for c in captions]
    missing = sum(1 for c, o in zip(captions, out) if c == o)
    if missing == len(captions):
        raise ValueError(f"trigger_word: {trigger!r} is in none of the {len(captions)} captions (e.g. "
                         f"{captions[0][:60]!r}); give the word the captions use for the subject")
    if missing:
        log.warning("LoRA Preservation: %d of %d captions lack the trigger word %r; their preservation caption is "
                    "the caption itself", missing, len(captions), trigger)
    return out


class LoRAPreservation(ChainedOptions):
    DESCRIPTION = ("Keeps a LoRA from changing what it should not: differential output preservation (the captions "
                   "with the trigger replaced by the class word keep the base's predictions), blank-prompt "
                   "preservation, and a regularisation set of class images. Chain with the LoRA Options nodes into "
                   "Train LoRA's options input.")
    INPUT_IS_LIST = True  # the captions and the regularisation set come as lists

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {},
            "optional": {
                **cls.CHAIN,
                "clip": ("CLIP", {"tooltip": "The model's text encoder: encodes the preservation captions "
                                  "(differential output preservation)."}),
                "captions": ("STRING", {"forceInput": True, "tooltip": "The training captions as text, one per "
                                        "image in the latents' order (Encode Training Folder's captions output)."}),
                "regularization_latents": ("LATENT", {"tooltip": "Class images (VAE-encoded), one batch or several: "
                                                      "the regularisation set."}),
                "regularization_positive": ("CONDITIONING", {"tooltip": "Their captions: one for all, or one per "
                                                             "image."}),
                **widgets(PRESERVATION),
            },
        }

    def execute(self, options: list | None = None, clip: list | None = None, captions: list | None = None,
                regularization_latents: list | None = None, regularization_positive: list | None = None,
                **values: Any) -> tuple[TrainingOptions]:
        values = {k: v[0] for k, v in values.items()}
        if bool(regularization_latents) != bool(regularization_positive):
            given, missing = (("regularization_latents", "regularization_positive") if regularization_latents
                              else ("regularization_positive", "regularization_latents"))
            raise ValueError(f"{missing}: not connected, but {given} is; a regularisation set needs both its latents "
                             "and their captions")
        regularization = (Regularization(list(regularization_latents), list(regularization_positive))
                          if regularization_latents else None)
        result = merged(options[0] if options else None, values, None, None, regularization)  # checks every field
        settings = result.values
        if not settings.get("dop_multiplier", 0.0):
            return (result,)
        if not clip and not captions and result.preservation is not None:
            return (result,)  # the upstream preservation node's captions
        if not clip:
            raise ValueError("clip: no text encoder connected, but dop_multiplier is above 0; connect the model's "
                             "CLIP (it encodes the captions with the class word)")
        from .comfy_io import encode_captions  # ComfyUI glue, imported only when the node runs

        texts = class_captions(list(captions or []), settings.get("trigger_word", ""), settings.get("class_word", ""))
        log.info("LoRA Preservation: %d preservation captions, e.g. %r", len(texts), texts[0][:80])
        return (result._replace(preservation=encode_captions(clip[0], texts)),)
