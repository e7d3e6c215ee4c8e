"""Aspect-ratio buckets (training/buckets.py): the sizes, the choice for an image, no upscaling, the crop."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from comfyui_lora_trainer.training.buckets import bucket_for, buckets, fit_to_bucket


def test_buckets_are_step_multiples_within_the_sides_at_most_the_target_area():
    found = buckets(1024)
    assert (1024, 1024) in found and (1152, 896) in found and (896, 1152) in found
    for width, height in found:
        assert width % 64 == 0 and height % 64 == 0 and 256 <= min(width, height) and max(width, height) <= 2048
        assert width * height <= 1024 * 1024
        tallest = width * (height + 64) > 1024 * 1024 or height + 64 > 2048
        widest = (width + 64) * height > 1024 * 1024 or width + 64 > 2048  # a tallest one turned on its side
        assert tallest or widest
        assert (height, width) in found  # portraits have what landscapes have
    assert found == sorted(found, reverse=True) and len(set(found)) == len(found)


@pytest.mark.parametrize("size, expected", [
    ((4000, 4000), (1024, 1024)),  # square
    ((3024, 4032), (896, 1152)),  # a phone portrait, 3:4 → 0.78
    ((4032, 3024), (1152, 896)),  # the same, landscape
    ((1920, 1080), (1344, 768)),  # 16:9 → 1.75
    ((1100, 1000), (1088, 960)),  # just above the area: the nearest bucket it covers without upscaling
])
def test_each_image_goes_to_the_nearest_aspect_it_covers(size, expected):
    assert bucket_for(*size, resolution=1024) == expected
    width, height = size
    bucket = bucket_for(*size, resolution=1024)
    assert bucket[0] <= width and bucket[1] <= height  # never upscaled
    others = [b for b in buckets(1024) if b[0] <= width and b[1] <= height]
    distance = lambda b: abs(math.log(b[0] / b[1]) - math.log(width / height))  # noqa: E731
    assert distance(bucket) == min(map(distance, others))


def test_a_small_image_keeps_its_own_size_rounded_down_to_the_step():
    assert bucket_for(300, 200, resolution=1024) == (256, 192)
    assert bucket_for(640, 480, resolution=512, step=64) == (576, 448)  # area above 512²: a bucket
    assert bucket_for(40, 40, resolution=1024) == (64, 64)  # at least one step (never below)


def test_fit_resizes_to_cover_and_crops_the_centre():
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, 75:125] = 255  # a white band in the middle of a 200×100 landscape
    fitted = fit_to_bucket(Image.fromarray(pixels), (64, 64))
    assert fitted.size == (64, 64)
    row = np.asarray(fitted)[32, :, 0]
    assert row[32] > 200 and row[0] < 50 and row[-1] < 50  # the centre kept, the sides cut


def test_bad_settings_name_the_input():
    with pytest.raises(ValueError, match="^step: got 0"):
        buckets(1024, step=0)
    with pytest.raises(ValueError, match="^max_side: got 128, below min_side 256"):
        buckets(1024, max_side=128)
    with pytest.raises(ValueError, match="^resolution: 64 gives no bucket"):
        buckets(64, min_side=256)
    with pytest.raises(ValueError, match="^image: got 0×10 pixels"):
        bucket_for(0, 10, resolution=512)
