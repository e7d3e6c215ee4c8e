"""The on-disk latent cache: one image's latent, keyed by what it depends on, so a second run (or a run
with other settings) skips the VAE.

A latent depends on the image file's content (its sha256, not its name or date: a changed image
re-encodes, a renamed one does not), the VAE (`vae_key`: a hash of its weights, made by the host),
the bucket it was fitted to, and whether it is the flipped copy. Each is one small safetensors file
`<folder>/<vae_key>/<content>_<width>x<height>[_flip].safetensors` holding the latent as the VAE gave
it (fp32), so any storage dtype reuses it. Files are written atomically; an unreadable one is
re-encoded and replaced. The folder lives under ComfyUI's output folder, never beside the images.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..lora.files import write_atomically

CACHE_FOLDER = "lora_trainer_cache/latents"  # under ComfyUI's output folder
_TENSOR = "latent"

log = logging.getLogger(__name__)


def weights_key(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A short hash of named weights (a VAE's state dict): names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


class LatentCache:
    """Single latents (C, h, w) under `root`/`vae_key`; counts what it served (`hits`) and wrote (`writes`)."""

    def __init__(self, root: str | Path, vae_key: str):
        self.folder = Path(root) / vae_key
        self.hits = self.writes = 0

    def path(self, digest: str, size: tuple[int, int], flipped: bool) -> Path:
        return self.folder / f"{digest}_{size[0]}x{size[1]}{'_flip' if flipped else ''}.safetensors"

    def get(self, digest: str, size: tuple[int, int], flipped: bool) -> torch.Tensor | None:
        path = self.path(digest, size, flipped)
        if not path.is_file():
            return None
        try:
            latent = load_file(str(path))[_TENSOR]
        except (SafetensorError, OSError, KeyError) as err:
            log.warning("latent cache: %s cannot be read (%s); encoding the image again", path, err)
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return latent

    def put(self, digest: str, size: tuple[int, int], flipped: bool, latent: torch.Tensor) -> None:
        path = self.path(digest, size, flipped)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: save_file({_TENSOR: latent.float().contiguous()}, tmp), "cached latent",
                         overwrite=True)
        self.writes += 1
