"""A folder of clips for image-to-video training (training/clips.py): the plan (captions, start images),
the frame counts a Wan VAE takes, frames fitted like images, and WanImageToVideo's start video and mask."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_lora_trainer.training.buckets import fit_to_bucket
from comfyui_lora_trainer.training.clips import clip_frames, plan_clips, start_mask, start_video, usable_frames


def test_clips_are_planned_with_their_captions_and_a_still_start_image_of_the_same_name(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("walk.mp4", "sub/spin.gif", ".hidden.mp4"):
        (tmp_path / name).write_bytes(b"not decoded here")
    (tmp_path / "walk.txt").write_text("a walk, lrtstyle", encoding="utf-8")
    Image.new("RGB", (8, 8)).save(tmp_path / "walk.png")  # walk's start image; not a clip itself
    clips = plan_clips(tmp_path)
    assert [c.path.relative_to(tmp_path).as_posix() for c in clips] == ["sub/spin.gif", "walk.mp4"]
    assert [c.caption for c in clips] == ["", "a walk, lrtstyle"]
    assert clips[0].start is None and clips[1].start == tmp_path / "walk.png"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="^folder: .* holds no clips"):
        plan_clips(tmp_path / "empty")


@pytest.mark.parametrize("available, wanted, taken", [(81, 33, 33), (20, 33, 17), (5, 33, 5), (4, 33, 1),
                                                      (1, 33, 1), (100, 30, 29), (0, 33, 0)])
def test_a_clip_gives_the_largest_4k_plus_1_frames_up_to_frames(available, wanted, taken):
    assert usable_frames(available, wanted) == taken


def test_frames_are_fitted_to_the_bucket_like_still_images():
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.random((7, 48, 80, 3), dtype=np.float32))
    fitted = clip_frames(frames, 5, (32, 32))
    assert fitted.shape == (5, 32, 32, 3) and fitted.dtype == np.float32
    pixels = np.clip(np.round(frames[3].numpy() * 255), 0, 255).astype(np.uint8)
    alone = np.asarray(fit_to_bucket(Image.fromarray(pixels), (32, 32)), dtype=np.float32) / 255
    np.testing.assert_allclose(fitted[3], alone, atol=1e-7)


def test_the_start_video_and_mask_follow_wan_image_to_video():
    start = np.random.default_rng(1).random((16, 24, 3), dtype=np.float32)
    video = start_video(start, 9)
    assert video.shape == (9, 16, 24, 3) and np.array_equal(video[0], start) and np.all(video[1:] == 0.5)
    mask = start_mask((16, 3, 2, 3))  # latents (C, T, h, w): 9 frames → 3 latent frames
    assert mask.shape == (1, 1, 3, 2, 3)
    assert torch.all(mask[:, :, 0] == 0) and torch.all(mask[:, :, 1:] == 1)
