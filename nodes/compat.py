"""ComfyUI's interfaces that changed between the versions the pack runs on, in one place, with no ComfyUI
import (the callers pass ComfyUI's modules in), so the fallbacks test offline against stand-ins of the
older and newer interfaces (tests/test_compat.py).

- `comfy.model_management.intermediate_dtype()` (newer; before it, intermediates were fp32);
- `comfy.sample.fix_empty_latent_channels(model, latent, downscale_ratio_spacial=None, …)` (newer; before
  it took only the model and the latent and fitted the channels, not the spatial scale);
- `latent_preview.Latent2RGBPreviewer(factors, bias, reshape)` and the latent formats'
  `latent_rgb_factors_reshape` (newer; before, factors and bias only);
- `comfy.sampler_helpers.prepare_sampling(..., force_offload=)` (ComfyUI 0.14.0, the partial load the
  options' `offload` asks for): no fallback; `partial_load_problem` words the error, naming the version.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch


def intermediate_dtype(model_management: Any) -> torch.dtype:
    """The dtype ComfyUI keeps intermediates in: its `intermediate_dtype()`, fp32 where it has none."""
    found = getattr(model_management, "intermediate_dtype", None)
    return found() if callable(found) else torch.float32


def fitted_empty_latent(sample: Any, patcher: Any, empty: torch.Tensor, downscale: int) -> torch.Tensor:
    """An empty latent at 1/`downscale` of the pixels fitted to the model's latent format, as core's
    EmptyLatentImage → KSampler does: `fix_empty_latent_channels` with the downscale where it takes one; an
    older one, which takes (model, latent), fits the channels only (its models all have 1/8 latents)."""
    fix = sample.fix_empty_latent_channels
    return fix(patcher, empty, downscale) if _parameters(fix) >= 3 else fix(patcher, empty)


def latent_rgb_previewer(latent_preview: Any, latent_format: Any) -> Any:
    """ComfyUI's latent-to-RGB previewer for `latent_format`: with the factors' reshape where the previewer
    takes one (newer ComfyUI), else with the factors and bias alone."""
    args = [latent_format.latent_rgb_factors, getattr(latent_format, "latent_rgb_factors_bias", None)]
    if _parameters(latent_preview.Latent2RGBPreviewer) >= 3:
        args.append(getattr(latent_format, "latent_rgb_factors_reshape", None))
    return latent_preview.Latent2RGBPreviewer(*args)


def _parameters(function: Any) -> int:
    """How many parameters a callable takes (a class: its __init__'s, without self); 99 when not told."""
    try:
        return len(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return 99


PARTIAL_LOAD_VERSION = "0.14.0"  # the first release whose prepare_sampling takes force_offload


def partial_load_problem(sampler_helpers: Any, version: str | None) -> str | None:
    """Why `offload` cannot run on this ComfyUI (`version`: its __version__, None where unknown), or None."""
    if "force_offload" in inspect.signature(sampler_helpers.prepare_sampling).parameters:
        return None
    this = f"this is ComfyUI {version}" if version else "this ComfyUI is older"
    return (f"offload: needs ComfyUI {PARTIAL_LOAD_VERSION} or newer ({this}), whose sampler loads a model partially "
            "for training; update ComfyUI, or turn offload off on LoRA Options: Optimizer & Memory")


def comfyui_version() -> str | None:
    """The running ComfyUI's version (its comfyui_version.py), or None where it has none."""
    try:
        from comfyui_version import __version__  # ComfyUI's root is on sys.path while it runs
    except ImportError:
        return None
    return str(__version__)
