"""Which model family a ComfyUI model is, for the LoRA file: kohya's and ModelSpec's names, and the
layer naming kohya-ss writes for it (lora/naming.py).

Pure data and lookups on the model's `model_config` class name and prediction type, so it runs
without ComfyUI (tests pass stand-ins). Names as sd-scripts writes them: `ss_base_model_version`
from train_network.py / flux_utils.py, ModelSpec architecture and implementation from
library/sai_model_spec.py.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

from ..lora import BaseModel, Naming

IMPL_DIFFUSERS = "diffusers"
IMPL_SGM = "https://github.com/Stability-AI/generative-models"
IMPL_FLUX = "https://github.com/black-forest-labs/flux"
IMPL_COMFYUI = "https://github.com/comfyanonymous/ComfyUI"


class Family(NamedTuple):
    version: str  # kohya's ss_base_model_version
    architecture: str  # ModelSpec's, without "/lora"
    implementation: str
    resolution: str
    scheme: str  # lora/naming.py SCHEMES


# ComfyUI's supported_models class name → family. Exact names: subclasses (SSD1B, Flux2…) differ in
# shape or naming, so they are not counted as their parents.
FAMILIES: dict[str, Family] = {
    "SD15": Family("sd_v1", "stable-diffusion-v1", IMPL_DIFFUSERS, "512x512", "kohya-diffusers"),
    "SD20": Family("sd_v2", "stable-diffusion-v2-512", IMPL_DIFFUSERS, "512x512", "kohya-diffusers"),
    "SDXL": Family("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", IMPL_SGM, "1024x1024", "kohya-original"),
    "Flux": Family("flux1", "flux-1-dev", IMPL_FLUX, "1024x1024", "kohya-original"),
    "FluxSchnell": Family("flux1", "flux-1-schnell", IMPL_FLUX, "1024x1024", "kohya-original"),
    "SD3": Family("sd3", "stable-diffusion-3", IMPL_SGM, "1024x1024", "kohya-original"),
}
# ComfyUI's text-encoder class → its CLIPs that train with a LoRA, in kohya's order (lora_te1_, lora_te2_);
# a family not here refuses text_encoder_lr (nodes/comfy_text_encoder.py)
TEXT_ENCODERS: dict[str, tuple[str, ...]] = {"SD1ClipModel": ("clip_l",), "SDXLClipModel": ("clip_l", "clip_g")}
_PREDICTION = {"EPS": "epsilon", "V_PREDICTION": "v"}  # ComfyUI ModelType → ModelSpec; flow models: none


def base_model(config_class: str, model_type: str, diffusers_paths: Mapping[str, str]) -> BaseModel:
    """The BaseModel of a ComfyUI model: `config_class` its model_config class name, `model_type` its
    ModelType name, `diffusers_paths` ComfyUI's module path → diffusers module path (used where the
    family's kohya naming is diffusers'). A family not in FAMILIES keeps its module paths."""
    prediction = _PREDICTION.get(model_type)
    family = FAMILIES.get(config_class)
    if family is None:
        return BaseModel(config_class.lower(), config_class, IMPL_COMFYUI, "", prediction)
    architecture = family.architecture
    if family.version == "sd_v2" and prediction == "v":
        architecture, resolution = "stable-diffusion-v2-768-v", "768x768"
    else:
        resolution = family.resolution
    naming = Naming(family.scheme, dict(diffusers_paths) if family.scheme == "kohya-diffusers" else {})
    return BaseModel(family.version, architecture, family.implementation, resolution, prediction, naming)


# Models that take an image beside the noisy latent (ComfyUI's `concat_cond`): the node that gives it, by
# ComfyUI's model_base class name; the extra image rides in each caption's conditioning as
# `concat_latent_image` (and `concat_mask`), as ComfyUI's own nodes set it.
CONDITIONING_NODES: dict[str, str] = {
    "WAN21": "WanImageToVideo (its start_image: the clip's first frame)",
    "BaseModel": "InpaintModelConditioning (pixels: the image, mask: where to paint)",
    "Flux": "InpaintModelConditioning (pixels: the image, mask: where to fill)",
}
# Models whose plain text-to-X use is blank concat channels by design: sampling without an image gives
# them zeros, so training without one does exactly what sampling does
BLANK_CONCAT_BY_DESIGN = ("HunyuanVideo15",)


def conditioned_input_problem(model_class: str, config_class: str, extra_channels: str,
                              carried: list[bool]) -> str | None:
    """Why Train LoRA cannot train this model on these captions, or None. `model_class`: the model's
    model_base class name; `extra_channels` e.g. " (16 + 20 input channels)" ("" when the model takes no
    image beside the latent); `carried[i]`: the i-th caption entry the run uses carries `concat_latent_image`.
    """
    if not extra_channels or model_class in BLANK_CONCAT_BY_DESIGN or (carried and all(carried)):
        return None
    node = CONDITIONING_NODES.get(model_class, "the node that gives this model its image (concat_latent_image)")
    missing = "none of the captions carries" if not any(carried) else f"{carried.count(False)} captions lack"
    return (f"positive: this {config_class} model takes an image beside the noisy latent{extra_channels}, and "
            f"{missing} one, so it would train on blank images; pass the captions through {node} and connect "
            "its positive to Train LoRA's positive (with caption_dropout, its negative to the options node's "
            "unconditional)")


# Step-distilled bases (ComfyUI's model_config class → the model, as users know it): plain denoising training
# undoes their few-step sampling unless a de-distillation adapter (LoRA Training Adapter) is applied while training
STEP_DISTILLED: dict[str, str] = {
    "FluxSchnell": "Flux.1 schnell",
    "ZImage": "Z-Image Turbo, if this is Turbo (ComfyUI loads the undistilled Z-Image base as the same class)",
}


def distilled_note(config_class: str, adapter: str | None) -> str | None:
    """What the log tells a user training a step-distilled base (None for any other base)."""
    name = STEP_DISTILLED.get(config_class)
    if name is None:
        return None
    if adapter is not None:
        return (f"Train LoRA: {name} is step-distilled; the training adapter {adapter!r} keeps the objective it "
                "was distilled away from while training, and the LoRA is saved and previewed without it")
    return (f"Train LoRA: {name} is step-distilled and trains here without a training adapter: each step pulls "
            "it back toward plain denoising, so expect its few-step samples to lose sharpness and colour as "
            "training goes on (sample with more steps and cfg to judge the LoRA), and a LoRA that works less well "
            "on the distilled base; a de-distillation LoRA in LoRA Training Adapter avoids this")
