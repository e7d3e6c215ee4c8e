"""LoRA state dicts and files: our kohya-style layout out (layer names by naming.py), every layout of
`keys.py` in.

The in-memory LoRA (what the LORA_MODEL output carries) is the same `{key: tensor}` dict a file holds
(metadata.LoraStateDict), so ComfyUI core's LoRA nodes accept ours. Files are safetensors with string
metadata (metadata.py), written to a temp file and moved into place.
"""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .files import steps_in_name, write_atomically
from .algos import ALGORITHMS, detect
from .algos.lora import DOWN, UP
from .keys import ALPHA, DIFF, DIFF_B, DOTTED_PREFIXES, KOHYA_UNET_PREFIX, is_text_encoder_key, kohya_name, split_key
from .naming import MODULE_PATHS, Naming
from .layers import LayerWeights, layer_shape

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def to_state_dict(weights: Mapping[str, LayerWeights], dtype: torch.dtype,
                  naming: Naming = MODULE_PATHS) -> dict[str, torch.Tensor]:
    """module path → LayerWeights into kohya keys (layer names by `naming`); tensors in `dtype` on CPU,
    alpha a float32 scalar."""
    sd = {}
    for path, w in weights.items():
        name = naming.name(path)
        for suffix, tensor in w.tensors.items():
            if suffix == ALPHA:
                sd[f"{name}.{ALPHA}"] = torch.tensor(float(tensor), dtype=torch.float32)
            else:
                sd[f"{name}.{suffix}"] = _cpu(tensor, dtype)
    return sd


def _cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to("cpu", dtype).contiguous()


_LAYOUTS = ("kohya (lora_down/lora_up/alpha/diff/diff_b), LyCORIS (hada_w1_a…, lokr_w1…, dora_scale), PEFT/diffusers (lora_A/lora_B, lora.down/lora.up) "
            "and diffusers' attention processors (processor.to_q_lora.down)")
_OTHER_MODEL = ("this LoRA was likely trained for another base model (for example an SDXL LoRA on an SD1.x "
                "model); pick a LoRA made for this model, or train a new one")


def resolve_state_dict(
    sd: Mapping[str, torch.Tensor], model: nn.Module, aliases: Mapping[str, str] | None = None,
    label: str | None = None,
) -> dict[str, LayerWeights]:
    """Any supported layout → module path → LayerWeights, checked against `model`'s layers.

    `aliases` maps foreign module names (e.g. diffusers') to the model's module paths. Raises
    ValueError naming the key for an unknown layout or layer, and the key, layer and both shapes for
    a tensor that does not fit; with `label` (the input, e.g. "existing_lora: x.safetensors") the
    message starts with it, and a LoRA that fits no layer or the wrong shapes gets the likely cause.
    """
    try:
        return _resolve(sd, model, aliases or {})
    except _NotThisModel as err:
        raise ValueError(f"{label}: {err}; {_OTHER_MODEL}" if label else str(err)) from None
    except ValueError as err:
        raise ValueError(f"{label}: {err}" if label else str(err)) from None


class _NotThisModel(ValueError):
    """A LoRA tensor with no layer of this name or shape: most likely a LoRA for another model."""


def _resolve(sd: Mapping[str, torch.Tensor], model: nn.Module, aliases: Mapping[str, str]) -> dict[str, LayerWeights]:
    modules = dict(model.named_modules())
    by_kohya = {kohya_name(p): p for p in modules if p}
    fields: dict[str, dict[str, object]] = defaultdict(dict)
    for key, tensor in sd.items():
        parts = split_key(key)
        if parts is None:
            raise ValueError(f"LoRA key {key!r}: not a LoRA tensor this pack can read; it reads {_LAYOUTS}")
        path = _module_path(parts[0], modules, by_kohya, aliases)
        if path is None:
            raise _NotThisModel(f"LoRA key {key!r}: matches no layer of the model")
        fields[path][parts[1]] = tensor
        fields[path].setdefault("_keys", {})[parts[1]] = key
    return {path: _checked(path, modules[path], f) for path, f in fields.items()}


def _module_path(name: str, modules: Mapping[str, nn.Module], by_kohya: Mapping[str, str],
                 aliases: Mapping[str, str]) -> str | None:
    if name in aliases:
        return aliases[name] if aliases[name] in modules else None
    if name.startswith(KOHYA_UNET_PREFIX):
        return by_kohya.get(name)
    for prefix in DOTTED_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    name = aliases.get(name, name)
    return name if name in modules and name else None


def _checked(path: str, module: nn.Module, f: dict[str, object]) -> LayerWeights:
    keys = f.pop("_keys")
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)

    def fail(field: str, got: torch.Size, need: object) -> ValueError:
        return _NotThisModel(f"LoRA key {keys[field]!r} does not fit layer {path!r}: "
                             f"the file has shape {tuple(got)}, the layer needs {need}")

    algo = detect(frozenset(f))
    if algo is not None:
        _check_algorithm(algo, path, module, f, keys, fail)
    diff, diff_b = f.get(DIFF), f.get(DIFF_B)
    if diff is not None and (weight is None or diff.shape != weight.shape):
        raise fail(DIFF, diff.shape, tuple(weight.shape) if weight is not None else "no weight")
    if diff_b is not None and (bias is None or diff_b.shape != bias.shape):
        raise fail(DIFF_B, diff_b.shape, tuple(bias.shape) if bias is not None else "no bias")
    order = [*(algo.SUFFIXES if algo is not None else (ALPHA,)), DIFF, DIFF_B]
    return LayerWeights(algo.NAME if algo is not None else None, {s: f[s] for s in order if s in f})


def _check_algorithm(algo, path: str, module: nn.Module, f: dict, keys: dict, fail) -> None:
    """The layer's keys are one algorithm's, complete, and fit the layer (the algorithm checks shapes)."""
    if DOWN in algo.SUFFIXES and (DOWN in f) != (UP in f):
        missing, present = ("up", DOWN) if UP not in f else ("down", UP)
        raise ValueError(f"LoRA key {keys[present]!r}: layer {path!r} has no matching lora_{missing} tensor")
    stray = sorted(set(f) - set(algo.SUFFIXES) - {DIFF, DIFF_B})
    if stray:
        other = next((a.NAME for a in ALGORITHMS.values() if stray[0] in a.SUFFIXES), "another algorithm")
        first = next(s for s in algo.SUFFIXES if s in f)
        raise ValueError(f"layer {path!r} mixes two algorithms in one layer: {algo.NAME} ({keys[first]!r}) and "
                         f"{other} ({keys[stray[0]]!r}); a layer holds one algorithm's keys, so the file is damaged "
                         "or two LoRAs were merged wrongly; pick another file")
    shape = layer_shape(module) if isinstance(getattr(module, "weight", None), torch.Tensor) else None
    first = next(s for s in algo.SUFFIXES if s in f and s != ALPHA)
    if shape is None:
        raise fail(first, f[first].shape, f"no {algo.NAME} ({type(module).__name__} takes a weight difference)")
    algo.check(shape, f, fail)


def save_lora_file(path: str | os.PathLike, sd: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> Path:
    """Write atomically with ComfyUI's output permissions (files.py); never overwrites a file."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tensors = {k: t.contiguous() for k, t in sd.items()}
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta), "LoRA")


def load_lora_file(path: str | os.PathLike, label: str = "existing_lora") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a .safetensors LoRA. Errors name `label` (the input) and the path:
    FileNotFoundError if missing, ValueError if empty, not safetensors, or holding NaN/inf values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{label}: {path} does not exist; pick a file from the list")
    if path.stat().st_size == 0:
        raise ValueError(f"{label}: {path} is empty (0 bytes), not a readable safetensors file, e.g. from an "
                         "interrupted download; download or save it again, or pick another file")
    try:
        with safe_open(str(path), framework="pt") as f:
            sd, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{label}: {path} is not a readable safetensors file ({err}); it may be damaged or "
                         "incomplete: download or save it again, or pick another file") from err
    bad = next((k for k, t in sd.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise ValueError(f"{label}: {path} holds NaN/inf values (first in {bad!r}), e.g. from a run whose loss "
                         "diverged; continue from an earlier save or train from scratch")
    return sd, metadata


def split_text_encoder(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(diffusion-model part, text-encoder part) of a state dict; keys.TEXT_ENCODER_PREFIXES decide."""
    unet = {k: t for k, t in sd.items() if not is_text_encoder_key(k)}
    return unet, {k: t for k, t in sd.items() if is_text_encoder_key(k)}


def parse_steps(filename: str) -> int:
    """`…_<N>_steps_…` → N (files.steps_in_name); any other name → 0, with a warning."""
    steps = steps_in_name(filename)
    if steps is None:
        log.warning("could not read a step count from %r; counting its earlier steps as 0", filename)
        return 0
    return steps
