"""Loading training images and captions from disk, for the image-set nodes and the demo.

Images come out as ComfyUI's IMAGE layout: float32 (N, H, W, 3) in [0, 1]. EXIF orientation is
applied; greyscale, 16-bit, palette and alpha images are converted to RGB (alpha composited on
white). Resize methods: None (sizes must match), Stretch, Crop (scale to cover, centre crop),
Pad (fit inside, pad with black). Captions are `<image>.txt` beside the image, read as UTF-8 (a BOM
accepted), UTF-16 with a BOM, or else Windows-1252 (what Windows editors save as "ANSI"); kohya-ss
repeat folders (`<N>_<name>/`) repeat their images N times. Walking a folder skips hidden files and
folders (`.name`: `.ipynb_checkpoints/`, `.DS_Store`, macOS `._*` AppleDouble files) and `__MACOSX/`.
"""
from __future__ import annotations

import codecs
import logging
import os
import re
from pathlib import Path
from typing import IO, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

RESIZE_METHODS = ("None", "Stretch", "Crop", "Pad")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_REPEATS = re.compile(r"^(\d+)_(.+)$")
_SKIPPED_FOLDERS = ("__MACOSX",)  # resource-fork copies a zip made on macOS carries
_LEGACY_ENCODING = "cp1252"
_LISTED = 10  # uncaptioned images named in the warning before "and N more"

log = logging.getLogger(__name__)


class ImageSet(NamedTuple):
    images: torch.Tensor  # (N, H, W, 3) float32 in [0, 1]
    paths: list[Path]  # one per image, repeats included
    captions: list[str]  # one per image; "" where no caption file exists


def list_images(folder: str | os.PathLike, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files (or files of other `suffixes`: clips) in `folder` and its subfolders, sorted; other
    files, hidden files and folders (`.name`) and `__MACOSX` folders are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder: {folder} is not a folder; choose a subfolder of the input folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not is_skipped(d)]
        found += [Path(dirpath, f) for f in filenames if not is_skipped(f) and f.lower().endswith(suffixes)]
    return sorted(p for p in found if p.is_file())


def is_skipped(name: str) -> bool:
    """Hidden files and folders (`.name`) and `__MACOSX`: never part of a dataset."""
    return name.startswith(".") or name in _SKIPPED_FOLDERS


def repeats_of(path: Path, root: Path) -> int:
    """kohya-ss repeat count from the nearest `<N>_<name>` folder between root and the file; else 1."""
    for part in reversed(path.relative_to(root).parts[:-1]):
        match = _REPEATS.match(part)
        if match:
            return max(1, int(match.group(1)))
    return 1


def read_caption(path: Path) -> str:
    """The caption of image `path` (`<image>.txt`), stripped; "" if there is none."""
    caption = path.with_suffix(".txt")
    if not caption.is_file():
        return ""
    try:
        raw = caption.read_bytes()
    except OSError as err:
        raise ValueError(f"caption file {caption}: cannot be read ({err.strerror}); check its permissions") from err
    return decode_caption(raw, caption).strip()


def decode_caption(raw: bytes, path: Path) -> str:
    """UTF-8 (BOM accepted), UTF-16 with a BOM, else Windows-1252; ValueError naming the file if none fits."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encodings = ("utf-16",)
    elif b"\0" in raw:  # NUL bytes: not a text file in any 8-bit encoding
        encodings = ()
    else:
        encodings = ("utf-8-sig", _LEGACY_ENCODING)
    for encoding in encodings:
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        if encoding == _LEGACY_ENCODING:
            log.info("caption %s is not UTF-8; read it as Windows-1252", path)
        return text
    raise ValueError(f"caption file {path}: cannot be read as text (tried UTF-8, UTF-16 and Windows-1252); "
                     "open it in a text editor and save it as UTF-8")


def fill_captions(paths: Sequence[Path], captions: Sequence[str], default: str) -> list[str]:
    """Captions with `default` where an image has none; one warning lists the uncaptioned images."""
    missing = list(dict.fromkeys(p for p, c in zip(paths, captions) if not c))
    if missing:
        names = ", ".join(p.name for p in missing[:_LISTED])
        more = f" and {len(missing) - _LISTED} more" if len(missing) > _LISTED else ""
        got = f"the default_caption {default!r}" if default else "an empty caption (default_caption is empty)"
        log.warning("Load Captioned Image Set: %d of %d images have no .txt caption (%s%s); they train with %s",
                    len(missing), len(dict.fromkeys(paths)), names, more, got)
    return [c or default for c in captions]


def open_rgb(path: Path | IO[bytes], name: Path | None = None) -> Image.Image:
    """Open any supported image (a file, or its bytes named `name`) as 8-bit RGB with EXIF orientation
    applied; errors name the file."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: rescale to 8 bits
                arr = np.asarray(img, dtype=np.float64)
                peak = 65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0
                img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"image {name or path}: cannot be read ({err}); remove or re-save the file") from err


def fit(img: Image.Image, size: tuple[int, int], method: str) -> Image.Image:
    """Resize to (width, height) by Stretch, Crop (cover + centre crop) or Pad (fit inside + pad)."""
    if img.size == size:
        return img
    width, height = size
    if method == "Stretch":
        return img.resize(size, Image.Resampling.LANCZOS)
    scale = (max if method == "Crop" else min)(width / img.width, height / img.height)
    scaled = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                        Image.Resampling.LANCZOS)
    if method == "Crop":
        left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new("RGB", size, (0, 0, 0))
    canvas.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
    return canvas


def load_images(paths: Sequence[Path], resize_method: str = "None", width: int = 0, height: int = 0) -> torch.Tensor:
    """Images → (N, H, W, 3). Target size: width×height, or the first image's size where 0."""
    if resize_method not in RESIZE_METHODS:
        raise ValueError(f"resize_method: got {resize_method!r}; choose one of {', '.join(RESIZE_METHODS)}")
    if not paths:
        raise ValueError("images: no images to load")
    images = [open_rgb(p) for p in paths]
    size = (width or images[0].width, height or images[0].height)
    out = []
    for path, img in zip(paths, images):
        if resize_method == "None" and img.size != size:
            raise ValueError(f"image {path.name}: size {img.width}x{img.height} differs from {size[0]}x{size[1]} "
                             f"({paths[0].name}); set resize_method to Stretch, Crop or Pad")
        out.append(np.asarray(fit(img, size, resize_method), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(out))


def load_image_folder(folder: str | os.PathLike, resize_method: str = "None", width: int = 0,
                      height: int = 0, use_repeats: bool = True) -> ImageSet:
    """Every image under `folder` with its caption, kohya repeat folders expanded."""
    root = Path(folder)
    files = list_images(root)
    if not files:
        raise ValueError(f"folder: {root} holds no images ({', '.join(IMAGE_SUFFIXES)}; hidden files "
                         "and __MACOSX are skipped); add some or pick another")
    paths = [p for p in files for _ in range(repeats_of(p, root) if use_repeats else 1)]
    unique = load_images(files, resize_method, width, height)
    index = {p: i for i, p in enumerate(files)}
    images = unique[[index[p] for p in paths]]
    captions = {p: read_caption(p) for p in files}
    return ImageSet(images, paths, [captions[p] for p in paths])
