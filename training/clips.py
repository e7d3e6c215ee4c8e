"""A folder of video clips → what image-to-video training needs of each: the frames (fitted to the clip's
bucket), its caption, and its start image, the clip's own first frame or a still image of the same name.

`plan_clips` lists the clips with their captions and start images; the frames are read by the host (a
ComfyUI video decoder: training/ never decodes video itself). `clip_frames` keeps a count of frames a
Wan VAE takes (4k + 1) and fits each to the clip's bucket (cover-resize, centre crop, as images);
`start_video` and `start_mask` give the image-to-video input by WanImageToVideo's rules: the start image
then grey frames, encoded by the host's VAE, and a mask over the latent frames, 0 on the given first
frame, 1 on the frames to generate. No ComfyUI import, so it tests offline.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from .buckets import fit_to_bucket
from .images import list_images, read_caption

CLIP_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
START_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # a still start image beside a clip
TIME_STRIDE = 4  # a Wan VAE: latent frame 0 is pixel frame 0, then one latent frame per 4 pixel frames


class Clip(NamedTuple):
    path: Path
    caption: str  # "" where it has no caption file
    start: Path | None  # a still image of the same name beside it, or None: its own first frame


def plan_clips(folder: str | Path) -> list[Clip]:
    """Every clip under `folder` (sorted; hidden files and __MACOSX skipped) with its caption and start image."""
    root = Path(folder)
    try:
        found = list_images(root, CLIP_SUFFIXES)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    if not found:
        raise ValueError(f"folder: {root} holds no clips ({', '.join(CLIP_SUFFIXES)}); add some or pick another")
    return [Clip(path, read_caption(path), _start_image(path)) for path in found]


def _start_image(clip: Path) -> Path | None:
    for suffix in START_SUFFIXES + tuple(s.upper() for s in START_SUFFIXES):
        candidate = clip.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def usable_frames(available: int, frames: int) -> int:
    """How many of a clip's `available` frames train: at most `frames`, a count a Wan VAE takes (4k + 1)."""
    count = min(available, frames)
    return count - (count - 1) % TIME_STRIDE if count >= 1 else 0


def clip_frames(frames: np.ndarray | torch.Tensor, count: int, bucket: tuple[int, int]) -> np.ndarray:
    """The first `count` of `frames` ((T, H, W, 3), values in [0, 1]) fitted to `bucket` (width, height):
    (count, h, w, 3) float32 in [0, 1], each frame through 8-bit pixels as a still image would be."""
    frames = np.asarray(frames[:count], dtype=np.float32)
    pixels = np.clip(np.round(frames * 255), 0, 255).astype(np.uint8)
    fitted = [np.asarray(fit_to_bucket(Image.fromarray(frame), bucket), dtype=np.uint8) for frame in pixels]
    return np.divide(np.stack(fitted), 255.0, dtype=np.float32)


def start_video(start: np.ndarray, count: int) -> np.ndarray:
    """WanImageToVideo's input: `start` ((h, w, 3) in [0, 1]) as the first frame, then grey (0.5): (count, h, w, 3)."""
    video = np.full((count, *start.shape), 0.5, dtype=np.float32)
    video[0] = start
    return video


def start_mask(latent_shape: Sequence[int]) -> torch.Tensor:
    """(1, 1, T, h, w) for latents (C, T, h, w): 0 on the first latent frame (given), 1 on the rest."""
    mask = torch.ones((1, 1, *latent_shape[1:]))
    mask[:, :, :1] = 0.0
    return mask
