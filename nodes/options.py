"""The options nodes: the advanced settings of Train LoRA, grouped on nodes of their own.

Their inputs are TrainConfig's "options" fields (training/config.py), same names and ranges, split by
topic (GROUPS): noise and timesteps, loss, optimizer and memory, dropout and captions, checkpoints and
resume, EMA. Each outputs one TrainingOptions value for Train LoRA's optional `options` input, and
options nodes chain (an optional `options` input, as core's guider and sampler nodes compose): a field
left at its default on a node keeps what an upstream options node set; a field set there wins. So a
graph holds only the groups it changes, each a few widgets tall.

Why nodes and not one node whose widgets a web extension folds: a saved workflow and the API carry
each widget by its name on a plain node, which every ComfyUI frontend (and the headless API) reads the
same way; hiding widgets means patching the frontend's layout, which has changed between its
versions. The one-column node with every option (LoRATrainer_TrainingOptions, 38 widgets) stays, for
the workflows saved with it: same id, same widgets in the same order (LEGACY_ORDER: a UI workflow
stores widget values by position), marked deprecated so node search offers the groups instead.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

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


class TrainingAdapter(NamedTuple):
    """What LoRA Training Adapter hands over: a LoRA file of the loras folder applied to the model while it
    trains (a de-distillation adapter for a step-distilled base), and its strength (nodes/adapter.py)."""

    name: str
    strength: float = 1.0


class TrainingOptions(NamedTuple):
    """The value on the wire: the fields set away from their defaults, the empty caption's CONDITIONING
    for caption dropout (None when not connected), from LoRA Preservation (nodes/preservation.py)
    the preservation captions (one CONDITIONING per training image, or one for all) and the
    regularisation set, from LoRA Text Encoder the text encoder to train, and from LoRA Training
    Adapter the adapter applied while training."""

    values: dict[str, Any]
    unconditional: list | None = None
    preservation: list | None = None
    regularization: Regularization | None = None
    text_encoder: TextEncoderInput | None = None
    training_adapter: TrainingAdapter | None = None


def merged(upstream: TrainingOptions | None, values: dict[str, Any], unconditional: list | None,
           preservation: list | None = None, regularization: Regularization | None = None,
           text_encoder: TextEncoderInput | None = None,
           training_adapter: TrainingAdapter | None = None) -> TrainingOptions:
    """This node's non-default fields over the upstream node's; its inputs, else upstream's.
    Raises ValueError naming a field that is out of range or inconsistent with another."""
    defaults = {name: default for name, (default, _) in settings().items()}
    base = upstream or TrainingOptions({})
    ours = {k: v for k, v in values.items() if v != defaults[k]}
    result = TrainingOptions({**base.values, **ours}, unconditional if unconditional is not None else base.unconditional,
                             preservation if preservation is not None else base.preservation,
                             regularization if regularization is not None else base.regularization,
                             text_encoder if text_encoder is not None else base.text_encoder,
                             training_adapter if training_adapter is not None else base.training_adapter)
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


UNCONDITIONAL = {"unconditional": ("CONDITIONING", {"tooltip": "The empty caption (a text encode of an empty "
                                                     "prompt): what caption_dropout trains the dropped images with."})}


class Group(NamedTuple):
    """One options node: its id and display name (nodes/registry.py), what it is for, its fields in widget
    order (frozen once shipped: append new ones), and whether it takes the empty caption."""

    node_id: str
    name: str
    description: str
    fields: tuple[str, ...]
    unconditional: bool = False


GROUPS: tuple[Group, ...] = (
    Group("LoRATrainer_OptionsNoise", "LoRA Options: Noise & Timesteps",
          "Which noise levels training draws (the distribution, its shift, the timestep range, a Wan 2.2 expert's "
          "range) and extra noise (offset, multi-resolution, input perturbation).",
          ("timestep_sampling", "logit_mean", "logit_std", "sigmoid_scale", "flow_shift", "flow_shift_value",
           "min_timestep", "max_timestep", "noise_offset", "multires_noise_iterations", "multires_noise_discount",
           "ip_noise_gamma", "expert", "expert_boundary")),
    Group("LoRATrainer_OptionsLoss", "LoRA Options: Loss",
          "How each step's loss is weighted: by noise level (min-SNR, debiased) and by mask.",
          ("loss_weighting", "min_snr_gamma", "unmasked_weight", "normalize_mask")),
    Group("LoRATrainer_OptionsOptimizer", "LoRA Options: Optimizer & Memory",
          "Optimizer extras (weight decay, LoRA+, restarts, the LR floor) and where its state and the frozen weights "
          "live.",
          ("weight_decay", "lora_plus_ratio", "lr_restarts", "min_learning_rate", "step_in_backward",
           "optimizer_on_cpu", "offload")),
    Group("LoRATrainer_OptionsDropout", "LoRA Options: Dropout & Captions",
          "Dropout of the adapters, of captions (trained with the empty caption: connect unconditional) and of a "
          "conditioned model's image.",
          ("network_dropout", "rank_dropout", "module_dropout", "caption_dropout", "control_dropout"),
          unconditional=True),
    Group("LoRATrainer_OptionsCheckpoints", "LoRA Options: Checkpoints",
          "Checkpoints during training (every N steps, how many kept, where) and the checkpoint to resume from.",
          ("save_every", "keep_last", "checkpoint_prefix", "resume")),
    Group("LoRATrainer_OptionsEMA", "LoRA Options: EMA",
          "An exponential moving average of the adapters: its decay and warm-up, where it lives, and whether "
          "validation, previews and the saved file use it.",
          ("ema_decay", "ema_warmup", "ema_every", "ema_on_cpu", "ema_evaluate", "ema_save")),
)
# LoRATrainer_TrainingOptions' widgets as shipped: a UI workflow saved with it stores its values by position
LEGACY_ORDER = (
    "timestep_sampling", "logit_mean", "logit_std", "sigmoid_scale", "flow_shift", "flow_shift_value", "min_timestep",
    "max_timestep", "loss_weighting", "min_snr_gamma", "noise_offset", "multires_noise_iterations",
    "multires_noise_discount", "ip_noise_gamma", "network_dropout", "rank_dropout", "module_dropout", "caption_dropout",
    "unmasked_weight", "normalize_mask", "control_dropout", "step_in_backward", "optimizer_on_cpu", "offload",
    "weight_decay", "lora_plus_ratio", "lr_restarts", "min_learning_rate", "save_every", "keep_last",
    "checkpoint_prefix", "resume", "ema_decay", "ema_warmup", "ema_every", "ema_on_cpu", "ema_evaluate", "ema_save")


def _inputs(names: Sequence[str], unconditional: bool) -> dict:
    table = widgets(OPTIONS)
    return {"required": {}, "optional": {**ChainedOptions.CHAIN, **(UNCONDITIONAL if unconditional else {}),
                                         **{name: table[name] for name in names}}}


class TrainingOptionsNode(ChainedOptions):
    """Every option on one node (the node workflows were saved with before the groups)."""

    DEPRECATED = True  # node search offers the grouped nodes; saved workflows load and run as before
    DESCRIPTION = ("Every advanced setting of Train LoRA on one node (kept for workflows saved with it; the LoRA "
                   "Options nodes hold the same settings by topic). Plug into Train LoRA's options input; chain "
                   "several to combine. Fields left at their defaults change nothing.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        later = [name for name in widgets(OPTIONS) if name not in LEGACY_ORDER]  # options added since: appended
        return _inputs((*LEGACY_ORDER, *later), unconditional=True)

    def execute(self, options: TrainingOptions | None = None, unconditional: list | None = None,
                **values: Any) -> tuple[TrainingOptions]:
        return (merged(options, values, unconditional),)


def _group_node(group: Group) -> type:
    """The options node of one group: its fields as widgets; the rest of the options are left to other nodes."""

    class GroupOptions(ChainedOptions):
        DESCRIPTION = (f"{group.description} For Train LoRA's options input; chain it with the other LoRA Options "
                       "nodes. Fields left at their defaults change nothing.")
        GROUP = group

        @classmethod
        def INPUT_TYPES(cls) -> dict:
            return _inputs(group.fields, group.unconditional)

        def execute(self, options: TrainingOptions | None = None, unconditional: list | None = None,
                    **values: Any) -> tuple[TrainingOptions]:
            return (merged(options, values, unconditional),)

    GroupOptions.__name__ = GroupOptions.__qualname__ = group.node_id.removeprefix("LoRATrainer_")
    return GroupOptions


GROUP_NODES: dict[str, tuple[type, str]] = {group.node_id: (_group_node(group), group.name) for group in GROUPS}
