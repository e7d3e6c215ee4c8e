"""Print, as a markdown table, the aspect-ratio bucket that our rule, kohya-ss sd-scripts' and ai-toolkit's
give a set of source image sizes at a 1024 target, with the share of the picture each one crops away.

The table is the one in docs/data.md#aspect-ratio-buckets-our-rule-beside-kohyas-and-ai-toolkits
(tests/test_bucket_table.py checks the two are equal). Each cell is `width×height (crop %)`: the
bucket, then the share of the source picture the centre crop cuts after the image is resized to cover
the bucket; `↑1.50×` marks an image scaled up to reach its bucket.

- ours: training/buckets.py `bucket_for` at resolution 1024, step 64, min_side 256, max_side 2048.
- kohya: a re-statement, written from reading them, of kohya-ss/sd-scripts' rule in
  library/model_util.py `make_bucket_resolutions` and library/train_util.py `BucketManager`
  (`make_buckets`, `select_bucket`, `round_to_steps`), at --resolution 1024, --bucket_reso_steps 64,
  --min_bucket_reso 256 and --max_bucket_reso 2048 (sd-scripts' own default max is 1024; 2048 is the
  setting that matches our max_side), without and with --bucket_no_upscale.
- ai-toolkit: a re-statement, written from reading it, of ostris/ai-toolkit's rule in toolkit/buckets.py
  `get_bucket_for_image_size` (as toolkit/dataloader_mixins.py `BucketsMixin.setup_buckets` calls it)
  at resolution 1024, with divisibility 16: what ai-toolkit's model classes return from
  `get_bucket_divisibility` for SD 1.x and SDXL (the function's own default, 8, is overridden by the
  model; Flux-type models use 32).

Neither re-statement is their code; where they differ from it, theirs is right.

Usage: python scripts/bucket_table.py
"""
from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_buckets_for_table", Path(__file__).resolve().parent.parent / "training" / "buckets.py")
_buckets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_buckets)  # the rule alone: PIL and math, not the package (which imports torch)

RESOLUTION, STEP, MIN_SIDE, MAX_SIDE = 1024, 64, 256, 2048
AI_TOOLKIT_DIVISIBILITY = 16
SOURCES = [(3024, 4032), (4032, 3024), (1920, 1080), (1080, 1920), (1024, 1024), (2048, 1024), (1024, 2048),
           (3000, 1000), (800, 600), (512, 768), (640, 640), (4000, 6000)]


def ours(width: int, height: int) -> tuple[int, int]:
    return _buckets.bucket_for(width, height, RESOLUTION, STEP, MIN_SIDE, MAX_SIDE)


def kohya_bucket_sizes(resolution: int = RESOLUTION, steps: int = STEP, min_size: int = MIN_SIDE,
                       max_size: int = MAX_SIDE) -> list[tuple[int, int]]:
    """The square of the target area's side floored to the step, and for each width from min_size to
    max_size in steps the tallest step-multiple height within the area (capped at max_size, dropped
    below min_size), in both orientations."""
    area = resolution * resolution
    sizes = {(math.isqrt(area) // steps * steps,) * 2}
    for width in range(min_size, max_size + 1, steps):
        height = min(max_size, area // width // steps * steps)
        if height >= min_size:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def kohya(width: int, height: int) -> tuple[int, int]:
    """Upscaling mode: the image's own size if it is a bucket, else the bucket nearest in linear aspect
    (w/h minus w/h; the first in sorted order on a tie). The image is then resized to cover it."""
    sizes = kohya_bucket_sizes()
    if (width, height) in sizes:
        return width, height
    return min(sizes, key=lambda size: abs(size[0] / size[1] - width / height))


def kohya_no_upscale(width: int, height: int, resolution: int = RESOLUTION, steps: int = STEP) -> tuple[int, int]:
    """--bucket_no_upscale: no predefined buckets. An image above the target area is scaled to that area
    at its aspect; one side is rounded to the nearest pixel then down to the step, the other follows
    the aspect (of the two ways, the one whose rounded aspect is nearer the image's), and both sides
    are floored to the step. An image within the area keeps its size, floored to the step. The
    min/max bucket sizes are not applied."""
    aspect, area = width / height, resolution * resolution
    to_step = lambda x: int(x + 0.5) // steps * steps  # noqa: E731  (their round_to_steps)
    if width * height > area:
        scaled_w = math.sqrt(area * aspect)
        scaled_h = area / scaled_w
        by_w, by_h = to_step(scaled_w), to_step(scaled_h)
        error_w = abs(by_w / to_step(by_w / aspect) - aspect)
        error_h = abs(to_step(by_h * aspect) / by_h - aspect)
        width, height = (by_w, int(by_w / aspect + 0.5)) if error_w < error_h else (int(by_h * aspect + 0.5), by_h)
    return width // steps * steps, height // steps * steps


def ai_toolkit(width: int, height: int, resolution: int = RESOLUTION,
               divisibility: int = AI_TOOLKIT_DIVISIBILITY) -> tuple[int, int]:
    """One bucket per image shape: scale the image to min(its area, resolution²) at its aspect, floor or
    ceil each side to the divisibility, keep the four combinations whose area is at most resolution²,
    and take the one whose area is nearest the scaled area (floors first on a tie). No side limits."""
    cap = resolution * resolution
    target = min(width * height, cap)
    scale = math.sqrt(target / (width * height))
    w_units, h_units = width * scale / divisibility, height * scale / divisibility
    options = [(bw * divisibility, bh * divisibility)
               for bw, bh in itertools.product((math.floor(w_units), math.ceil(w_units)),
                                               (math.floor(h_units), math.ceil(h_units)))]
    fitting = [(bw, bh) for bw, bh in options if bw > 0 and bh > 0 and bw * bh <= cap]
    if not fitting:
        return max(divisibility, options[0][0]), max(divisibility, options[0][1])
    return min(fitting, key=lambda size: abs(size[0] * size[1] - target))


RULES = [("our bucket", ours), ("kohya (upscales)", kohya), ("kohya --bucket_no_upscale", kohya_no_upscale),
         (f"ai-toolkit (÷{AI_TOOLKIT_DIVISIBILITY})", ai_toolkit)]


def cell(source: tuple[int, int], bucket: tuple[int, int]) -> str:
    """`W×H (crop %)`, with `↑k×` when the image is scaled up to cover the bucket."""
    (width, height), (bw, bh) = source, bucket
    scale = max(bw / width, bh / height)
    cropped = max(0.0, 1 - bw * bh / (width * height * scale * scale))  # no -0.0 from rounding
    up = f", ↑{scale:.2f}×" if scale > 1.0005 else ""
    return f"{bw}×{bh} ({100 * cropped:.1f}%{up})"


def table() -> str:
    header = ["source", "aspect (w/h)", *(name for name, _ in RULES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for width, height in SOURCES:
        cells = [f"{width}×{height}", f"{width / height:.2f}",
                 *(cell((width, height), rule(width, height)) for _, rule in RULES)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> str:
    text = table()
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
