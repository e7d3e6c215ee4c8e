"""TrainConfig: every setting of a training run, validated once, flowing node → config → engine.

Defaults are SPEC.md's Train LoRA defaults; the extras (accumulation, alpha, LR schedule, warmup,
checkpointing, loss space, batch order, gradient clipping) default to SPEC behaviour.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

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


_KOHYA_LOSSES = {"MSE": "l2", "L1": "l1", "Huber": "huber", "SmoothL1": "smooth_l1"}  # sd-scripts --loss_type


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: got {value!r}; choose one of {', '.join(choices)}")


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name}: got {value}; give a value from {low} to {high}")


def _pattern(name: str, value: str) -> None:
    try:
        re.compile(value)
    except re.error as err:
        raise ValueError(f"{name}: {value!r} is not a valid regular expression ({err}); fix or clear it") from None


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 1
    steps: int = 16
    learning_rate: float = 0.0005
    rank: int = 8
    optimizer: str = "AdamW"
    loss_function: str = "MSE"
    seed: int = 0
    training_dtype: str = "bf16"
    lora_dtype: str = "bf16"
    alpha: float = 0.0  # 0 means alpha = rank (scale 1), as kohya-ss
    grad_accum: int = 1
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    gradient_checkpointing: bool = True
    loss_space: str = "native"
    batch_order: str = "random"
    max_grad_norm: float = 0.0  # 0 = no clipping
    algorithm: str = "lora"
    target: str = "all"
    conv_rank: int = 0  # 0 = as rank (kohya's conv_dim)
    conv_alpha: float = 0.0  # 0 = as alpha, or conv_rank when that is set (kohya's conv_alpha)
    lokr_factor: int = -1  # -1 = the most square split
    include: str = ""  # regex on module paths; empty = every layer of the target
    exclude: str = ""
    # Off: a file every loader reads in full (bench/diffs.py: training them buys ~2 % held-out loss on the tiny model)
    train_norms: bool = False
    train_biases: bool = False

    def __post_init__(self) -> None:
        _in_range("batch_size", self.batch_size, 1, 10000)
        _in_range("steps", self.steps, 1, 100000)
        _in_range("learning_rate", self.learning_rate, 1e-7, 1.0)
        _in_range("rank", self.rank, 1, 128)
        _in_range("seed", self.seed, 0, MAX_SEED)
        _in_range("alpha", self.alpha, 0.0, 1e6)
        _in_range("grad_accum", self.grad_accum, 1, 1024)
        _in_range("warmup_steps", self.warmup_steps, 0, 100000)
        _in_range("max_grad_norm", self.max_grad_norm, 0.0, 1e6)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("loss_function", self.loss_function, LOSSES)
        _choice("training_dtype", self.training_dtype, DTYPE_NAMES)
        _choice("lora_dtype", self.lora_dtype, DTYPE_NAMES)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("loss_space", self.loss_space, LOSS_SPACES)
        _choice("batch_order", self.batch_order, BATCH_ORDERS)
        _choice("algorithm", self.algorithm, ALGORITHM_NAMES)
        _choice("target", self.target, TARGETS)
        _in_range("conv_rank", self.conv_rank, 0, 128)
        _in_range("conv_alpha", self.conv_alpha, 0.0, 1e6)
        if self.lokr_factor != -1 and self.lokr_factor < 1:
            raise ValueError(f"lokr_factor: got {self.lokr_factor}; give -1 (automatic) or a positive integer")
        for name in ("include", "exclude"):
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
            "ss_network_dim": str(self.rank), "ss_network_alpha": _number(self.alpha or self.rank),
            "ss_learning_rate": str(self.learning_rate), "ss_unet_lr": str(self.learning_rate),
            "ss_optimizer": f"torch.optim.{self.optimizer}", "ss_lr_scheduler": self.lr_schedule,
            "ss_lr_warmup_steps": str(self.warmup_steps), "ss_max_train_steps": str(self.steps),
            "ss_batch_size_per_device": str(self.batch_size), "ss_total_batch_size": str(self.batch_size),
            "ss_gradient_accumulation_steps": str(self.grad_accum),
            "ss_gradient_checkpointing": str(self.gradient_checkpointing),
            "ss_max_grad_norm": str(self.max_grad_norm), "ss_seed": str(self.seed),
            "ss_mixed_precision": "bf16" if self.training_dtype == "bf16" else "no",
            "ss_loss_type": _KOHYA_LOSSES[self.loss_function], "ss_num_train_images": str(images),
        }
