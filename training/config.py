"""TrainConfig: every setting of a training run, validated once, flowing node → config → engine.

The dataclass is the one field table: each field carries its default, range or choices, tooltip and
the node it appears on (`Setting` in the field's metadata). Train LoRA's and the LoRA Training
Options node's inputs are generated from it (nodes/widgets.py) under the same names, and
`__post_init__` checks every field against it, so a range is stated once. Defaults are SPEC.md's
Train LoRA defaults; the extras default to SPEC behaviour.
"""
from __future__ import annotations

import re
from dataclasses import Field, asdict, dataclass, field, fields
from typing import NamedTuple

from ..lora.algos import ALGORITHMS
from ..lora.targets import TARGETS

OPTIMIZERS = ("AdamW", "Adam", "SGD", "RMSprop")
LOSSES = ("MSE", "L1", "Huber", "SmoothL1")
DTYPE_NAMES = ("bf16", "fp32")
LR_SCHEDULES = ("constant", "linear", "cosine")
LOSS_SPACES = ("native", "x0")  # native: eps / v / flow velocity; x0: the denoised image (ComfyUI core)
BATCH_ORDERS = ("random", "epoch")  # random: randperm(n)[:batch] each step; epoch: each image once a pass

MAX_SEED = 2**64 - 1
ALGORITHM_NAMES = tuple(ALGORITHMS)  # lora, loha, lokr, dora
MAIN, OPTIONS = "main", "options"  # the node a field is an input of: Train LoRA, LoRA Training Options


_KOHYA_LOSSES = {"MSE": "l2", "L1": "l1", "Huber": "huber", "SmoothL1": "smooth_l1"}  # sd-scripts --loss_type


class Setting(NamedTuple):
    """A field's input: its range (low..high) or choices, tooltip, node, and the UI step of a number."""

    tooltip: str
    node: str = MAIN
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    step: float | None = None


def setting(default: object, tooltip: str, *, node: str = MAIN, low: float | None = None, high: float | None = None,
            choices: tuple[str, ...] = (), step: float | None = None) -> Field:
    """A dataclass field whose metadata is its Setting."""
    return field(default=default, metadata={"setting": Setting(tooltip, node, low, high, choices, step)})


def settings() -> dict[str, tuple[object, Setting]]:
    """Field name → (default, Setting), in definition order: the table the nodes are built from."""
    return {f.name: (f.default, f.metadata["setting"]) for f in fields(TrainConfig)}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _check(name: str, value: object, default: object, spec: Setting) -> None:
    """Type, choices and range of one field; the error names the field, the value and the fix."""
    kind = type(default)
    if kind is bool and not isinstance(value, bool) or kind is str and not isinstance(value, str) \
            or kind is int and (isinstance(value, bool) or not isinstance(value, int)) \
            or kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"{name}: got {value!r}; give a {kind.__name__}")
    if spec.choices and value not in spec.choices:
        raise ValueError(f"{name}: got {value!r}; choose one of {', '.join(spec.choices)}")
    if spec.low is not None and not spec.low <= value <= spec.high:
        raise ValueError(f"{name}: got {value}; give a value from {_number(spec.low)} to {_number(spec.high)}")


def _pattern(name: str, value: str) -> None:
    try:
        re.compile(value)
    except re.error as err:
        raise ValueError(f"{name}: {value!r} is not a valid regular expression ({err}); fix or clear it") from None


@dataclass(frozen=True)
class TrainConfig:
    # SPEC.md's Train LoRA inputs
    batch_size: int = setting(1, "Images per step.", low=1, high=10000)
    steps: int = setting(16, "Optimizer steps.", low=1, high=100000)
    learning_rate: float = setting(0.0005, "Learning rate.", low=1e-7, high=1.0, step=1e-6)
    rank: int = setting(8, "LoRA rank.", low=1, high=128)
    optimizer: str = setting("AdamW", "Optimizer (torch defaults besides the learning rate).", choices=OPTIMIZERS)
    loss_function: str = setting("MSE", "Loss function.", choices=LOSSES)
    seed: int = setting(0, "Makes LoRA init, batch choice and noise reproducible.", low=0, high=MAX_SEED)
    training_dtype: str = setting("bf16", "Compute dtype while training (bf16 uses autocast).", choices=DTYPE_NAMES)
    lora_dtype: str = setting("bf16", "Storage dtype of the LoRA weights (training keeps fp32 master weights).",
                              choices=DTYPE_NAMES)
    # Train LoRA's extras
    network_alpha: float = setting(0.0, "LoRA alpha; scale = alpha / rank. 0 means alpha = rank (as kohya-ss).",
                                   low=0.0, high=1024.0, step=0.5)
    gradient_accumulation: int = setting(1, "Batches whose gradients are summed before each optimizer step.",
                                         low=1, high=1024)
    lr_schedule: str = setting("constant", "Learning-rate schedule after warmup.", choices=LR_SCHEDULES)
    warmup_steps: int = setting(0, "Steps of linear warmup from 0.", low=0, high=100000)
    gradient_checkpointing: bool = setting(True, "Recompute activations in the backward pass to save memory.")
    loss_space: str = setting("native", "native: the model's own prediction (eps / v / flow), as kohya-ss; x0: the "
                              "denoised image, as ComfyUI core.", choices=LOSS_SPACES)
    batch_order: str = setting("random", "random: a seeded random subset each step; epoch: every image once per pass.",
                               choices=BATCH_ORDERS)
    max_grad_norm: float = setting(0.0, "Clip the gradient norm to this; 0 = no clipping.", low=0.0, high=1000.0,
                                   step=0.1)
    # The adapter (issue 11)
    algorithm: str = setting("lora", "lora: up·down; loha: Hadamard product of two low-rank products; lokr: Kronecker "
                             "product (lokr_factor); dora: LoRA with a trained magnitude per input channel. All load "
                             "in ComfyUI's LoRA loaders.", choices=ALGORITHM_NAMES)
    target: str = setting("all", "Which layers train. all: every Linear/Conv (plus norm and bias differences when "
                          "train_norms / train_biases are on); attention: the transformer blocks' Linear layers and "
                          "proj_in/proj_out (kohya's LoRA); attention+conv: plus every conv (kohya's LoCon).",
                          choices=TARGETS)
    conv_rank: int = setting(0, "Rank of conv layers (kohya's conv_dim); 0 = the same as rank.", low=0, high=128)
    conv_alpha: float = setting(0.0, "Alpha of conv layers (kohya's conv_alpha); 0 = network_alpha, or conv_rank "
                                "when that is set.", low=0.0, high=1024.0, step=0.5)
    lokr_factor: int = setting(-1, "LoKr only: the size of the small Kronecker factor; -1 = the most square split. "
                               "0 is not allowed.", low=-1, high=1024)
    include_layers: str = setting("", "Regular expression on module paths (e.g. attn2|ff); only matching layers "
                                  "train. Empty = all layers of the target.")
    exclude_layers: str = setting("", "Regular expression on module paths; matching layers do not train. "
                                  "Empty = none excluded.")
    # Off: a file every loader reads in full (bench/diffs.py: training them buys ~2 % held-out loss on the tiny model)
    train_norms: bool = setting(False, "Also train weight differences for layers no adapter serves (norms, grouped "
                                "convs) in the target. Only ComfyUI reads them: save with Save LoRA format full.")
    train_biases: bool = setting(False, "Also train bias differences in the target. Only ComfyUI reads them: save "
                                 "with Save LoRA format full.")

    def __post_init__(self) -> None:
        for name, (default, spec) in settings().items():
            _check(name, getattr(self, name), default, spec)
        if self.lokr_factor == 0:
            raise ValueError(f"lokr_factor: got {self.lokr_factor}; give -1 (automatic) or a positive integer")
        for name in ("include_layers", "exclude_layers"):
            _pattern(name, getattr(self, name))

    def as_metadata(self) -> dict[str, object]:
        return asdict(self)

    def network_args(self) -> dict[str, str]:
        """The network args kohya/LyCORIS write for these settings: conv_dim, conv_alpha, LoKr's factor."""
        conv = {"conv_dim": str(self.conv_rank), "conv_alpha": _number(self.conv_alpha or self.conv_rank)} \
            if self.conv_rank else {}
        return {**conv, **({"factor": str(self.lokr_factor)} if self.algorithm == "lokr" else {})}

    def kohya_metadata(self, images: int) -> dict[str, str]:
        """These settings under kohya-ss' `ss_*` keys (sd-scripts train_network.py), as strings."""
        return {
            "ss_network_dim": str(self.rank), "ss_network_alpha": _number(self.network_alpha or self.rank),
            "ss_learning_rate": str(self.learning_rate), "ss_unet_lr": str(self.learning_rate),
            "ss_optimizer": f"torch.optim.{self.optimizer}", "ss_lr_scheduler": self.lr_schedule,
            "ss_lr_warmup_steps": str(self.warmup_steps), "ss_max_train_steps": str(self.steps),
            "ss_batch_size_per_device": str(self.batch_size), "ss_total_batch_size": str(self.batch_size),
            "ss_gradient_accumulation_steps": str(self.gradient_accumulation),
            "ss_gradient_checkpointing": str(self.gradient_checkpointing),
            "ss_max_grad_norm": str(self.max_grad_norm), "ss_seed": str(self.seed),
            "ss_mixed_precision": "bf16" if self.training_dtype == "bf16" else "no",
            "ss_loss_type": _KOHYA_LOSSES[self.loss_function], "ss_num_train_images": str(images),
        }
