"""LoRA Training Options: the advanced settings of Train LoRA, on a node of their own.

The node's inputs are TrainConfig's "options" fields (training/config.py), same names and ranges.
It outputs one TrainingOptions value for Train LoRA's optional `options` input. Options nodes
chain (an optional `options` input, as core's guider and sampler nodes compose): a field left at
its default on this node keeps what an upstream options node set; a field set here wins.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from ..training.config import OPTIONS, TrainConfig, settings
from .common import CATEGORY
from .widgets import widgets

OPTIONS_TYPE = "LORA_TRAINING_OPTIONS"  # this node's output, Train LoRA's `options` input


class Regularization(NamedTuple):
    """A regularisation set as it came in (LoRA Preservation): its LATENTs and CONDITIONINGs."""

    latents: list
    positive: list


class TextEncoderInput(NamedTuple):
    """What LoRA Text Encoder hands over: the CLIP to train, and the captions as text (None: the texts the
    captions' conditioning carries, nodes/text_encoder.py)."""

    clip: Any
    captions: list[str] | None = None


class TrainingOptions(NamedTuple):
    """The value on the wire: the fields set away from their defaults, the empty caption's CONDITIONING
    for caption dropout (None when not connected), from LoRA Preservation (nodes/preservation.py)
    the preservation captions (one CONDITIONING per training image, or one for all) and the
    regularisation set, and from LoRA Text Encoder the text encoder to train."""

    values: dict[str, Any]
    unconditional: list | None = None
    preservation: list | None = None
    regularization: Regularization | None = None
    text_encoder: TextEncoderInput | None = None


def merged(upstream: TrainingOptions | None, values: dict[str, Any], unconditional: list | None,
           preservation: list | None = None, regularization: Regularization | None = None,
           text_encoder: TextEncoderInput | None = None) -> TrainingOptions:
    """This node's non-default fields over the upstream node's; its inputs, else upstream's.
    Raises ValueError naming a field that is out of range or inconsistent with another."""
    defaults = {name: default for name, (default, _) in settings().items()}
    base = upstream or TrainingOptions({})
    ours = {k: v for k, v in values.items() if v != defaults[k]}
    result = TrainingOptions({**base.values, **ours}, unconditional if unconditional is not None else base.unconditional,
                             preservation if preservation is not None else base.preservation,
                             regularization if regularization is not None else base.regularization,
                             text_encoder if text_encoder is not None else base.text_encoder)
    TrainConfig(**result.values)  # every range and cross-field rule, checked once
    if result.values.get("caption_dropout", 0.0) > 0 and result.unconditional is None:
        raise ValueError("caption_dropout: got {}, but no unconditional CONDITIONING is connected; connect one (a text "
                         "encode of the empty prompt) to the options node's unconditional input, or set "
                         "caption_dropout to 0".format(result.values["caption_dropout"]))
    return result


class ChainedOptions:
    """What every options node is: one options value out, an upstream one in (`CHAIN`)."""

    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = (OPTIONS_TYPE,)
    RETURN_NAMES = ("options",)
    OUTPUT_TOOLTIPS = ("The settings, for Train LoRA's options input (or another options node's).",)
    CHAIN = {"options": (OPTIONS_TYPE, {"tooltip": "Settings from another options node; fields set on this node win, "
                                        "fields left at their defaults keep the upstream values."})}


class TrainingOptionsNode(ChainedOptions):
    DESCRIPTION = ("Advanced settings for Train LoRA: noise-level sampling, loss weighting, noise, dropout and "
                   "optimizer extras. Plug into Train LoRA's options input; chain several to combine. Fields left at "
                   "their defaults change nothing.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {},
            "optional": {
                **cls.CHAIN,
                "unconditional": ("CONDITIONING", {"tooltip": "The empty caption (a text encode of an empty "
                                                   "prompt): what caption_dropout trains the dropped images with."}),
                **widgets(OPTIONS),
            },
        }

    def execute(self, options: TrainingOptions | None = None, unconditional: list | None = None,
                **values: Any) -> tuple[TrainingOptions]:
        return (merged(options, values, unconditional),)
