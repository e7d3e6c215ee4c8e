"""The pretrained tiny base that ships with the pack: where it lives, how it loads, how it is checked.

Owns `assets/tiny_base.safetensors` as read: the weights of a `TinyDenoiser` (eps schedule) trained
from scratch by `pretrain.py` on its procedural pictures, with that script's settings in the file's
metadata. `build_tiny()` stays the random-weight model the tests use; `load_pretrained()` is the
demo's base. The file's metadata keys are listed in `METADATA_KEYS`; `weights_digest` is the hash a
rerun of the pretraining must reproduce.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .model import TinyConfig, TinyDenoiser, TinyDiffusion
from .schedules import make_schedule

BASE_FILE = Path(__file__).resolve().parent.parent / "assets" / "tiny_base.safetensors"
FORMAT = "comfyui-lora-trainer-tiny-base"
GUIDANCE = 3.0  # classifier-free guidance for the base's samples: it was pretrained with caption dropout for it
METADATA_KEYS = ("format", "settings", "settings_sha256", "source_sha256", "weights_sha256", "steps",
                 "final_loss", "seconds", "torch")


def settings_digest(settings_json: str) -> str:
    """SHA-256 (hex) of the settings JSON exactly as stored."""
    return hashlib.sha256(settings_json.encode("utf-8")).hexdigest()


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over every tensor's name, dtype, shape and bytes, in name order: equal for
    bit-identical weights, whatever the file's metadata or layout."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode("utf-8"))
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_metadata(path: Path = BASE_FILE) -> dict[str, str]:
    """The file's string metadata (`METADATA_KEYS`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"tiny base: no file at {path}; run `bash scripts/pretrain.sh` to make it")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"tiny base {path}: format {metadata.get('format')!r}, expected {FORMAT!r}; "
                         f"give a file written by tiny/pretrain.py")
    return metadata


def base_config(settings: dict) -> TinyConfig:
    """The TinyConfig that the pretraining settings (as a dict, as stored in the file) describe."""
    return TinyConfig(width=settings["width"], outer_self_attention=settings["outer_self_attention"],
                      text_positions=settings["text_positions"])


def load_pretrained(path: Path = BASE_FILE) -> TinyDiffusion:
    """The pretrained tiny model (eps), frozen and in eval mode, shaped by the file's settings."""
    net = TinyDenoiser(base_config(json.loads(read_metadata(path)["settings"])))
    net.load_state_dict(load_file(str(path)))
    net.eval().requires_grad_(False)
    return TinyDiffusion(net, make_schedule("eps"))
