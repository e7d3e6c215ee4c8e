"""Train LoRA: the node's schema and a thin execute (SPEC.md, "Train LoRA")."""
from __future__ import annotations

from ..lora.targets import TARGETS
from ..training.config import (ALGORITHM_NAMES, BATCH_ORDERS, DTYPE_NAMES, LOSS_SPACES, LOSSES, LR_SCHEDULES, MAX_SEED,
                               OPTIMIZERS, TrainConfig)
from .common import CATEGORY, NONE_LORA, lora_choices

_D = TrainConfig()  # the defaults, stated once


# The adapter's settings (issue 11); they move to the advanced settings when issue "training options" lands.
ADAPTER_INPUTS = {
    "algorithm": (list(ALGORITHM_NAMES), {"default": _D.algorithm, "tooltip": "lora: up·down; loha: Hadamard product of two low-rank products; lokr: Kronecker product (lokr_factor); dora: LoRA with a trained magnitude per input channel. All load in ComfyUI's LoRA loaders."}),
    "target": (list(TARGETS), {"default": _D.target, "tooltip": "Which layers train. all: every Linear/Conv (plus norm and bias differences when train_norms / train_biases are on); attention: the transformer blocks' Linear layers and proj_in/proj_out (kohya's LoRA); attention+conv: plus every conv (kohya's LoCon)."}),
    "conv_rank": ("INT", {"default": _D.conv_rank, "min": 0, "max": 128, "tooltip": "Rank of conv layers (kohya's conv_dim); 0 = the same as rank."}),
    "conv_alpha": ("FLOAT", {"default": _D.conv_alpha, "min": 0.0, "max": 1024.0, "step": 0.5, "tooltip": "Alpha of conv layers (kohya's conv_alpha); 0 = network_alpha, or conv_rank when that is set."}),
    "lokr_factor": ("INT", {"default": _D.lokr_factor, "min": -1, "max": 1024, "tooltip": "LoKr only: the size of the small Kronecker factor; -1 = the most square split. 0 is not allowed."}),
    "include_layers": ("STRING", {"default": _D.include, "tooltip": "Regular expression on module paths (e.g. attn2|ff); only matching layers train. Empty = all layers of the target."}),
    "exclude_layers": ("STRING", {"default": _D.exclude, "tooltip": "Regular expression on module paths; matching layers do not train. Empty = none excluded."}),
    "train_norms": ("BOOLEAN", {"default": _D.train_norms, "tooltip": "Also train weight differences for layers no adapter serves (norms, grouped convs) in the target. Only ComfyUI reads them: save with Save LoRA format full."}),
    "train_biases": ("BOOLEAN", {"default": _D.train_biases, "tooltip": "Also train bias differences in the target. Only ComfyUI reads them: save with Save LoRA format full."}),
}


class TrainLoRA:
    DESCRIPTION = "Teaches a model a style or subject from example images, entirely inside ComfyUI."
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    INPUT_IS_LIST = True
    RETURN_TYPES = ("MODEL", "LORA_MODEL", "LOSS_MAP", "INT")
    RETURN_NAMES = ("model_with_lora", "lora", "loss", "steps")
    OUTPUT_TOOLTIPS = (
        "The base model with the trained LoRA applied, usable by any sampler node.",
        "The LoRA weights alone, to save or apply to another model.",
        "The loss history, for monitoring ({'loss': [...]}).",
        "Total steps trained, including the earlier steps of a continued LoRA.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model to train."}),
                "latents": ("LATENT", {"tooltip": "The training images, VAE-encoded: one batch, or several LATENTs of different sizes."}),
                "positive": ("CONDITIONING", {"tooltip": "The caption(s): one for all images, or one per image. A ConditioningCombine is one combined caption (its prompts applied together)."}),
            },
            "optional": {
                "batch_size": ("INT", {"default": _D.batch_size, "min": 1, "max": 10000, "tooltip": "Images per step."}),
                "steps": ("INT", {"default": _D.steps, "min": 1, "max": 100000, "tooltip": "Optimizer steps."}),
                "learning_rate": ("FLOAT", {"default": _D.learning_rate, "min": 1e-7, "max": 1.0, "step": 1e-6, "round": False, "tooltip": "Learning rate."}),
                "rank": ("INT", {"default": _D.rank, "min": 1, "max": 128, "tooltip": "LoRA rank."}),
                "optimizer": (list(OPTIMIZERS), {"default": _D.optimizer, "tooltip": "Optimizer (torch defaults besides the learning rate)."}),
                "loss_function": (list(LOSSES), {"default": _D.loss_function, "tooltip": "Loss function."}),
                "seed": ("INT", {"default": _D.seed, "min": 0, "max": MAX_SEED, "tooltip": "Makes LoRA init, batch choice and noise reproducible."}),
                "training_dtype": (list(DTYPE_NAMES), {"default": _D.training_dtype, "tooltip": "Compute dtype while training (bf16 uses autocast)."}),
                "lora_dtype": (list(DTYPE_NAMES), {"default": _D.lora_dtype, "tooltip": "Storage dtype of the LoRA weights (training keeps fp32 master weights)."}),
                "existing_lora": (lora_choices(), {"default": NONE_LORA, "tooltip": "Continue training this LoRA instead of starting fresh (any format; steps read from its name)."}),
                "network_alpha": ("FLOAT", {"default": _D.alpha, "min": 0.0, "max": 1024.0, "step": 0.5, "tooltip": "LoRA alpha; scale = alpha / rank. 0 means alpha = rank."}),
                "gradient_accumulation": ("INT", {"default": _D.grad_accum, "min": 1, "max": 1024, "tooltip": "Batches whose gradients are summed before each optimizer step."}),
                "lr_schedule": (list(LR_SCHEDULES), {"default": _D.lr_schedule, "tooltip": "Learning-rate schedule after warmup."}),
                "warmup_steps": ("INT", {"default": _D.warmup_steps, "min": 0, "max": 100000, "tooltip": "Steps of linear warmup from 0."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": _D.gradient_checkpointing, "tooltip": "Recompute activations in the backward pass to save memory."}),
                "loss_space": (list(LOSS_SPACES), {"default": _D.loss_space, "tooltip": "native: the model's own prediction (eps / v / flow), as kohya-ss; x0: the denoised image, as ComfyUI core."}),
                "batch_order": (list(BATCH_ORDERS), {"default": _D.batch_order, "tooltip": "random: a seeded random subset each step; epoch: every image once per pass."}),
                "max_grad_norm": ("FLOAT", {"default": _D.max_grad_norm, "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip": "Clip the gradient norm to this; 0 = no clipping."}),
                **ADAPTER_INPUTS,
            },
        }

    def execute(self, model, latents, positive, **options) -> tuple:
        from .comfy_train import train_lora  # ComfyUI glue, imported only when the node runs

        return train_lora(model[0], latents, positive, {k: v[0] for k, v in options.items()})
