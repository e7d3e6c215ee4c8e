"""A folder of any sizes and shapes → training-ready latents, bucket by bucket, in bounded memory.

`plan_folder` reads only each image's header (its size after EXIF orientation) and caption, and gives
every file its aspect-ratio bucket (training/buckets.py), its kohya repeat count and its mask source.
`encode_buckets` then reads, fits and encodes the images a few at a time (`chunk`), and keeps only
the latents, in the storage dtype, each bucket's in one tensor allocated once: peak memory is the
latents plus one chunk of pixels, never the whole set's pixels. A flipped copy (augmentation) is
encoded beside each image. Masks (white = train) come from the alpha channel or a same-named file
in a mask folder (kohya's convention), are fitted to the bucket like the image, and kept at the
latent's size. A control folder pairs each image with a partner of the same relative name (an edit
model's reference image), fitted to the image's bucket and encoded beside it (`Bucket.controls`). A
`LatentCache` (training/latent_cache.py) skips the encode of an image whose file, VAE and bucket it has
seen. No ComfyUI import: the encode is a callable, so this tests offline.
"""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import bucket_for, fit_to_bucket
from .data import latent_mask
from .images import IMAGE_SUFFIXES, list_images, open_rgb, read_caption, repeats_of

MASK_SOURCES = ("none", "alpha channel", "mask folder")
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the image a quarter
_EXIF_ORIENTATION = 0x0112

log = logging.getLogger(__name__)

Encode = Callable[[torch.Tensor], torch.Tensor]  # pixels (B, H, W, 3) in [0, 1] → latents (B, C, h, w)


class Entry(NamedTuple):
    """One image file of the set: where it goes and what comes with it."""

    path: Path
    bucket: tuple[int, int]  # (width, height) in pixels
    caption: str  # "" where it has no caption file
    repeats: int  # kohya `<N>_<name>` folder count
    mask: Path | str | None  # a mask file, "alpha", or None
    control: Path | None = None  # its partner in the control folder (fitted to the same bucket)


@dataclass
class Bucket:
    """The latents of one bucket: row i is `entries[i]`'s image (`flipped[i]` its mirror image)."""

    size: tuple[int, int]
    entries: list[Entry]
    latents: torch.Tensor | None = None  # (n, C, h, w) in the storage dtype
    flipped: torch.Tensor | None = None
    masks: torch.Tensor | None = None  # (n, 1, h, w) float16, 1 = train
    flipped_masks: torch.Tensor | None = None
    controls: torch.Tensor | None = None  # (n, C, h, w): each image's partner, encoded at the image's bucket
    inpaint: torch.Tensor | None = None  # (n, C, h, w): each image with its masked region grey, encoded
    encoded: int = 0  # images the VAE encoded (the rest came from the cache)


def oriented_size(path: Path | IO[bytes]) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the file's header (no pixels decoded)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION) in _SWAPPED_ORIENTATIONS:
                return height, width
            return width, height
    except (OSError, ValueError) as err:
        raise ValueError(f"image {path}: cannot be read ({err}); remove or re-save the file") from err


def has_alpha(path: Path) -> bool:
    with Image.open(path) as img:
        return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def partner_file(image: Path, root: Path, other_root: Path) -> Path | None:
    """The partner of `image` (its mask, its control): the file of the same relative path and name (any image
    suffix) under `other_root`."""
    stem = other_root / image.relative_to(root).with_suffix("")
    for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
        candidate = stem.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def plan_folder(folder: str | Path, resolution: int, step: int, min_side: int, max_side: int,
                masks: str = "none", mask_root: str | Path | None = None,
                control_root: str | Path | None = None) -> list[Entry]:
    """Every image under `folder` with its bucket, caption, repeats, mask and (with `control_root`) its
    control partner; ValueError naming the input."""
    if masks not in MASK_SOURCES:
        raise ValueError(f"masks: got {masks!r}; choose one of {', '.join(MASK_SOURCES)}")
    root = Path(folder)
    files = list_images(root)
    if not files:
        raise ValueError(f"folder: {root} holds no images ({', '.join(IMAGE_SUFFIXES)}; hidden files and __MACOSX "
                         "are skipped); add some or pick another")
    if masks == "mask folder" and (mask_root is None or not Path(mask_root).is_dir()):
        raise ValueError(f"mask_folder: {mask_root} is not a folder; give the input subfolder that holds the masks "
                         "(same names as the images), or set masks to none")
    if control_root is not None and not Path(control_root).is_dir():
        raise ValueError(f"control_folder: {control_root} is not a folder; give the input subfolder that holds each "
                         "image's control (same names as the images), or leave it empty")
    entries = []
    for path in files:
        width, height = oriented_size(path)
        mask: Path | str | None = None
        if masks == "alpha channel":
            mask = "alpha" if has_alpha(path) else None
        elif masks == "mask folder":
            mask = partner_file(path, root, Path(mask_root))
        control = partner_file(path, root, Path(control_root)) if control_root is not None else None
        entries.append(Entry(path, bucket_for(width, height, resolution, step, min_side, max_side),
                             read_caption(path), repeats_of(path, root), mask, control))
    if control_root is not None:
        _check_partners(entries, root, Path(control_root))
    unmasked = [e.path.name for e in entries if masks != "none" and e.mask is None]
    if masks != "none" and len(unmasked) == len(entries):
        where = (f"no image in {root} has an alpha channel; save them with transparency, or use a mask folder"
                 if masks == "alpha channel" else f"{mask_root} holds no file named like an image of {root} (e.g. "
                 f"{entries[0].path.relative_to(root).with_suffix('.png')}); check mask_folder")
        raise ValueError(f"masks: {where}, or set masks to none")
    if unmasked:
        log.warning("Encode Training Folder: %d of %d images have no mask (%s%s); they train everywhere",
                    len(unmasked), len(entries), ", ".join(unmasked[:5]), " …" if len(unmasked) > 5 else "")
    return entries


def _check_partners(entries: Sequence[Entry], root: Path, control_root: Path) -> None:
    lonely = [str(e.path.relative_to(root)) for e in entries if e.control is None]
    if lonely:
        raise ValueError(f"control_folder: {len(lonely)} of {len(entries)} images have no control in {control_root} "
                         f"(same relative name, any image type): {', '.join(lonely[:10])}{' …' if len(lonely) > 10 else ''}; "
                         "add them, or move those images out of the folder")


def folder_fingerprint(*folders: str | Path | None) -> str:
    """A hash of the folders' image and caption files (paths, sizes, modification times): what changes
    when an image or caption is added, removed or edited, read from the file system alone."""
    digest = hashlib.sha256()
    for folder in folders:
        if folder is None or not Path(folder).is_dir():
            continue
        for path in list_images(folder):
            for file in (path, path.with_suffix(".txt")):
                if file.is_file():
                    stat = file.stat()
                    digest.update(f"{file.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def by_bucket(entries: Sequence[Entry]) -> list[Bucket]:
    """The entries grouped by bucket, largest area first (then widest), each bucket in file order."""
    groups: dict[tuple[int, int], list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.bucket, []).append(entry)
    return [Bucket(size, group) for size, group in sorted(groups.items(), key=lambda g: (-g[0][0] * g[0][1], -g[0][0]))]


def describe(buckets: Sequence[Bucket]) -> str:
    """One line: the buckets (width×height: images) and the totals."""
    parts = ", ".join(f"{b.size[0]}×{b.size[1]}: {len(b.entries)}" for b in buckets)
    total = sum(len(b.entries) for b in buckets)
    return f"{total} images in {len(buckets)} bucket{'s' if len(buckets) != 1 else ''} ({parts})"


class _Loaded:
    """One file of a chunk, read once: its content hash at once; its pixels and mask, fitted to its bucket,
    only when asked (a latent the cache has needs no decode)."""

    def __init__(self, entry: Entry):
        self.entry = entry
        self.raw = entry.path.read_bytes()
        self.digest = hashlib.sha256(self.raw).hexdigest()
        self._pixels: np.ndarray | None = None

    def floats(self) -> np.ndarray:
        """(h, w, 3) float32 in [0, 1]: what the VAE encodes."""
        return np.divide(self.pixels, 255.0, dtype=np.float32)

    @property
    def pixels(self) -> np.ndarray:
        """(h, w, 3) uint8 (a quarter of float32's bytes until the encode)."""
        if self._pixels is None:
            image = open_rgb(io.BytesIO(self.raw), self.entry.path)
            self._pixels = np.asarray(fit_to_bucket(image, self.entry.bucket), dtype=np.uint8)
        return self._pixels

    def mask(self) -> np.ndarray | None:
        """(h, w) float32 in [0, 1], or None: the alpha channel or the mask file, fitted like the image."""
        entry = self.entry
        if entry.mask == "alpha":
            with Image.open(io.BytesIO(self.raw)) as img:
                mask = ImageOps.exif_transpose(img).convert("RGBA").getchannel("A")
        elif isinstance(entry.mask, Path):
            with Image.open(entry.mask) as img:
                mask = ImageOps.exif_transpose(img).convert("L")
            size = oriented_size(io.BytesIO(self.raw))
            if mask.size != size:
                mask = mask.resize(size, Image.BILINEAR)
        else:
            return None
        return np.asarray(fit_to_bucket(mask, entry.bucket), dtype=np.float32) / 255.0


def encode_buckets(buckets: Sequence[Bucket], encode: Encode, *, dtype: torch.dtype = torch.float32,
                   flip: bool = False, chunk: int = 4, cache=None, inpaint: bool = False,
                   progress: Callable[[int], None] | None = None) -> list[Bucket]:
    """Fill each bucket's latents (and flipped copies, masks, controls, inpainting images) a chunk at a time;
    `cache` (a LatentCache) serves and keeps single latents; `progress(n)` is told after each chunk of n
    images. `inpaint`: also encode each image with its masked region grey (`inpaint_pixels`)."""
    if flip and any(e.control is not None for b in buckets for e in b.entries):
        raise ValueError("flip: a flipped image would keep its unflipped control (reference image); turn flip off "
                         "with a control_folder, or put mirrored pairs in the folders")
    if flip and inpaint:
        raise ValueError("flip: a flipped image would keep its unflipped inpainting image; turn flip off with inpaint")
    for bucket in buckets:
        for start in range(0, len(bucket.entries), max(1, chunk)):
            rows = range(start, min(start + max(1, chunk), len(bucket.entries)))
            loaded = [_Loaded(bucket.entries[i]) for i in rows]
            _store(bucket, rows, loaded, encode, dtype, flip, cache, inpaint)
            if progress is not None:
                progress(len(rows))
    return list(buckets)


def _store(bucket: Bucket, rows: range, loaded: list[_Loaded], encode: Encode, dtype: torch.dtype, flip: bool,
           cache, inpaint: bool = False) -> None:
    """Encode (or take from the cache) one chunk's latents and write them, and their masks, into the bucket."""
    encoded: set[int] = set()  # images of the chunk with a latent (or its mirror) that went through the VAE
    for flipped in (False, True) if flip else (False,):
        latents, missing = _latents(bucket.size, loaded, encode, flipped, cache)
        encoded.update(missing)
        target = _allocated(bucket, "flipped" if flipped else "latents", latents, dtype)
        for row, latent in zip(rows, latents):
            target[row] = latent
    bucket.encoded += len(encoded)
    if loaded[0].entry.control is not None:  # plan_folder gives every image a control, or none
        partners = [_Loaded(item.entry._replace(path=item.entry.control, mask=None, control=None)) for item in loaded]
        controls, _ = _latents(bucket.size, partners, encode, False, cache)
        target = _allocated(bucket, "controls", controls, dtype)
        for row, latent in zip(rows, controls):
            target[row] = latent
    masks = [item.mask() for item in loaded]
    if inpaint:
        _store_inpaint(bucket, rows, loaded, masks, encode, dtype, cache)
    if any(m is not None for m in masks):
        shape = bucket.latents.shape[1:]
        for flipped in (False, True) if flip else (False,):
            name = "flipped_masks" if flipped else "masks"
            if getattr(bucket, name) is None:
                setattr(bucket, name, torch.ones((len(bucket.entries), 1, *shape[1:]), dtype=torch.float16))
            for row, mask in zip(rows, masks):
                if mask is not None:
                    mask = torch.from_numpy(mask[:, ::-1].copy() if flipped else mask)
                    getattr(bucket, name)[row] = latent_mask(mask, shape).to(torch.float16)


def inpaint_pixels(pixels: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(h, w, 3) uint8 and its (h, w) mask in [0, 1] → float32 in [0, 1] with the mask's region (rounded) grey:
    InpaintModelConditioning's rule, (pixels − 0.5) · (1 − round(mask)) + 0.5."""
    image = np.divide(pixels, 255.0, dtype=np.float32)
    if mask is None:
        return image
    keep = (1.0 - np.round(mask)).astype(np.float32)[..., None]
    return (image - np.float32(0.5)) * keep + np.float32(0.5)


class _Masked(NamedTuple):
    """An image of a chunk with its masked region grey: what `_latents` encodes (or finds in the cache)."""

    digest: str  # of the image and the mask
    item: _Loaded
    mask: np.ndarray | None

    def floats(self) -> np.ndarray:
        return inpaint_pixels(self.item.pixels, self.mask)


def _store_inpaint(bucket: Bucket, rows: range, loaded: list[_Loaded], masks: list, encode: Encode,
                   dtype: torch.dtype, cache) -> None:
    """The chunk's images with their masked regions grey, encoded (cached under the image's and mask's hash)."""
    items = []
    for item, mask in zip(loaded, masks):
        mask_hash = hashlib.sha256(mask.tobytes()).hexdigest() if mask is not None else "none"
        items.append(_Masked(hashlib.sha256(f"inpaint:{item.digest}:{mask_hash}".encode()).hexdigest(), item, mask))
    latents, _ = _latents(bucket.size, items, encode, False, cache)
    target = _allocated(bucket, "inpaint", latents, dtype)
    for row, latent in zip(rows, latents):
        target[row] = latent


def _latents(size: tuple[int, int], loaded: list[_Loaded], encode: Encode, flipped: bool,
             cache) -> tuple[list, list[int]]:
    """The chunk's single latents (C, h, w): from the cache where it has them, the rest in one encode;
    and which of them were encoded."""
    found = [cache.get(item.digest, size, flipped) if cache is not None else None for item in loaded]
    missing = [i for i, latent in enumerate(found) if latent is None]
    if missing:
        pixels = np.stack([loaded[i].floats()[:, ::-1] if flipped else loaded[i].floats() for i in missing])
        with torch.no_grad():
            encoded = encode(torch.from_numpy(pixels)).float().cpu()
        for i, latent in zip(missing, encoded.unbind(0)):
            found[i] = latent
            if cache is not None:
                cache.put(loaded[i].digest, size, flipped, latent)
    return found, missing


def _allocated(bucket: Bucket, name: str, latents: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    tensor = getattr(bucket, name)
    if tensor is None:
        tensor = torch.empty((len(bucket.entries), *latents[0].shape), dtype=dtype)
        setattr(bucket, name, tensor)
    return tensor
