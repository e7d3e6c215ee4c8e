"""A LoRA file's metadata, as kohya-ss sd-scripts and ModelSpec write it, and the file formats.

Keys and value formats (all strings, as safetensors metadata must be):
- kohya-ss (`train_network.py`): `ss_network_module` ("networks.lora", or "lycoris.kohya" with
  `ss_network_args` {"algo": ...} as LyCORIS writes it), `ss_network_dim`, `ss_network_alpha`,
  `ss_steps`, `ss_base_model_version` ("sd_v1", "sd_v2", "sdxl_base_v1-0", "flux1"), `ss_v2`, and the
  training settings (training/config.py `kohya_metadata`);
- ModelSpec 1.0.1 (`modelspec.*`, as sd-scripts' `sai_model_spec.py` writes it for a LoRA):
  `sai_model_spec`, `architecture` ("stable-diffusion-v1/lora", "flux-1-dev/lora"…),
  `implementation`, `title`, `date`, `resolution`, `prediction_type`;
- ours (`lora_trainer.*`): `naming` (naming.SCHEMES), `format` (FORMATS), `settings` (the full
  TrainConfig as JSON), `difference_share`, and for a portable file what it left out.

A LORA_MODEL value that carries metadata is a `LoraStateDict`: a plain dict (so ComfyUI core's LoRA
nodes take it) with a `metadata` attribute.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping

import torch

from .algos import detect
from .algos.lora import DOWN, MID  # MID: LoCon's Tucker core (LyCORIS `use_tucker`)
from .keys import ALPHA, DIFF, DIFF_B, is_text_encoder_key, split_key
from .naming import MODULE_PATHS, Naming

# portable: only what every loader reads (no diff / diff_b); full: everything, for ComfyUI.
FORMATS = ("portable", "full")
PREFIX = "lora_trainer."


class LoraStateDict(dict):
    """{key: tensor} as a file holds it, plus the metadata its training wrote (`metadata`, str → str)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor] = (), metadata: Mapping[str, str] | None = None):
        super().__init__(tensors)
        self.metadata: dict[str, str] = dict(metadata or {})


@dataclass(frozen=True)
class BaseModel:
    """The model a LoRA is trained on, as kohya-ss (`version`) and ModelSpec (the rest) name it, and
    the naming its layers get in the file."""

    version: str
    architecture: str
    implementation: str
    resolution: str
    prediction_type: str | None = None  # epsilon / v; None for flow models (as sd-scripts writes Flux)
    naming: Naming = MODULE_PATHS

    def metadata(self) -> dict[str, str]:
        meta = {"ss_base_model_version": self.version, "ss_v2": str(self.version.startswith("sd_v2")),
                "modelspec.architecture": f"{self.architecture}/lora",
                "modelspec.implementation": self.implementation, "modelspec.resolution": self.resolution,
                PREFIX + "naming": self.naming.scheme}
        if self.prediction_type is not None:
            meta["modelspec.prediction_type"] = self.prediction_type
        return meta


# How kohya-ss and LyCORIS name the network (sd-scripts train_network.py; LyCORIS's kohya wrapper with
# its `algo` network argument; DoRA is LyCORIS's `dora_wd`).
_NETWORK_ARGS = {"loha": {"algo": "loha"}, "lokr": {"algo": "lokr"}, "dora": {"algo": "locon", "dora_wd": "True"}}


def _layer_suffixes(sd: Mapping[str, torch.Tensor]) -> dict[str, set[str]]:
    suffixes: dict[str, set[str]] = defaultdict(set)
    for key in sd:
        parts = split_key(key)
        if parts is not None and not is_text_encoder_key(key):
            suffixes[parts[0]].add(parts[1])
    return suffixes


def network_metadata(sd: Mapping[str, torch.Tensor], extra_args: Mapping[str, str] | None = None) -> dict[str, str]:
    """`ss_network_module` (and `ss_network_args`) for a state dict, as kohya/LyCORIS write them:
    "networks.lora" for LoRA, "lycoris.kohya" with {"algo": ...} for LoHa, LoKr, DoRA and Tucker LoCon
    (`lora_mid`, which kohya's own loader does not read); `extra_args`
    (kohya's conv_dim, conv_alpha, LyCORIS's factor) join the args."""
    layers = list(_layer_suffixes(sd).values())
    found = {algo.NAME for algo in (detect(frozenset(s)) for s in layers) if algo is not None}
    lycoris = sorted(found & set(_NETWORK_ARGS))
    tucker = any(MID in s for s in layers)  # kohya's networks.lora has no lora_mid
    args = dict(_NETWORK_ARGS[lycoris[0]]) if lycoris else ({"algo": "locon"} if tucker else {})
    if tucker:
        args["use_tucker"] = "True"
    args.update(extra_args or {})
    meta = {"ss_network_module": "lycoris.kohya" if "algo" in args else "networks.lora"}
    if args:
        meta["ss_network_args"] = json.dumps(args)
    return meta


def rank_and_alpha(sd: Mapping[str, torch.Tensor]) -> tuple[int, float] | None:
    """The (rank, alpha) most LoRA/DoRA layers of a file have (kohya's ss_network_dim/alpha); None if none."""
    counts: dict[tuple[int, float], int] = defaultdict(int)
    for name in _layer_suffixes(sd):
        down = sd.get(f"{name}.{DOWN}")
        if down is not None:
            alpha = sd.get(f"{name}.{ALPHA}")
            rank = down.shape[0]
            counts[(rank, float(alpha) if alpha is not None and float(alpha) else float(rank))] += 1
    return max(counts, key=counts.get) if counts else None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def file_metadata(sd: Mapping[str, torch.Tensor], steps: int | None, file_format: str,
                  trained: Mapping[str, str] | None = None, title: str | None = None) -> dict[str, str]:
    """The metadata a file of `sd` gets: what the tensors say (network, rank, alpha), ModelSpec's
    required keys, the format, the steps, and `trained` (what training wrote) over it."""
    if file_format not in FORMATS:
        raise ValueError(f"format: got {file_format!r}; choose one of {', '.join(FORMATS)}")
    now = time.time()
    meta = {"modelspec.sai_model_spec": "1.0.1", "modelspec.title": title or f"LoRA@{int(now)}",
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
            **network_metadata(sd)}
    found = rank_and_alpha(sd)
    if found is not None:
        meta["ss_network_dim"], meta["ss_network_alpha"] = str(found[0]), _number(found[1])
    meta.update(trained or {})
    meta[PREFIX + "format"] = file_format
    if steps is not None:
        meta["ss_steps"] = str(steps)
    return meta


def difference_keys(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The diff / diff_b keys (weight and bias differences), which only ComfyUI's loader reads."""
    return [k for k in sd if (parts := split_key(k)) is not None and parts[1] in (DIFF, DIFF_B)]


def portable(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the state dict without diff / diff_b, the keys left out)."""
    dropped = difference_keys(sd)
    left_out = set(dropped)
    return {k: t for k, t in sd.items() if k not in left_out}, dropped
