"""TrainConfig: every setting of a training run, validated once, flowing node → config → engine.

The dataclass is the one field table: each field carries its default, range or choices, tooltip and
the node it appears on (`Setting` in the field's metadata). Train LoRA's and the LoRA Training
Options node's inputs are generated from it (nodes/widgets.py) under the same names, and
`__post_init__` checks every field against it, so a range is stated once. The main fields' defaults
are Train LoRA's (docs/nodes.md#train-lora-loratrainer_trainlora); every extra defaults to the plain
behaviour (docs/options.md#every-field).
"""
from __future__ import annotations

import re
from dataclasses import Field, asdict, dataclass, field, fields
from typing import NamedTuple

from ..lora.algos import ALGORITHMS, effective_alpha
from ..lora.targets import TARGETS

OPTIMIZERS = ("AdamW", "Adam", "SGD", "RMSprop", "Adafactor", "Prodigy", "AdamW8bit", "Lion", "CAME",
              "AdamWScheduleFree")  # core's four first (docs/options.md#optimizers)
LOSSES = ("MSE", "L1", "Huber", "SmoothL1")
DTYPE_NAMES = ("bf16", "fp32")
LR_SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts")
LOSS_SPACES = ("native", "x0")  # native: eps / v / flow velocity; x0: the denoised image (ComfyUI core)
BATCH_ORDERS = ("random", "epoch")  # random: randperm(n)[:batch] each step; epoch: each image once a pass
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "sigmoid")
FLOW_SHIFTS = ("model", "fixed", "resolution")  # resolution: Flux's shift from the latent's token count
EXPERTS = ("none", "high_noise", "low_noise")  # a model trained as noise-range experts (Wan 2.2 A14B)
LOSS_WEIGHTINGS = ("none", "min_snr", "debiased")
RANK_ALGORITHMS = ("lora", "dora")  # the algorithms with a rank-wide activation and an `up` matrix

OPTIMIZER_PATHS = {"Prodigy": "prodigyopt.Prodigy", "AdamW8bit": "bitsandbytes.optim.AdamW8bit",
                   "Lion": "pytorch_optimizer.Lion", "CAME": "pytorch_optimizer.CAME",
                   "AdamWScheduleFree": "schedulefree.AdamWScheduleFree"}  # the rest: torch.optim
MAX_SEED = 2**64 - 1
ALGORITHM_NAMES = tuple(ALGORITHMS)  # lora, loha, lokr, dora
# the node a field is an input of: Train LoRA, an options node (nodes/options.py GROUPS), LoRA Preservation, LoRA Text Encoder
MAIN, OPTIONS, PRESERVATION, TEXT_ENCODER = "main", "options", "preservation", "text_encoder"


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
    # Train LoRA's main inputs (docs/nodes.md#train-lora-loratrainer_trainlora)
    batch_size: int = setting(1, "Images per step.", low=1, high=10000)
    steps: int = setting(16, "Optimizer steps.", low=1, high=100000)
    learning_rate: float = setting(0.0005, "Learning rate.", low=1e-7, high=1.0, step=1e-6)
    rank: int = setting(8, "LoRA rank.", low=1, high=128)
    optimizer: str = setting("AdamW", "Optimizer (its defaults besides the learning rate). AdamW8bit: AdamW with its "
                            "two moments in 8 bits (bitsandbytes), a quarter of AdamW's optimizer memory. Adafactor: "
                            "the step is the learning rate, not relative to the weights. Lion (about a third of "
                            "AdamW's LR), CAME (about a tenth): pytorch_optimizer. AdamWScheduleFree: no LR decay "
                            "needed (schedule constant); previews, validation and files use its averaged weights.",
                            choices=OPTIMIZERS)
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
    # The adapter (docs/algorithms.md#algorithms)
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
    # LoRA Training Options: noise levels (training/objective.py)
    timestep_sampling: str = setting("uniform", "How noise levels are drawn. uniform: evenly through the model's "
                                     "schedule; logit_normal: timestep fraction t = sigmoid(N(logit_mean, logit_std)) "
                                     "(SD3); sigmoid: t = sigmoid(sigmoid_scale·N(0, 1)) (kohya's Flux default).",
                                     node=OPTIONS, choices=TIMESTEP_SAMPLINGS)
    logit_mean: float = setting(0.0, "logit_normal: mean of the normal before the sigmoid; > 0 draws noisier steps.",
                                node=OPTIONS, low=-5.0, high=5.0, step=0.05)
    logit_std: float = setting(1.0, "logit_normal: standard deviation of the normal before the sigmoid.",
                               node=OPTIONS, low=0.01, high=5.0, step=0.05)
    sigmoid_scale: float = setting(1.0, "sigmoid: scale of the normal before the sigmoid.", node=OPTIONS, low=0.01,
                                   high=10.0, step=0.1)
    flow_shift: str = setting("model", "Flow models only. model: the model's own schedule; fixed: "
                              "σ = s·t / (1 + (s−1)·t) with s = flow_shift_value; resolution: s from each latent's "
                              "size as Flux does (e^0.5 at 256 tokens to e^1.15 at 4096).", node=OPTIONS,
                              choices=FLOW_SHIFTS)
    flow_shift_value: float = setting(3.0, "The fixed shift s (SD3 uses 3.0).", node=OPTIONS, low=0.01, high=100.0,
                                      step=0.05)
    min_timestep: int = setting(0, "Lowest timestep drawn, of 1000 (0 = least noise).", node=OPTIONS, low=0, high=999)
    max_timestep: int = setting(1000, "Highest timestep drawn, of 1000 (1000 = most noise).", node=OPTIONS, low=1,
                                high=1000)
    # loss weighting
    loss_weighting: str = setting("none", "Per-image loss weight by noise level. min_snr: min(SNR, γ) in x0 terms "
                                  "(Hang et al. 2023), i.e. min(SNR, γ)/SNR for eps, min(SNR, γ)/(SNR+1) for v; "
                                  "debiased: √SNR in x0 terms, 1/√SNR for eps (kohya's debiased estimation).",
                                  node=OPTIONS, choices=LOSS_WEIGHTINGS)
    min_snr_gamma: float = setting(5.0, "min_snr: γ (5 in the paper).", node=OPTIONS, low=0.1, high=100.0, step=0.1)
    # noise
    noise_offset: float = setting(0.0, "Adds offset·N(0, 1) per image and channel to the noise, so the model learns "
                                  "to shift mean brightness (0.05–0.1 typical).", node=OPTIONS, low=0.0, high=1.0,
                                  step=0.01)
    multires_noise_iterations: int = setting(0, "Multires (pyramid) noise: levels of coarser noise added; 0 = off "
                                             "(6–10 typical).", node=OPTIONS, low=0, high=10)
    multires_noise_discount: float = setting(0.3, "Multires noise: weight factor per coarser level.", node=OPTIONS,
                                             low=0.0, high=1.0, step=0.01)
    ip_noise_gamma: float = setting(0.0, "Input perturbation (Ning et al. 2023): the model input gets "
                                    "noise + γ·N(0, 1) while the target keeps the noise; 0.1 typical.", node=OPTIONS,
                                    low=0.0, high=1.0, step=0.01)
    # dropout (kohya's networks.lora)
    network_dropout: float = setting(0.0, "Dropout on the rank-wide activation down(x) (lora, dora).", node=OPTIONS,
                                     low=0.0, high=0.99, step=0.01)
    rank_dropout: float = setting(0.0, "Drops whole ranks per image, rescaling the rest (lora, dora).", node=OPTIONS,
                                  low=0.0, high=0.99, step=0.01)
    module_dropout: float = setting(0.0, "Skips a layer's adapter entirely for a step with this probability.",
                                    node=OPTIONS, low=0.0, high=0.99, step=0.01)
    caption_dropout: float = setting(0.0, "Probability that an image trains with the empty caption (needs the "
                                     "options node's unconditional input).", node=OPTIONS, low=0.0, high=1.0,
                                     step=0.01)
    # masked loss (training/objective.py `mask_weights`; masks ride on the LATENT as `noise_mask`)
    unmasked_weight: float = setting(0.0, "Masked loss: the loss weight outside an image's mask (1 = the mask is "
                                     "ignored); images without a mask train everywhere.", node=OPTIONS, low=0.0,
                                     high=1.0, step=0.01)
    normalize_mask: bool = setting(False, "Masked loss: divide each image's loss by its mean weight, so a small mask "
                                   "trains as strongly as a large one.", node=OPTIONS)
    # image-conditioned models (edit, image-to-video, inpainting): the caption's condition image
    control_dropout: float = setting(0.0, "Probability that an image trains without its condition image (an edit "
                                     "model's reference, a start frame, an inpainting image), as the model samples "
                                     "without one.", node=OPTIONS, low=0.0, high=1.0, step=0.01)
    # memory (docs/memory.md)
    step_in_backward: bool = setting(False, "Step each adapter's optimizer in the backward pass, as soon as its "
                                     "gradient is made, which is then freed: the step never holds every gradient "
                                     "(kohya's fused_backward_pass). Same result as the plain step; not with "
                                     "max_grad_norm, gradient_accumulation above 1, Prodigy or torchrun.",
                                     node=OPTIONS)
    optimizer_on_cpu: bool = setting(False, "With step_in_backward: the optimizer's state and an fp32 copy of the "
                                     "adapters stay in RAM; each gradient is copied there, stepped, and the adapter "
                                     "copied back. Frees the optimizer state from the GPU for two small copies per "
                                     "adapter and step.", node=OPTIONS)
    offload: bool = setting(False, "Keep the frozen weights in RAM and stream each layer's to the GPU as it runs "
                            "(ComfyUI's partial loading, as core's offloading option), for a model larger than the "
                            "GPU; slower. Nothing to do when ComfyUI computes on the CPU.", node=OPTIONS)
    # optimizer and LR (training/optim.py)
    weight_decay: float = setting(-1.0, "Decoupled (AdamW) or L2 weight decay; -1 = the optimizer's default "
                                  "(AdamW 0.01, the others 0).", node=OPTIONS, low=-1.0, high=10.0, step=0.001)
    lora_plus_ratio: float = setting(1.0, "LoRA+ (Hayou et al. 2024): the up matrices learn this many times faster "
                                     "(16 typical; lora, dora).", node=OPTIONS, low=1.0, high=1000.0, step=1.0)
    lr_restarts: int = setting(1, "cosine_with_restarts: the number of cosine cycles.", node=OPTIONS, low=1, high=100)
    min_learning_rate: float = setting(0.0, "The floor linear and cosine schedules decay to instead of 0.",
                                       node=OPTIONS, low=0.0, high=1.0, step=1e-6)
    # checkpoints and resume (training/resume.py, nodes/checkpoints.py): how a run is kept, not what it trains
    save_every: int = setting(0, "Every this many steps (and at the last step), write a checkpoint: the LoRA "
                              "(named like Save LoRA's files, with the step) and a training state to resume from. "
                              "0 = off (a cancel or a NaN loss still writes one, to resume from).", node=OPTIONS,
                              low=0, high=100000)
    keep_last: int = setting(0, "Keep only the newest this many checkpoints of the run (older ones are deleted); "
                             "0 = keep all.", node=OPTIONS, low=0, high=10000)
    checkpoint_prefix: str = setting("loras/checkpoints/lora", "Where checkpoints go, relative to the output "
                                     "folder: <prefix>_<step>_steps_<counter>_.safetensors; training states go "
                                     "under lora_training_states/ with the same name.", node=OPTIONS)
    resume: str = setting("", "Continue a run from its training state (bit-identical to an uninterrupted run): "
                          "'latest' = the newest state under checkpoint_prefix (none yet: start fresh), or a state "
                          "file's path relative to the output folder. Empty = start fresh.", node=OPTIONS)

    # EMA of the adapters (training/ema.py); after resume, so saved workflows keep their widget order
    ema_decay: float = setting(0.0, "Keep an exponential moving average of the LoRA weights with this decay per step "
                               "(0.999 typical for 1000s of steps); 0 = off.", node=OPTIONS, low=0.0, high=0.99999,
                               step=0.0001)
    ema_warmup: bool = setting(True, "EMA: the decay at step t is min((1 + t) / (10 + t), ema_decay), so early "
                               "steps are not averaged with the untrained start (OneTrainer's warm-up).",
                               node=OPTIONS)
    ema_every: int = setting(1, "EMA: update the average every this many steps (decay^n for n steps, so the "
                             "averaging horizon stays in steps).", node=OPTIONS, low=1, high=1000)
    ema_on_cpu: bool = setting(False, "EMA: keep the average in RAM instead of on the compute device.", node=OPTIONS)
    ema_evaluate: bool = setting(True, "EMA: previews and the validation loss use the averaged weights.",
                                 node=OPTIONS)
    ema_save: bool = setting(True, "EMA: the LoRA output and checkpoints are the averaged weights (off: the "
                             "raw ones); the file's metadata says which.", node=OPTIONS)
    # LoRA Preservation (training/objective.py `Objective.preservation`, loop.py `GradientPass`): what the LoRA must not change
    trigger_word: str = setting("", "The word in the captions that names what the LoRA teaches (e.g. 'sks woman').",
                                node=PRESERVATION)
    class_word: str = setting("", "What the trigger is an instance of (e.g. 'woman'): differential output "
                              "preservation trains the class caption to predict what the base predicts.",
                              node=PRESERVATION)
    dop_multiplier: float = setting(0.0, "Differential output preservation (ai-toolkit): each image's caption with "
                                    "trigger_word replaced by class_word, LoRA on, is trained towards the base's "
                                    "prediction (LoRA off) at the same noise; this weight on that loss. 0 = off.",
                                    node=PRESERVATION, low=0.0, high=100.0, step=0.05)
    blank_prompt_multiplier: float = setting(0.0, "Blank-prompt preservation: the same with the empty caption "
                                             "(the options node's unconditional input); this weight. 0 = off.",
                                             node=PRESERVATION, low=0.0, high=100.0, step=0.05)
    prior_ratio: float = setting(0.5, "Regularisation set: the share of each batch's rows drawn from it "
                                 "(DreamBooth's prior preservation; kohya pairs them 1:1, 0.5).",
                                 node=PRESERVATION, low=0.0, high=0.95, step=0.05)
    prior_loss_weight: float = setting(1.0, "Regularisation set: the loss weight of its images (kohya's "
                                       "prior_loss_weight).", node=PRESERVATION, low=0.0, high=100.0, step=0.05)
    # LoRA Text Encoder (nodes/text_encoder.py)
    text_encoder_lr: float = setting(0.0, "The text encoder's learning rate (kohya's text_encoder_lr; the schedule "
                                     "scales it as it scales learning_rate): above 0, LoRA adapters on the CLIP "
                                     "(SD1.x) or both CLIPs (SDXL) train with the diffusion model's. 0 = off.",
                                     node=TEXT_ENCODER, low=0.0, high=1.0, step=1e-6)
    # Noise-range experts (Wan 2.2 A14B; training/experts.py); last, so saved workflows keep their widget order
    expert: str = setting("none", "Train one expert of a model made of noise-range experts (Wan 2.2 A14B): "
                          "high_noise draws only σ ≥ expert_boundary, low_noise only σ < it, keeping the "
                          "timestep distribution's shape inside that range (musubi-tuner's "
                          "preserve_distribution_shape). Flow models only. To train both in one run, leave this "
                          "none and connect Train LoRA's high_noise_model.", node=OPTIONS, choices=EXPERTS)
    expert_boundary: float = setting(0.875, "The σ (the model's timestep / 1000, after its shift) where the "
                                     "high-noise expert hands over to the low-noise one: 0.875 for Wan 2.2 T2V "
                                     "A14B, 0.9 for I2V A14B.", node=OPTIONS, low=0.01, high=0.99, step=0.005)

    def __post_init__(self) -> None:
        for name, (default, spec) in settings().items():
            _check(name, getattr(self, name), default, spec)
        if self.lokr_factor == 0:
            raise ValueError(f"lokr_factor: got {self.lokr_factor}; give -1 (automatic) or a positive integer")
        for name in ("include_layers", "exclude_layers"):
            _pattern(name, getattr(self, name))
        if not self.checkpoint_prefix.strip():
            raise ValueError("checkpoint_prefix: is empty; give a name relative to the output folder, like "
                             "'loras/checkpoints/my_lora'")
        self._check_consistent()

    def _check_consistent(self) -> None:
        """Rules between fields; each error names the field to change."""
        if self.min_timestep >= self.max_timestep:
            raise ValueError(f"min_timestep: got {self.min_timestep}, not below max_timestep {self.max_timestep}; "
                             "give a range such as 0 to 1000")
        if self.weight_decay < 0 and self.weight_decay != -1:
            raise ValueError(f"weight_decay: got {self.weight_decay}; give 0 or more, or -1 (the optimizer's default)")
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(f"min_learning_rate: got {self.min_learning_rate}, above learning_rate "
                             f"{self.learning_rate}; give a value up to learning_rate")
        if self.step_in_backward:
            clash = [(n, v) for n, v, off in (("max_grad_norm", self.max_grad_norm, 0.0),
                                               ("gradient_accumulation", self.gradient_accumulation, 1),
                                               ("optimizer", self.optimizer, None)) if v != off and
                     (n != "optimizer" or v == "Prodigy")]
            if clash:
                name, value = clash[0]
                raise ValueError(f"{name}: got {value}, but step_in_backward steps each adapter before the other "
                                 f"gradients exist, and {name} needs them all first; turn step_in_backward off, or "
                                 f"set {name} to {'AdamW' if name == 'optimizer' else _number(1 if name == 'gradient_accumulation' else 0)}")
        if self.optimizer_on_cpu and not self.step_in_backward:
            raise ValueError("optimizer_on_cpu: the optimizer steps in RAM as each gradient is made, which needs "
                             "step_in_backward; turn step_in_backward on, or optimizer_on_cpu off")
        if self.optimizer == "AdamWScheduleFree":
            if self.lr_schedule != "constant":
                raise ValueError(f"lr_schedule: got {self.lr_schedule!r}, but AdamWScheduleFree averages its iterates "
                                 "instead of decaying the LR; set lr_schedule to constant (warmup_steps still "
                                 "applies), or choose another optimizer")
            if self.step_in_backward:
                raise ValueError("step_in_backward: AdamWScheduleFree switches every parameter between its training "
                                 "and averaged point together; turn step_in_backward off, or choose another optimizer")
        if self.dop_multiplier and not self.trigger_word.strip():
            raise ValueError(f"trigger_word: is empty, but dop_multiplier is {self.dop_multiplier}; give the word the "
                             "captions use for the subject, or set dop_multiplier to 0")
        for name in ("network_dropout", "rank_dropout", "lora_plus_ratio"):
            off = 1.0 if name == "lora_plus_ratio" else 0.0
            if getattr(self, name) != off and self.algorithm not in RANK_ALGORITHMS:
                raise ValueError(f"{name}: got {getattr(self, name)}, but algorithm {self.algorithm} has no rank-wide "
                                 f"activation or up matrix; use it with lora or dora, or set it to {_number(off)}")

    def as_metadata(self) -> dict[str, object]:
        return asdict(self)

    def network_args(self) -> dict[str, str]:
        """The network args kohya/LyCORIS write for these settings: conv_dim, conv_alpha, LoKr's factor."""
        conv = {"conv_dim": str(self.conv_rank), "conv_alpha": _number(effective_alpha(self.conv_alpha, self.conv_rank))} \
            if self.conv_rank else {}
        dropout = {k: str(getattr(self, k)) for k in ("rank_dropout", "module_dropout") if getattr(self, k)}
        return {**conv, **({"factor": str(self.lokr_factor)} if self.algorithm == "lokr" else {}), **dropout}

    def kohya_metadata(self, images: int, steps: int | None = None, reg_images: int = 0) -> dict[str, str]:
        """These settings under kohya-ss' `ss_*` keys (sd-scripts train_network.py), as strings; with
        `steps` (the LoRA's steps so far) also `ss_epoch`, the epoch they reach. An epoch is one pass
        over the `images` at this batch size: ceil(images / batch_size) batches
        (`ss_num_batches_per_epoch`), ceil(that / gradient_accumulation) optimizer steps; kohya counts
        `ss_num_epochs` = ceil(max_train_steps / steps per epoch). `reg_images`: the regularisation set's size."""
        batches = -(-images // self.batch_size)
        per_epoch = max(1, -(-batches // self.gradient_accumulation))
        epochs = {"ss_num_batches_per_epoch": str(batches), "ss_num_epochs": str(-(-self.steps // per_epoch))}
        if steps is not None:
            epochs["ss_epoch"] = str(-(-steps // per_epoch))
        return {
            **epochs,
            "ss_network_dim": str(self.rank), "ss_network_alpha": _number(effective_alpha(self.network_alpha, self.rank)),
            "ss_learning_rate": str(self.learning_rate), "ss_unet_lr": str(self.learning_rate),
            "ss_text_encoder_lr": str(self.text_encoder_lr or None),
            "ss_network_train_unet_only": str(not self.text_encoder_lr),
            "ss_optimizer": OPTIMIZER_PATHS.get(self.optimizer, f"torch.optim.{self.optimizer}"), "ss_lr_scheduler": self.lr_schedule,
            "ss_lr_warmup_steps": str(self.warmup_steps), "ss_max_train_steps": str(self.steps),
            "ss_batch_size_per_device": str(self.batch_size),
            "ss_total_batch_size": str(self.batch_size * self.gradient_accumulation),  # kohya: × processes × accumulation
            "ss_gradient_accumulation_steps": str(self.gradient_accumulation),
            "ss_gradient_checkpointing": str(self.gradient_checkpointing),
            "ss_max_grad_norm": str(self.max_grad_norm), "ss_seed": str(self.seed),
            "ss_mixed_precision": "bf16" if self.training_dtype == "bf16" else "no",
            "ss_loss_type": _KOHYA_LOSSES[self.loss_function], "ss_num_train_images": str(images),
            "ss_noise_offset": str(self.noise_offset or None), "ss_ip_noise_gamma": str(self.ip_noise_gamma or None),
            "ss_multires_noise_iterations": str(self.multires_noise_iterations or None),
            "ss_multires_noise_discount": str(self.multires_noise_discount),
            "ss_min_snr_gamma": str(self.min_snr_gamma if self.loss_weighting == "min_snr" else None),
            "ss_debiased_estimation": str(self.loss_weighting == "debiased"),
            "ss_caption_dropout_rate": str(self.caption_dropout), "ss_network_dropout": str(self.network_dropout or None),
            "ss_min_timestep": str(self.min_timestep), "ss_max_timestep": str(self.max_timestep),
            "ss_num_reg_images": str(reg_images), "ss_prior_loss_weight": str(self.prior_loss_weight),
            "ss_cache_latents": "True",  # trained from latents
        }
