"""Every key layout the LoRA loader reads and the saver writes, in one place.

Our files use the kohya-ss sd-scripts layout that ComfyUI, A1111/Forge and kohya tools load
(`networks/lora.py`): `lora_unet_<module path, dots → underscores>` followed by one of the suffixes
below. The loader also reads ComfyUI core training's files (`diffusion_model.<path>.lora_up.weight`),
diffusers/PEFT files (`<prefix>.<path>.lora_A.weight` / `lora_B.weight`), and diffusers' 2023
attention-processor files (`<path>.processor.to_q_lora.down.weight`, as comfy/lora.py maps them).
Text-encoder keys (`lora_te_…`, `text_encoder.…`) are recognised so that they can be kept aside.
"""
from __future__ import annotations

import re

from .algos import ALGORITHM_SUFFIXES
from .algos.lora import DOWN, UP

KOHYA_UNET_PREFIX = "lora_unet_"

ALPHA = "alpha"
DIFF = "diff"
DIFF_B = "diff_b"

# Key suffix → the suffix we hold it under: every algorithm's own (lora/algos/), the differences,
# and foreign spellings. PEFT's lora_A is the down projection, lora_B the up.
SUFFIX_FIELDS: dict[str, str] = {
    **{suffix: suffix for suffix in sorted(ALGORITHM_SUFFIXES)},
    DIFF: DIFF,
    DIFF_B: DIFF_B,
    "lora_A.weight": DOWN,
    "lora_B.weight": UP,
    "lora.down.weight": DOWN,
    "lora.up.weight": UP,
}

# Prefixes before a dotted module path, longest first: ComfyUI core training, full ComfyUI
# checkpoints, PEFT-wrapped models and diffusers pipelines.
DOTTED_PREFIXES: tuple[str, ...] = (
    "model.diffusion_model.",
    "base_model.model.",
    "diffusion_model.",
    "transformer.",
    "unet.",
)


# Text-encoder parts of a LoRA (kohya SD1.x / SDXL / SD3 / Flux, diffusers, ComfyUI's generic form).
TEXT_ENCODER_PREFIXES: tuple[str, ...] = (
    "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_",
    "text_encoder.", "text_encoder_2.", "text_encoder_3.", "text_encoders.",
)

# diffusers' attention-processor LoRA (LoRAAttnProcessor, 2023): `<attn>.processor.to_q_lora.down.weight`
# is the LoRA of `<attn>.to_q`; `to_out_lora` is that of `<attn>.to_out.0`.
_PROCESSOR_KEY = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def is_text_encoder_key(key: str) -> bool:
    return key.startswith(TEXT_ENCODER_PREFIXES)


def kohya_name(module_path: str) -> str:
    """`input_blocks.1.1.proj_in` → `lora_unet_input_blocks_1_1_proj_in`."""
    return KOHYA_UNET_PREFIX + module_path.replace(".", "_")


def split_key(key: str) -> tuple[str, str] | None:
    """Split a state-dict key into (layer name, our suffix) or None if no known suffix ends it."""
    processor = _PROCESSOR_KEY.match(key)
    if processor is not None:
        attn, proj, field = processor.groups()
        return f"{attn}.{proj}" + (".0" if proj == "to_out" else ""), DOWN if field == "down" else UP
    for suffix in sorted(SUFFIX_FIELDS, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], SUFFIX_FIELDS[suffix]
    return None
