"""ComfyUI glue for Encode Training Clips: ComfyUI's video decoder (PyAV), its VAE and CLIP, its folders
and progress bar around training/clips.py.

Imported only when the node runs. Each clip is decoded, its first `frames` (4k + 1) fitted to its aspect
bucket and VAE-encoded whole (a Wan VAE is causal in time); with `image_to_video`, its start image (its
own first frame, or a still image of the same name) goes through WanImageToVideo's rule: the start image
then grey frames, encoded, as `concat_latent_image`, with the mask of the frames to generate.
"""
from __future__ import annotations

import logging
from collections import Counter

import comfy.utils
import numpy as np
import torch
from comfy_api.latest import InputImpl
from PIL import Image

from ..training.buckets import bucket_for, fit_to_bucket
from ..training.clips import clip_frames, plan_clips, start_mask, start_video, usable_frames
from ..training.images import fill_captions
from .comfy_dataset import DTYPES, conditionings
from .comfy_io import input_path
from .conditioning import with_concat_image

log = logging.getLogger(__name__)


def _video_vae(vae):
    if vae is None:
        raise ValueError("vae: no VAE connected; connect the video model's VAE (e.g. Wan 2.1's, from VAELoader)")
    if getattr(vae, "latent_dim", 2) != 3:
        raise ValueError(f"vae: {type(getattr(vae, 'first_stage_model', vae)).__name__} is an image VAE; clips need "
                         "the video model's VAE (e.g. Wan 2.1's wan_2.1_vae from VAELoader)")
    return vae


def encode_training_clips(folder: str, vae, clip, resolution: int, options: dict) -> tuple[list, list, list, str]:
    """(one LATENT per clip, one CONDITIONING per clip, the captions, a summary line)."""
    vae = _video_vae(vae)
    clips = plan_clips(input_path(folder))
    captions = fill_captions([c.path for c in clips], [c.caption for c in clips], options.get("default_caption", ""))
    positive = conditionings(clip, captions, options)  # before the VAE: a caption problem costs no decode
    frames_wanted, i2v = options.get("frames", 33), options.get("image_to_video", True)
    dtype = DTYPES[options.get("latent_dtype", "bf16")]
    bar = comfy.utils.ProgressBar(len(clips))
    latents, shapes = [], Counter()
    for index, item in enumerate(clips):
        frames = InputImpl.VideoFromFile(str(item.path)).get_components().images  # (T, H, W, 3) in [0, 1]
        count = usable_frames(frames.shape[0], frames_wanted)
        if count < 1:
            raise ValueError(f"folder: {item.path.name} has no frames to read; remove or re-save it")
        bucket = bucket_for(frames.shape[2], frames.shape[1], resolution, options.get("bucket_step", 16),
                            options.get("min_side", 256), options.get("max_side", 2048))
        fitted = clip_frames(frames, count, bucket)
        del frames
        with torch.no_grad():
            latent = vae.encode(torch.from_numpy(fitted)).float().cpu()  # (1, C, T', h, w)
            if i2v:
                start = fitted[0] if item.start is None else _still(item.start, bucket)
                concat = vae.encode(torch.from_numpy(start_video(start, count))).float().cpu()
                positive[index] = with_concat_image(positive[index], concat, start_mask(latent.shape[1:]))
        latents.append({"samples": latent.to(dtype)})
        shapes[f"{bucket[0]}×{bucket[1]}×{count}"] += 1
        bar.update(1)
    starts = sum(c.start is not None for c in clips)
    summary = (f"{len(clips)} clip{'s' if len(clips) != 1 else ''} ("
               + ", ".join(f"{shape}: {n}" for shape, n in shapes.items()) + ")"
               + (f"; start frames set ({starts} from image files)" if i2v else ""))
    log.info("Encode Training Clips: %s", summary)
    return latents, positive, captions, summary


def _still(path, bucket: tuple[int, int]) -> np.ndarray:
    """A start image file fitted to the clip's bucket: (h, w, 3) float32 in [0, 1]."""
    with Image.open(path) as img:
        return np.divide(np.asarray(fit_to_bucket(img.convert("RGB"), bucket)), 255.0, dtype=np.float32)
