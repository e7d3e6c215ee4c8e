"""Aspect-ratio buckets: the size each training image is cropped to, so portraits and landscapes keep
their shape instead of being squashed or cut into one square (the rule of kohya-ss sd-scripts'
`BucketManager`, which ai-toolkit, OneTrainer and SimpleTuner share in substance).

A bucket is a (width, height) in pixels, both multiples of `step` (the model's spatial multiple: the
VAE's downscale times the model's patch size; 64 suits every family the pack trains), both within
[min_side, max_side], with an area at most `resolution`²: for each width, the tallest such height,
and each such bucket turned on its side (as kohya does), so a 1:2 portrait has the buckets a 2:1
landscape has.
An image goes to the bucket whose aspect ratio is nearest its own (distance in log aspect, so 2:1 and
1:2 are equally far from 1:1), among the buckets it covers without upscaling; it is then resized to
cover the bucket and centre-cropped. An image too small for any bucket is never upscaled: it keeps its
own size, each side rounded down to the step.

This is the rule only; reading folders into buckets and the loader node build on it.
"""
from __future__ import annotations

import math

from PIL import Image

DEFAULT_STEP = 64


def buckets(resolution: int, step: int = DEFAULT_STEP, min_side: int = 256, max_side: int = 2048) -> list[tuple[int, int]]:
    """Every bucket (width, height) for a target area of `resolution`², widest first; ValueError naming
    the input that leaves none."""
    for name, value in (("resolution", resolution), ("step", step), ("min_side", min_side), ("max_side", max_side)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: got {value!r}; give a whole number of pixels, 1 or more")
    if max_side < min_side:
        raise ValueError(f"max_side: got {max_side}, below min_side {min_side}; give max_side ≥ min_side")
    area = resolution * resolution
    found = []
    for width in range(_ceil_to(min_side, step), max_side + 1, step):
        height = min(area // width // step * step, max_side // step * step)
        if height >= min_side:
            found += [(width, height), (height, width)]  # and turned: portraits get what landscapes get
    if not found:
        raise ValueError(f"resolution: {resolution} gives no bucket with sides in [{min_side}, {max_side}] at step "
                         f"{step}; raise resolution or widen min_side / max_side")
    return sorted(set(found), reverse=True)


def bucket_for(width: int, height: int, resolution: int, step: int = DEFAULT_STEP, min_side: int = 256,
               max_side: int = 2048) -> tuple[int, int]:
    """The bucket (width, height) of an image of `width` × `height` pixels (see the module docstring)."""
    if width < 1 or height < 1:
        raise ValueError(f"image: got {width}×{height} pixels; an image needs at least one pixel")
    fitting = [b for b in buckets(resolution, step, min_side, max_side) if b[0] <= width and b[1] <= height]
    if not fitting:  # never upscaled: its own size, rounded down to the step (at least one step)
        return max(step, width // step * step), max(step, height // step * step)
    aspect = math.log(width / height)
    return min(fitting, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def fit_to_bucket(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize `image` to cover `size` (width, height), keeping its aspect ratio, then crop the centre."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _ceil_to(value: int, step: int) -> int:
    return -(-value // step) * step
