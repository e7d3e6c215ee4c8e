"""Make assets/icon.png, the pack's icon for the Comfy Registry ([tool.comfy] Icon in pyproject.toml):
four of the bundled demo images, 2 × 2 on a 400 × 400 square (the registry's largest icon size).

Usage: .venv/bin/python scripts/make_icon.py
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TILES = ("circle", "stripes", "rings", "dots")
SIZE, GAP = 400, 8


def make_icon() -> Image.Image:
    icon = Image.new("RGB", (SIZE, SIZE), (24, 24, 24))
    tile = (SIZE - 3 * GAP) // 2
    for index, name in enumerate(TILES):
        with Image.open(ROOT / "assets" / "demo_images" / f"{name}.png") as image:
            picture = image.convert("RGB").resize((tile, tile), Image.NEAREST)
        row, column = divmod(index, 2)
        icon.paste(picture, (GAP + column * (tile + GAP), GAP + row * (tile + GAP)))
    return icon


if __name__ == "__main__":
    make_icon().save(ROOT / "assets" / "icon.png", optimize=True)
