"""The preview grid: images taken over a run's steps → one labelled image (Train LoRA's previews output).

Cells are laid out row by row, oldest first, in a near-square grid (`columns = ceil(sqrt(n))`); each
cell is its image under a strip naming its label ("step 200"). Images of different sizes are
centred in cells of the largest size. Pure numpy + Pillow, so it tests without ComfyUI.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (24, 24, 24)  # RGB of the label strips and of padding
TEXT = (235, 235, 235)


class Layout(NamedTuple):
    rows: int
    columns: int
    cell_height: int  # pixels: label strip + image
    cell_width: int
    label_height: int

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the whole grid in pixels."""
        return self.rows * self.cell_height, self.columns * self.cell_width


def label_height(image_width: int) -> int:
    """The label strip's height for cells `image_width` pixels wide: 14 px up to 168 px, growing to 40."""
    return max(14, min(40, image_width // 12))


def layout(count: int, image_height: int, image_width: int) -> Layout:
    """Where `count` images of (at most) image_height × image_width go; ValueError when count < 1."""
    if count < 1:
        raise ValueError("previews: no preview was taken; there is nothing to put in a grid")
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    strip = label_height(image_width)
    return Layout(rows, columns, image_height + strip, image_width, strip)


def _font(height: int) -> ImageFont.ImageFont:
    try:  # Pillow >= 10.1 scales its built-in font
        return ImageFont.load_default(size=max(8, int(height * 0.7)))
    except TypeError:
        return ImageFont.load_default()


def labelled_grid(images: Sequence[np.ndarray], labels: Sequence[str]) -> np.ndarray:
    """One uint8 RGB image (H, W, 3) of `images` (each uint8 (h, w, 3)), each under its label.

    Raises ValueError when the counts differ, no image is given, or an image is not (h, w, 3) uint8.
    """
    if len(images) != len(labels):
        raise ValueError(f"labels: got {len(labels)} labels for {len(images)} images; give one per image")
    for i, image in enumerate(images):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"images[{i}]: got {image.dtype} {tuple(image.shape)}; give uint8 (height, width, 3)")
    height = max((im.shape[0] for im in images), default=0)
    width = max((im.shape[1] for im in images), default=0)
    plan = layout(len(images), height, width)
    grid = Image.new("RGB", plan.size[::-1], BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _font(plan.label_height)
    for i, (image, label) in enumerate(zip(images, labels)):
        top = (i // plan.columns) * plan.cell_height
        left = (i % plan.columns) * plan.cell_width
        x0, y0, x1, y1 = draw.textbbox((0, 0), label, font=font)
        draw.text((left + max(1, (plan.cell_width - (x1 - x0)) // 2) - x0,
                   top + (plan.label_height - (y1 - y0)) // 2 - y0), label, fill=TEXT, font=font)
        offset = ((width - image.shape[1]) // 2, (height - image.shape[0]) // 2)
        grid.paste(Image.fromarray(image), (left + offset[0], top + plan.label_height + offset[1]))
    return np.asarray(grid).copy()
