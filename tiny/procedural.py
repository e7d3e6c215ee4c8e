"""Procedural pictures for pretraining the tiny base: flat shapes, stripes, rings and dots with captions.

Owns the generator the pretraining script (`pretrain.py`) learns from and the fresh held-out sets
that score the base: each picture is one shape in one named colour on a background of another,
captioned like "a red circle on a blue background". The colours are plain, saturated ones, none of
them the demo images' palette, so a LoRA trained on those images has something new to teach.

Everything is drawn with numpy from a seeded `np.random.Generator` (the same seed gives the same
pictures on every machine): masks on a 4× supersampled grid, box-filtered down, so edges are
smooth. Shapes: `SHAPES`, one large shape near the middle or a pattern over the whole picture;
colours: `COLOURS` (RGB, 0–255).
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np
import torch

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30), "green": (40, 165, 60), "blue": (35, 75, 215), "yellow": (250, 225, 25),
    "orange": (250, 125, 15), "purple": (135, 45, 175), "pink": (250, 130, 195), "white": (245, 245, 245),
    "black": (15, 15, 15), "gray": (125, 125, 125), "brown": (115, 70, 30), "cyan": (30, 205, 225),
}
SUPERSAMPLE = 4
FRESH_SEED = 20_261_128  # held-out sets; the pretraining stream uses its settings' seed, never this one

Mask = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _centre(rng: np.random.Generator) -> np.ndarray:
    """Shapes sit near the middle (±0.04): a tiny model pretrained for minutes learns what a circle or a
    square is far sooner when it need not also learn where one may be."""
    return 0.5 + rng.uniform(-0.04, 0.04, size=2)


def _circle(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    r = rng.uniform(0.26, 0.36)
    cx, cy = _centre(rng)
    return (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2


def _square(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h = rng.uniform(0.22, 0.32)
    cx, cy = _centre(rng)
    return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)


def _triangle(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apex up: half as wide as tall at every height, `2h` tall."""
    h = rng.uniform(0.3, 0.4)
    cx, cy = _centre(rng)
    return (y >= cy - h) & (y <= cy + h) & (np.abs(x - cx) <= (y - cy + h) / 2)


def _ring(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    r = rng.uniform(0.32, 0.42)
    cx, cy = _centre(rng)
    d2 = (x - cx) ** 2 + (y - cy) ** 2
    return (d2 <= r ** 2) & (d2 >= (0.6 * r) ** 2)


def _stripes(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Horizontal, vertical or diagonal bands, half of each period in the stripe colour."""
    coord = (x, y, (x + y) / np.sqrt(2), (x - y) / np.sqrt(2))[rng.integers(4)]
    period = rng.uniform(0.18, 0.35)
    return (coord / period + rng.uniform()) % 1.0 < 0.5


def _dots(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An n×n grid of dots (n = 3 or 4) filling the picture."""
    n = int(rng.integers(3, 5))
    r = rng.uniform(0.22, 0.35) / n
    fx, fy = (x * n) % 1.0 - 0.5, (y * n) % 1.0 - 0.5
    return fx ** 2 + fy ** 2 <= (r * n) ** 2


SHAPES: dict[str, tuple[Mask, str]] = {  # name → (mask, caption template)
    "circle": (_circle, "{a_fg} circle on {a_bg} background"),
    "square": (_square, "{a_fg} square on {a_bg} background"),
    "triangle": (_triangle, "{a_fg} triangle on {a_bg} background"),
    "ring": (_ring, "{a_fg} ring on {a_bg} background"),
    "stripes": (_stripes, "{fg} stripes on {a_bg} background"),
    "dots": (_dots, "{fg} dots on {a_bg} background"),
}


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """x, y of the supersampled pixel centres, in [0, 1), each (size·SUPERSAMPLE,) × 2."""
    side = size * SUPERSAMPLE
    y, x = (np.mgrid[0:side, 0:side] + 0.5) / side
    return x, y


def draw_picture(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """One random picture: (size, size, 3) float32 RGB in [0, 1] and its caption."""
    names = list(COLOURS)
    shape = list(SHAPES)[rng.integers(len(SHAPES))]
    fg, bg = (names[i] for i in rng.choice(len(names), size=2, replace=False))
    x, y = _grid(size)
    mask, template = SHAPES[shape]
    inside = mask(x, y, rng)[..., None]
    canvas = np.where(inside, np.array(COLOURS[fg]), np.array(COLOURS[bg])).astype(np.float32) / 255.0
    image = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return image, template.format(fg=fg, a_fg=_with_article(fg), a_bg=_with_article(bg))


def draw_batch(rng: np.random.Generator, count: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """`count` pictures as images (count, size, size, 3) float32 in [0, 1] (ComfyUI IMAGE layout)
    and their captions, drawn in order from `rng`."""
    pictures = [draw_picture(rng, size) for _ in range(count)]
    return torch.from_numpy(np.stack([p for p, _ in pictures])), [c for _, c in pictures]


def fresh_set(count: int, size: int, seed: int = FRESH_SEED) -> tuple[torch.Tensor, list[str]]:
    """A held-out set: `count` pictures from a generator seeded with `seed` (default: one that
    pretraining never uses)."""
    return draw_batch(np.random.default_rng(seed), count, size)


# Shapes drawn in one place: what `recognise_shapes` tells apart (stripes and dots fill the picture).
CENTRED_SHAPES = ("circle", "square", "triangle", "ring")
CAPTION = re.compile(r"^(?:an? )?(?P<fg>\w+) (?P<shape>\w+) on an? (?P<bg>\w+) background$")


def shape_templates(size: int, per_shape: int = 32, seed: int = FRESH_SEED) -> dict[str, np.ndarray]:
    """shape → (per_shape, size, size) bool masks, drawn as the pictures draw them (random size and
    centre), covered where over half the pixel is inside."""
    rng, (x, y) = np.random.default_rng(seed), _grid(size)
    return {shape: np.stack([SHAPES[shape][0](x, y, rng).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE)
                             .mean(axis=(1, 3)) > 0.5 for _ in range(per_shape)]) for shape in CENTRED_SHAPES}


def caption_parts(caption: str) -> tuple[str, str, str] | None:
    """(shape, foreground colour, background colour) of a procedural caption, or None for another text."""
    match = CAPTION.match(caption)
    if match is None or match["shape"] not in SHAPES or not {match["fg"], match["bg"]} <= set(COLOURS):
        return None
    return match["shape"], match["fg"], match["bg"]


def recognise_shapes(images: torch.Tensor, captions: list[str], templates: dict[str, np.ndarray]
                     ) -> tuple[list[str], list[float]]:
    """For pictures (n, H, W, 3) in [0, 1] captioned like the procedural ones (a shape of
    `CENTRED_SHAPES`): which shape each draws, and how far its pixels are from the caption's two colours.

    Each pixel is placed on the line from the background colour to the shape's (its share of the way,
    clamped to [0, 1]); pixels past halfway make the drawn mask, and the shape is the template shape
    with the best overlap (intersection over union) with it. The colour error is the mean distance (RGB
    in [0, 1]) of the pixels from that line segment: 0 for a picture in the two colours only.
    """
    shapes, errors = [], []
    for image, caption in zip(images.double(), captions):
        _, fg, bg = caption_parts(caption)
        a, b = (torch.tensor(COLOURS[c], dtype=torch.float64) / 255 for c in (fg, bg))
        share = ((image - b) @ (a - b) / (a - b).square().sum()).clamp(0, 1)
        errors.append((b + share[..., None] * (a - b) - image).norm(dim=-1).mean().item())
        drawn = (share > 0.5).numpy()
        overlap = {shape: ((masks & drawn).sum(axis=(1, 2)) / np.maximum(1, (masks | drawn).sum(axis=(1, 2)))).max()
                   for shape, masks in templates.items()}
        shapes.append(max(overlap, key=overlap.get))
    return shapes, errors
