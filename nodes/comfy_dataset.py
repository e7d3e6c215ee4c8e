"""ComfyUI glue for Encode Training Folder: ComfyUI's folders, its VAE and CLIP, its progress bar.

Imported only when the node runs. The plan and the streaming encode are training/dataset.py's; this
file gives them an encode callable (one image at a time for a video VAE, which would read a batch as
frames), the cache under the output folder, and shapes the outputs (nodes/samples.py's keys).
"""
from __future__ import annotations

import logging
from pathlib import Path

import comfy.utils
import folder_paths
import torch

from ..training.dataset import by_bucket, describe, encode_buckets, plan_folder
from ..training.images import fill_captions
from ..training.latent_cache import CACHE_FOLDER, LatentCache, weights_key
from ..training.tags import caption_variants
from .comfy_io import input_path, encode_captions
from .conditioning import with_concat_image, with_reference
from .samples import bucket_latent, variant_conditioning

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _encoder(vae):
    """pixels (B, H, W, 3) → latents (B, C, …) with ComfyUI's VAE; a video VAE one image at a time."""
    if vae is None:
        raise ValueError("vae: no VAE connected; connect the VAE output of the model's loader")
    if getattr(vae, "latent_dim", 2) == 3:
        return lambda pixels: torch.cat([vae.encode(pixels[i:i + 1]) for i in range(pixels.shape[0])])
    return vae.encode


def _cache(vae, enabled: bool) -> LatentCache | None:
    if not enabled:
        return None
    model = getattr(vae, "first_stage_model", None)
    if model is None:
        log.warning("Encode Training Folder: this VAE has no weights to key a cache by; encoding without one")
        return None
    root = Path(folder_paths.get_output_directory()) / CACHE_FOLDER
    return LatentCache(root, weights_key(model.state_dict().items()))


def _mask_root(options: dict) -> Path | None:
    """With masks = mask folder, the mask folder's path (plan_folder checks it is a folder); errors name mask_folder."""
    if options.get("masks", "none") != "mask folder":
        return None
    if not options.get("mask_folder", "").strip():
        raise ValueError("mask_folder: empty, but masks is 'mask folder'; give the input subfolder that holds the "
                         "masks (same names as the images), or set masks to none")
    return _subfolder(options, "mask_folder")


def _subfolder(options: dict, name: str) -> Path | None:
    """The input subfolder given as option `name`, or None when empty; errors name the option."""
    value = options.get(name, "").strip()
    if not value:
        return None
    try:
        return input_path(value)
    except ValueError:  # input_path's message names `images`
        raise ValueError(f"{name}: {value!r} is outside the input folder; give a subfolder of the input "
                         "folder") from None


def encode_training_folder(folder: str, vae, clip, resolution: int, options: dict) -> tuple[list, list, list, str]:
    """(one LATENT per bucket, one CONDITIONING per image, the captions, the buckets' summary)."""
    entries = plan_folder(input_path(folder), resolution, options.get("bucket_step", 64),
                          options.get("min_side", 256), options.get("max_side", 2048), options.get("masks", "none"),
                          _mask_root(options), _subfolder(options, "control_folder"))
    buckets = by_bucket(entries)
    summary = describe(buckets)
    log.info("Encode Training Folder: %s", summary)
    captions = fill_captions([e.path for b in buckets for e in b.entries],
                             [e.caption for b in buckets for e in b.entries], options.get("default_caption", ""))
    positive = conditionings(clip, captions, options)  # before the VAE: a caption problem costs no encode
    inpaint = options.get("inpaint", False)
    if inpaint and options.get("masks", "none") == "none":
        raise ValueError("inpaint: needs each image's mask (white = the region to paint); set masks to alpha channel "
                         "or mask folder, or turn inpaint off")
    cache = _cache(vae, options.get("cache", True))
    bar = comfy.utils.ProgressBar(len(entries))
    encode_buckets(buckets, _encoder(vae), dtype=DTYPES[options.get("latent_dtype", "bf16")],
                   flip=options.get("flip", False), chunk=options.get("chunk", 4), cache=cache, inpaint=inpaint,
                   progress=bar.update)
    latents = [bucket_latent(b.latents, b.flipped, b.masks, b.flipped_masks, [e.repeats for e in b.entries])
               for b in buckets]
    controls = [c[None].float() for b in buckets if b.controls is not None for c in b.controls.unbind(0)]
    if controls:  # each image's control, as ReferenceLatent sets it (edit models)
        positive = [with_reference(conditioning, control) for conditioning, control in zip(positive, controls)]
        summary += f"; {len(controls)} controls as reference latents"
    if inpaint:  # each image masked, as InpaintModelConditioning sets it (inpainting models)
        positive = [with_concat_image(conditioning, latent, mask)
                    for conditioning, (latent, mask) in zip(positive, _inpaint_inputs(buckets))]
        summary += f"; {len(positive)} inpainting images"
    encoded = sum(b.encoded for b in buckets)
    if cache is not None:
        summary += f"; {encoded} encoded, {len(entries) - encoded} from the cache"
        log.info("Encode Training Folder: %d images encoded, %d from the cache (%s)", encoded, len(entries) - encoded,
                 cache.folder)
    return latents, positive, captions, summary


def _inpaint_inputs(buckets) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each image's (masked image latent (1, C, h, w), mask (1, 1, h, w)), in the images' order; an image
    without a mask has nothing to paint (a mask of zeros)."""
    out = []
    for bucket in buckets:
        for row, entry in enumerate(bucket.entries):
            latent = bucket.inpaint[row][None].float()
            has_mask = entry.mask is not None and bucket.masks is not None
            mask = bucket.masks[row][None].float() if has_mask else torch.zeros((1, 1, *latent.shape[-2:]))
            out.append((latent, mask))
    return out


def conditionings(clip, captions: list[str], options: dict) -> list:
    """One CONDITIONING per image (its variants tagged); each distinct text encoded once. Without a CLIP, the
    `conditioning` input for every image."""
    given = options.get("conditioning")
    if (clip is None) == (given is None):
        raise ValueError("clip: connect the model's CLIP (to encode each image's caption) or a conditioning (one "
                         "for every image, e.g. an edit instruction), not both" if clip is not None else
                         "clip: not connected; connect the model's CLIP (to encode each image's caption), or a "
                         "conditioning to use for every image")
    if given is not None:
        if options.get("caption_variants", 1) > 1:
            raise ValueError("caption_variants: variants are encoded from the captions with the CLIP, but a "
                             "conditioning is connected instead; set caption_variants to 1, or connect the CLIP")
        return [list(given) for _ in captions]
    encoded: dict[str, list] = {}
    out = []
    for index, caption in enumerate(captions):
        texts = caption_variants(caption, options.get("caption_variants", 1),
                                 shuffle=options.get("shuffle_tags", False), dropout=options.get("tag_dropout", 0.0),
                                 keep_tokens=options.get("keep_tokens", 0), seed=options.get("seed", 0), index=index)
        for text in texts:
            if text not in encoded:
                encoded[text] = encode_captions(clip, [text])[0]
        out.append(variant_conditioning([encoded[t] for t in texts]))
    return out
