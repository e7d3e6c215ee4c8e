"""ComfyUI glue for the small nodes: saving LoRAs, applying them, the loss graph, image sets.

Imported only when a node runs. Files go to ComfyUI's output folder via `folder_paths`, written
atomically with ComfyUI's output permissions (lora/files.py); prefixes follow nodes/paths.py.
"""
from __future__ import annotations

from pathlib import Path

import comfy.sd
import folder_paths
import numpy as np
import torch
from PIL import Image

from ..lora import save_lora_file, split_text_encoder
from ..lora.files import steps_name, write_atomically
from ..lora.metadata import output_name
from ..training.images import ImageSet, load_image_folder, load_images
from ..training.plot import plot_losses
from .lora_file import file_contents
from .paths import PrefixInput, next_free, output_target
from .loss_map import validation_points


SAVE_LORA_PREFIX = PrefixInput("prefix", "ComfyUI_trained_lora", "loras/my_lora")
PLOT_PREFIX = PrefixInput("filename_prefix", "loss_graph", "loss_graphs/my_run")


def _output_dir() -> Path:
    return Path(folder_paths.get_output_directory()).resolve()


def save_lora(lora: dict, prefix: str, steps: int | None, file_format: str = "portable") -> str:
    """`<prefix>_<steps>_steps_<counter>_.safetensors` (or without steps); returns the relative path."""
    if not isinstance(lora, dict) or not lora:
        raise ValueError("lora: got no LoRA weights; connect the lora output of Train LoRA")
    sd, metadata = file_contents(lora, steps, file_format)
    folder, stem = output_target(_output_dir(), prefix, SAVE_LORA_PREFIX)
    path = next_free(folder, lambda n: steps_name(stem, steps, n))
    metadata.update(output_name(stem))  # ss_output_name and modelspec.title
    save_lora_file(path, sd, metadata)
    return path.relative_to(_output_dir()).as_posix()


def apply_lora(model, lora: dict, strength: float):
    """ComfyUI's normal LoRA patching on a clone; strength 0 passes the model through."""
    if strength == 0:
        return model
    unet, _ = split_text_encoder(lora)  # a text-encoder part (kept from a continued kohya LoRA) needs a CLIP
    patched, _ = comfy.sd.load_lora_for_models(model, None, unet, strength, 0)
    return patched


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
    """One CONDITIONING per caption (the same encoding CLIPTextEncode does)."""
    if clip is None:
        raise ValueError("clip: no text encoder connected; connect the CLIP output of a checkpoint loader")
    out = []
    for caption in captions:
        tokens = clip.tokenize(caption)
        out.append(clip.encode_from_tokens_scheduled(tokens))
    return out
