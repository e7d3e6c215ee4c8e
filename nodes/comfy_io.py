"""ComfyUI glue for the small nodes: saving LoRAs, applying them, the loss graph, image sets.

Imported only when a node runs. Files go to ComfyUI's output folder via `folder_paths`, written
atomically with ComfyUI's output permissions (lora/files.py); prefixes follow nodes/paths.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

import comfy.sd
import folder_paths
import numpy as np
import torch
from PIL import Image

from ..lora import save_lora_file, split_text_encoder
from ..lora.files import steps_name, write_atomically
from ..lora.metadata import expert_stem, output_name
from ..training.images import ImageSet, load_image_folder, load_images
from ..training.plot import plot_losses
from .conditioning import with_caption
from .lora_file import file_contents
from .paths import PrefixInput, next_free, output_target
from .loss_map import validation_points


log = logging.getLogger(__name__)

SAVE_LORA_PREFIX = PrefixInput("prefix", "ComfyUI_trained_lora", "loras/my_lora")
PLOT_PREFIX = PrefixInput("filename_prefix", "loss_graph", "loss_graphs/my_run")


def _output_dir() -> Path:
    return Path(folder_paths.get_output_directory()).resolve()


def save_lora(lora: dict, prefix: str, steps: int | None, file_format: str = "portable") -> list[str]:
    """`<prefix>_<steps>_steps_<counter>_.safetensors` (or without steps), the prefix followed by the expert a
    LoRA is for (`_high_noise`, `_low_noise`: lora/metadata.py `expert_stem`); one file per expert of a LoRA
    that carries several (ExpertLoras: Train LoRA's high_noise_model). Returns the relative paths."""
    if not isinstance(lora, dict) or not lora:
        raise ValueError("lora: got no LoRA weights; connect the lora output of Train LoRA")
    names = []
    for part in list(getattr(lora, "experts", {}).values()) or [lora]:
        sd, metadata = file_contents(part, steps, file_format)
        folder, stem = output_target(_output_dir(), prefix, SAVE_LORA_PREFIX)
        stem = expert_stem(stem, metadata)
        path = next_free(folder, lambda n, stem=stem: steps_name(stem, steps, n))
        metadata.update(output_name(stem))  # ss_output_name and modelspec.title
        save_lora_file(path, sd, metadata)
        names.append(path.relative_to(_output_dir()).as_posix())
    return names


def apply_lora(model, lora: dict, strength: float, clip=None, strength_clip: float = 1.0) -> tuple:
    """(model, clip) with ComfyUI's normal LoRA patching on clones: the diffusion-model part on the model, the
    text-encoder part (`lora_te_…`) on the CLIP; strength 0 passes either through."""
    unet, text_encoder = split_text_encoder(lora)
    if text_encoder and clip is None:
        log.warning("Load LoRA Model: the LoRA has %d text-encoder tensors but no clip is connected; connect the "
                    "CLIP to apply them", len(text_encoder))
    if strength != 0:
        model, _ = comfy.sd.load_lora_for_models(model, None, unet, strength, 0)
    if clip is not None and text_encoder and strength_clip != 0:
        _, clip = comfy.sd.load_lora_for_models(None, clip, text_encoder, 0, strength_clip)
    return model, clip


def save_loss_graph(loss: dict, prefix: str) -> tuple[torch.Tensor, dict]:
    """Draw the graph (with the validation line when the LOSS_MAP has one), save it as PNG in the output
    folder; (IMAGE tensor, UI preview entry)."""
    values = loss.get("loss") if isinstance(loss, dict) else None
    if not values:
        raise ValueError("loss: no loss values; connect the loss output of Train LoRA")
    pixels = plot_losses([float(v) for v in values], validation=validation_points(loss))
    folder, stem = output_target(_output_dir(), prefix, PLOT_PREFIX)
    path = next_free(folder, lambda n: f"{stem}_{n:05}_.png")
    write_atomically(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"), "loss graph")
    subfolder = path.parent.relative_to(_output_dir()).as_posix()
    entry = {"filename": path.name, "subfolder": "" if subfolder == "." else subfolder, "type": "output"}
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)[None], entry


def input_path(name: str) -> Path:
    root = Path(folder_paths.get_input_directory()).resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise ValueError(f"images: {name!r} is outside the input folder; pick files from the input folder")
    return path


def load_input_images(names: list[str], resize_method: str, width: int, height: int) -> torch.Tensor:
    paths = [input_path(n) for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"images: {', '.join(missing)} not found; upload the file or fix the name")
    return load_images(paths, resize_method, width, height)


def load_input_folder(folder: str, resize_method: str, width: int, height: int) -> ImageSet:
    return load_image_folder(input_path(folder), resize_method, width, height)


def encode_captions(clip, captions: list[str]) -> list:
    """One CONDITIONING per caption (the same encoding CLIPTextEncode does), each entry marked with its text
    (a trained text encoder encodes it again: nodes/conditioning.py `with_caption`)."""
    if clip is None:
        raise ValueError("clip: no text encoder connected; connect the CLIP output of a checkpoint loader")
    out = []
    for caption in captions:
        tokens = clip.tokenize(caption)
        out.append(with_caption(clip.encode_from_tokens_scheduled(tokens), caption))
    return out
