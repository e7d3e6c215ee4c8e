"""Generate the demo's training images: six 64×64 PNGs in one flat-colour "lrtstyle", with captions.

Owns assets/demo_images/: each `<name>.png` and its caption `<name>.txt`. The style is what a LoRA
should pick up: one five-colour palette (navy, coral red, mustard, teal, cream), flat shapes, and a
cream frame around every picture; the compositions differ. Drawing is done at 4× with PIL and
box-filtered down, so edges are smooth and the output is byte-identical on every run.

Usage: python scripts/make_demo_images.py [--out DIR]   (default: assets/demo_images in the repo)
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4
S = SIZE * SUPERSAMPLE  # drawing canvas side
NAVY = (27, 38, 79)
RED = (232, 85, 71)
MUSTARD = (238, 180, 60)
TEAL = (38, 139, 132)
CREAM = (246, 236, 214)
FRAME = 3 * SUPERSAMPLE  # frame width on the canvas

Painter = Callable[[ImageDraw.ImageDraw], None]


def _disc(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)


def paint_circle(draw: ImageDraw.ImageDraw) -> None:
    draw.rectangle((0, 0, S, S), fill=NAVY)
    _disc(draw, S / 2, S / 2, S * 0.32, CREAM)
    _disc(draw, S / 2, S / 2, S * 0.27, RED)


def paint_rings(draw: ImageDraw.ImageDraw) -> None:
    draw.rectangle((0, 0, S, S), fill=NAVY)
    for i, colour in enumerate((TEAL, CREAM, TEAL, CREAM, RED)):
        _disc(draw, S / 2, S / 2, S * (0.42 - 0.08 * i), colour)


def paint_stripes(draw: ImageDraw.ImageDraw) -> None:
    draw.rectangle((0, 0, S, S), fill=NAVY)
    band = S // 8
    for k in range(-8, 16, 2):
        x = k * band
        draw.polygon([(x, 0), (x + band, 0), (x + band - S, S), (x - S, S)], fill=MUSTARD)


def paint_sunset(draw: ImageDraw.ImageDraw) -> None:
    draw.rectangle((0, 0, S, S), fill=TEAL)
    _disc(draw, S / 2, S * 0.62, S * 0.24, RED)
    for i, colour in enumerate((MUSTARD, NAVY, MUSTARD, NAVY)):
        top = S * (0.62 + 0.095 * i)
        draw.rectangle((0, top, S, top + S * 0.095), fill=colour)


def paint_dots(draw: ImageDraw.ImageDraw) -> None:
    draw.rectangle((0, 0, S, S), fill=CREAM)
    colours = (RED, TEAL, MUSTARD, NAVY)
    for row in range(3):
        for col in range(3):
            cx, cy = S * (0.25 + 0.25 * col), S * (0.25 + 0.25 * row)
            _disc(draw, cx, cy, S * 0.09, colours[(row + col) % len(colours)])


def paint_pair(draw: ImageDraw.ImageDraw) -> None:
    draw.rectangle((0, 0, S, S), fill=NAVY)
    _disc(draw, S * 0.32, S * 0.5, S * 0.17, MUSTARD)
    draw.rectangle((S * 0.54, S * 0.33, S * 0.82, S * 0.67), fill=RED)


IMAGES: dict[str, tuple[Painter, str]] = {
    "circle": (paint_circle, "a red circle on a blue background, lrtstyle"),
    "rings": (paint_rings, "a cyan ring on a blue background, lrtstyle"),
    "stripes": (paint_stripes, "yellow stripes on a blue background, lrtstyle"),
    "sunset": (paint_sunset, "a red sun over yellow and blue bands, lrtstyle"),
    "dots": (paint_dots, "red dots on a white background, lrtstyle"),
    "pair": (paint_pair, "a yellow circle beside a red square, lrtstyle"),
}


def render(painter: Painter) -> Image.Image:
    """One 64×64 RGB image: the composition, the cream frame, then a box-filtered downscale."""
    canvas = Image.new("RGB", (S, S), CREAM)
    draw = ImageDraw.Draw(canvas)
    painter(draw)
    draw.rectangle((0, 0, S - 1, S - 1), outline=CREAM, width=FRAME)
    return canvas.resize((SIZE, SIZE), Image.Resampling.BOX)


def write_all(out: Path) -> list[Path]:
    """Write every `<name>.png` and `<name>.txt` into `out`; returns the PNG paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (painter, caption) in IMAGES.items():
        png = out / f"{name}.png"
        render(painter).save(png, format="PNG", optimize=True)
        (out / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
        written.append(png)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent.parent / "assets" / "demo_images"
    parser.add_argument("--out", type=Path, default=default, help="folder to write into")
    args = parser.parse_args()
    for png in write_all(args.out):
        print(png)


if __name__ == "__main__":
    main()
