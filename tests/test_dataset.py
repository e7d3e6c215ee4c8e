"""A folder of mixed sizes → bucketed latents (training/dataset.py), the latent cache, masks, caption
variants, pairs for edit models (a control folder: each control fitted to its image's bucket, encoded
beside it, set as its reference latent), and the path into the engine (nodes/samples.py), on the tiny
model's VAE stand-in made to downscale 8× like a real VAE.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfyui_lora_trainer.nodes.conditioning import CONCAT_KEY, CONCAT_MASK_KEY, REFERENCE_KEY, with_concat_image, \
    with_reference
from comfyui_lora_trainer.nodes.samples import FLIPPED, NOISE_MASK, REPEATS, VARIANT, bucket_latent, expand, \
    variant_conditioning
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny, encode_images
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.buckets import fit_to_bucket
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.dataset import by_bucket, describe, encode_buckets, inpaint_pixels, plan_folder
from comfyui_lora_trainer.training.latent_cache import LatentCache, weights_key
from comfyui_lora_trainer.training.loop import train
from comfyui_lora_trainer.training.tags import caption_variants

SIZES = {"wide_a.png": (96, 64), "wide_b.png": (192, 128), "square.png": (64, 64), "tall.png": (64, 96)}
PLAN = dict(resolution=80, step=32, min_side=32, max_side=256)  # area 6400: buckets 96×64, 64×64, 64×96


class Counting:
    """A VAE stand-in with an 8× downscale (area mean, then the tiny model's encode), counting images."""

    def __init__(self):
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += pixels.shape[0]
        small = F.avg_pool2d(pixels.permute(0, 3, 1, 2), 8).permute(0, 2, 3, 1)
        return encode_images(small)


def picture(size, seed: int, alpha: bool = False) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 4 if alpha else 3), dtype=np.uint8)
    if alpha:
        pixels[..., 3] = 0
        pixels[:, : size[0] // 2, 3] = 255  # the left half is the subject
    return Image.fromarray(pixels)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "set"
    (root / "3_repeated").mkdir(parents=True)
    for i, (name, size) in enumerate(SIZES.items()):
        where = root / "3_repeated" if name == "tall.png" else root
        picture(size, i).save(where / name)
        (where / name).with_suffix(".txt").write_text(f"lrt, {name[:-4]}, red, blue")
    return root


def test_a_mixed_folder_is_planned_into_buckets_by_aspect_never_upscaled(folder):
    entries = plan_folder(folder, **PLAN)
    buckets = {e.path.name: e.bucket for e in entries}
    assert buckets == {"wide_a.png": (96, 64), "wide_b.png": (96, 64), "square.png": (64, 64), "tall.png": (64, 96)}
    assert {e.path.name: e.repeats for e in entries}["tall.png"] == 3
    assert describe(by_bucket(entries)) == "4 images in 3 buckets (96×64: 2, 64×96: 1, 64×64: 1)"
    small = plan_folder(folder, resolution=1024, step=32, min_side=32, max_side=2048)
    assert {e.path.name: e.bucket for e in small}["wide_b.png"] == (192, 128)  # its own size, not upscaled


def test_streamed_latents_equal_encoding_each_fitted_image_alone(folder):
    buckets = encode_buckets(by_bucket(plan_folder(folder, **PLAN)), Counting(), chunk=1)
    for bucket in buckets:
        for row, entry in enumerate(bucket.entries):
            with Image.open(entry.path) as img:
                fitted = np.asarray(fit_to_bucket(img.convert("RGB"), bucket.size), dtype=np.float32) / 255
            alone = Counting()(torch.from_numpy(fitted)[None])[0]
            assert torch.equal(bucket.latents[row], alone)
            assert bucket.latents.shape[-2:] == (bucket.size[1] // 8, bucket.size[0] // 8)
    chunked = encode_buckets(by_bucket(plan_folder(folder, **PLAN)), Counting(), chunk=3, dtype=torch.bfloat16)
    for one, other in zip(buckets, chunked):
        assert other.latents.dtype == torch.bfloat16 and torch.equal(other.latents, one.latents.to(torch.bfloat16))


def test_the_cache_skips_the_encode_and_a_changed_image_encodes_again(folder, tmp_path):
    cache = LatentCache(tmp_path / "cache", "vae1")
    first_vae, second_vae = Counting(), Counting()
    first = encode_buckets(by_bucket(plan_folder(folder, **PLAN)), first_vae, cache=cache, flip=True)
    second = encode_buckets(by_bucket(plan_folder(folder, **PLAN)), second_vae, cache=LatentCache(tmp_path / "cache", "vae1"), flip=True)
    assert first_vae.images == 8 and second_vae.images == 0 and sum(b.encoded for b in second) == 0
    for a, b in zip(first, second):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.flipped, b.flipped)
    shutil.move(folder / "square.png", folder / "renamed.png")  # same content: still cached
    picture((96, 64), 99).save(folder / "wide_a.png")  # new content: encoded again
    third_vae = Counting()
    encode_buckets(by_bucket(plan_folder(folder, **PLAN)), third_vae, cache=LatentCache(tmp_path / "cache", "vae1"))
    assert third_vae.images == 1
    other_vae = Counting()  # another VAE's key: nothing is reused
    encode_buckets(by_bucket(plan_folder(folder, **PLAN)), other_vae, cache=LatentCache(tmp_path / "cache", "vae2"))
    assert other_vae.images == 4
    assert weights_key([("w", torch.ones(2))]) != weights_key([("w", torch.zeros(2))])


def test_a_broken_cache_file_is_encoded_again(folder, tmp_path):
    cache = LatentCache(tmp_path / "cache", "vae")
    encode_buckets(by_bucket(plan_folder(folder, **PLAN)), Counting(), cache=cache)
    for path in cache.folder.iterdir():
        path.write_bytes(b"not a safetensors file")
    vae = Counting()
    encode_buckets(by_bucket(plan_folder(folder, **PLAN)), vae, cache=LatentCache(tmp_path / "cache", "vae"))
    assert vae.images == 4


def test_masks_from_alpha_and_from_a_mask_folder_reach_the_latent_size(tmp_path):
    root, masks = tmp_path / "set", tmp_path / "masks"
    root.mkdir(), masks.mkdir()
    picture((64, 64), 1, alpha=True).save(root / "a.png")
    picture((64, 64), 2).save(root / "b.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:32] = 255  # the top half
    Image.fromarray(mask).save(masks / "b.jpg")
    plan = dict(resolution=64, step=32, min_side=32, max_side=128)
    alpha = encode_buckets(by_bucket(plan_folder(root, masks="alpha channel", **plan)), Counting(), flip=True)[0]
    left = torch.zeros(8, 8)
    left[:, :4] = 1
    assert torch.equal(alpha.masks[0, 0].float(), left)  # a.png: the left half
    assert torch.equal(alpha.flipped_masks[0, 0].float(), left.flip(-1))  # mirrored with its image
    assert torch.equal(alpha.masks[1, 0].float(), torch.ones(8, 8))  # b.png has no alpha: trains everywhere
    folder_masks = encode_buckets(by_bucket(plan_folder(root, masks="mask folder", mask_root=masks, **plan)),
                                  Counting())[0]
    top = torch.zeros(8, 8)
    top[:4] = 1
    assert torch.allclose(folder_masks.masks[1, 0].float(), top, atol=0.02)  # JPEG edges: nearly exact
    with pytest.raises(ValueError, match="mask_folder"):
        plan_folder(root, masks="mask folder", mask_root=tmp_path / "missing", **plan)


def test_caption_variants_keep_the_first_tags_and_are_seeded():
    caption = "lrt style, portrait, red hat, smiling, outdoors, film grain"
    variants = caption_variants(caption, 4, shuffle=True, dropout=0.3, keep_tokens=2, seed=7, index=3)
    assert variants[0] == caption and len(set(variants)) > 1
    assert all(v.startswith("lrt style, portrait") for v in variants)
    assert all(set(v.split(", ")) <= set(caption.split(", ")) for v in variants)
    assert variants == caption_variants(caption, 4, shuffle=True, dropout=0.3, keep_tokens=2, seed=7, index=3)
    assert variants != caption_variants(caption, 4, shuffle=True, dropout=0.3, keep_tokens=2, seed=8, index=3)
    with pytest.raises(ValueError, match="shuffle_tags"):
        caption_variants(caption, 2, shuffle=False, dropout=0.0, keep_tokens=0, seed=0)


def test_expand_reads_flips_repeats_masks_and_caption_variants():
    latents = torch.randn(2, 4, 8, 8)
    mask = torch.ones(2, 1, 8, 8)
    latent = bucket_latent(latents, latents.flip(-1), mask, mask, [1, 3])
    assert set(latent) == {"samples", NOISE_MASK, FLIPPED, "lora_trainer_flipped_mask", REPEATS}
    cond = lambda v: [[torch.full((1, 2, 3), float(v)), {}]]  # noqa: E731
    entries = variant_conditioning([cond(0), cond(1)]) + cond(5)
    assert [e[1][VARIANT] for e in entries[:2]] == [0, 1]
    out = expand(list(latents.unbind(0)), [[0, 1], [2]], entries, [latent])
    # image 0: itself, flipped × 2 captions; image 1: itself and flipped, one caption, three times
    assert out.samples.alternatives == [[0, 2, 3, 4], [1, 5], [1, 5], [1, 5]]
    assert out.captions[:2] == [[0], [2]] and out.captions[2:] == [[1], [0], [1], [2]]
    assert torch.equal(out.images[3], latents[0].flip(-1)) and out.images[2] is out.images[0]
    plain = expand(list(latents.unbind(0)), [[0], [0]], cond(0), [{"samples": latents}])
    assert plain.samples.alternatives == [[0], [1]] and plain.samples.masks is None


def test_a_mixed_folder_trains_the_tiny_model_from_every_bucket(folder):
    """folder → buckets → expand → train: the loss falls and every bucket's shape reaches the model."""
    buckets = encode_buckets(by_bucket(plan_folder(folder, **PLAN)), Counting(), flip=True)
    latents = [bucket_latent(b.latents, b.flipped, b.masks, b.flipped_masks, [e.repeats for e in b.entries])
               for b in buckets]
    images = [x for b in buckets for x in b.latents.unbind(0)]
    model = build_tiny("eps")
    contexts = encode_captions(["lrt"], model.net.config.context_dim)
    data = expand(images, [[0]] * len(images), [[contexts, {}]], latents)
    fns = tiny_fns(model, contexts)
    shapes = set()
    record = fns.denoise
    fns = fns._replace(denoise=lambda noisy, sigma, idx: shapes.add(tuple(noisy.shape[-2:])) or record(noisy, sigma, idx))
    config = TrainConfig(steps=40, batch_size=4, learning_rate=3e-3, training_dtype="fp32", lora_dtype="fp32",
                         gradient_checkpointing=False)
    result = train(model.net, fns, [x[None] for x in data.images], config, samples=data.samples)
    assert shapes == {(8, 12), (8, 8), (12, 8)}
    assert sum(result.losses[-10:]) < sum(result.losses[:10])


def test_the_fingerprint_follows_edits_to_images_and_captions(folder):
    from comfyui_lora_trainer.training.dataset import folder_fingerprint

    before = folder_fingerprint(folder)
    assert folder_fingerprint(folder) == before
    (folder / "square.txt").write_text("an edited caption, longer than before")
    edited = folder_fingerprint(folder)
    assert edited != before
    picture((64, 64), 5).save(folder / "added.png")
    assert folder_fingerprint(folder) != edited


def test_masks_that_match_no_image_are_refused_naming_the_setting(folder, tmp_path):
    (tmp_path / "wrong_masks").mkdir()
    with pytest.raises(ValueError, match="masks: .*wrong_masks holds no file named like an image"):
        plan_folder(folder, masks="mask folder", mask_root=tmp_path / "wrong_masks", **PLAN)
    with pytest.raises(ValueError, match="masks: no image .* has an alpha channel"):
        plan_folder(folder, masks="alpha channel", **PLAN)


def test_an_image_counts_as_encoded_when_its_mirror_was(folder, tmp_path):
    cache = tmp_path / "cache"
    encode_buckets(by_bucket(plan_folder(folder, **PLAN)), Counting(), cache=LatentCache(cache, "v"))
    vae = Counting()
    buckets = encode_buckets(by_bucket(plan_folder(folder, **PLAN)), vae, cache=LatentCache(cache, "v"), flip=True)
    assert vae.images == 4 and sum(b.encoded for b in buckets) == 4  # only the mirrors were new


def test_with_unmasked_weight_0_pixels_outside_the_mask_do_not_change_the_lora(tmp_path):
    """The whole path from files: an image and its mask file → buckets, masks at the latent size → a
    masked loss on a model that sees each latent cell alone. Repainting the pixels outside the mask (whole
    8×8 cells, which the 8× VAE stand-in keeps apart) leaves the LoRA bit-identical; with weight outside
    the mask it changes it."""
    spec = importlib.util.spec_from_file_location("lora_trainer_test_samples", Path(__file__).with_name("test_samples.py"))
    samples_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(samples_tests)  # its pointwise model and host
    Pointwise, pointwise_fns = samples_tests.Pointwise, samples_tests.pointwise_fns

    def lora(repaint: bool, unmasked_weight: float) -> dict:
        root, masks = tmp_path / f"set_{repaint}_{unmasked_weight}", tmp_path / f"masks_{repaint}_{unmasked_weight}"
        root.mkdir(), masks.mkdir()
        pixels = np.asarray(picture((64, 64), 3))
        if repaint:
            pixels = pixels.copy()
            pixels[:, 32:] = 255 - pixels[:, 32:]  # the right half, outside the mask
        Image.fromarray(pixels).save(root / "a.png")
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[:, :32] = 255
        Image.fromarray(mask).save(masks / "a.png")
        bucket, = encode_buckets(by_bucket(plan_folder(root, resolution=64, step=32, min_side=32, max_side=128,
                                                       masks="mask folder", mask_root=masks)), Counting())
        data = expand(list(bucket.latents.unbind(0)), [[0]], [[torch.zeros(1), {}]],
                      [bucket_latent(bucket.latents, None, bucket.masks, None, [1])])
        net = Pointwise()
        config = TrainConfig(steps=5, learning_rate=1e-2, unmasked_weight=unmasked_weight, training_dtype="fp32",
                             lora_dtype="fp32", gradient_checkpointing=False)
        return train(net, pointwise_fns(net), [x[None] for x in data.images], config, samples=data.samples).lora

    same, repainted = lora(False, 0.0), lora(True, 0.0)
    assert all(torch.equal(same[k], repainted[k]) for k in same)
    same, repainted = lora(False, 0.5), lora(True, 0.5)
    assert any(not torch.equal(same[k], repainted[k]) for k in same)


# ---- pairs: a control folder -----------------------------------------------------------------
@pytest.fixture
def pairs(tmp_path):
    """SIZES' images in set/ (one in a subfolder), and a control for each in controls/ under the same
    relative name: as .jpg, and at twice the image's size (fitted to the image's bucket all the same)."""
    root, controls = tmp_path / "set", tmp_path / "controls"
    for i, (name, size) in enumerate(SIZES.items()):
        sub = "1_sub/" if name == "square.png" else ""
        (root / sub).mkdir(parents=True, exist_ok=True), (controls / sub).mkdir(parents=True, exist_ok=True)
        picture(size, i).save(root / sub / name)
        picture((size[0] * 2, size[1] * 2), 50 + i).save((controls / sub / name).with_suffix(".jpg"), quality=95)
    return root, controls


def test_each_image_is_planned_with_its_control_of_the_same_relative_name(pairs):
    root, controls = pairs
    entries = plan_folder(root, **PLAN, control_root=controls)
    assert {e.path.relative_to(root).as_posix(): e.control.relative_to(controls).as_posix() for e in entries} == {
        "wide_a.png": "wide_a.jpg", "wide_b.png": "wide_b.jpg", "1_sub/square.png": "1_sub/square.jpg",
        "tall.png": "tall.jpg"}
    assert all(e.control is None for e in plan_folder(root, **PLAN))  # no control folder: no partners


def test_images_without_a_control_are_listed_naming_control_folder(pairs):
    root, controls = pairs
    (controls / "tall.jpg").unlink()
    (controls / "1_sub" / "square.jpg").unlink()
    with pytest.raises(ValueError) as err:
        plan_folder(root, **PLAN, control_root=controls)
    assert str(err.value).startswith("control_folder: 2 of 4 images have no control in"), err.value
    assert "1_sub/square.png" in str(err.value) and "tall.png" in str(err.value), err.value
    with pytest.raises(ValueError, match="control_folder: .* is not a folder"):
        plan_folder(root, **PLAN, control_root=controls / "missing")


def test_controls_are_fitted_to_their_images_bucket_and_encoded_and_cached(pairs, tmp_path):
    root, controls = pairs
    vae = Counting()
    buckets = encode_buckets(by_bucket(plan_folder(root, **PLAN, control_root=controls)), vae, chunk=3,
                             cache=LatentCache(tmp_path / "cache", "vae"))
    assert vae.images == 8  # four images, four controls
    for bucket in buckets:
        assert bucket.controls.shape == bucket.latents.shape
        for row, entry in enumerate(bucket.entries):
            with Image.open(entry.control) as img:
                fitted = np.asarray(fit_to_bucket(img.convert("RGB"), bucket.size), dtype=np.float32) / 255
            assert torch.equal(bucket.controls[row], Counting()(torch.from_numpy(fitted)[None])[0])
            assert not torch.equal(bucket.controls[row], bucket.latents[row])
    again = Counting()
    cached = encode_buckets(by_bucket(plan_folder(root, **PLAN, control_root=controls)), again,
                            cache=LatentCache(tmp_path / "cache", "vae"))
    assert again.images == 0 and all(torch.equal(a.controls, b.controls) for a, b in zip(buckets, cached))
    assert describe(cached) == describe(buckets)


def test_flip_with_controls_is_refused_naming_flip(pairs):
    root, controls = pairs
    with pytest.raises(ValueError, match="^flip: a flipped image would keep its unflipped control"):
        encode_buckets(by_bucket(plan_folder(root, **PLAN, control_root=controls)), Counting(), flip=True)


def test_with_reference_appends_as_reference_latent_does_and_leaves_the_input_alone():
    first, second = torch.zeros((1, 4, 8, 8)), torch.ones((1, 4, 8, 8))
    conditioning = [[torch.zeros((1, 3, 8)), {"pooled_output": torch.zeros(1, 8)}], [torch.ones((1, 3, 8)), {}]]
    once = with_reference(conditioning, first)
    twice = with_reference(once, second)
    assert all(REFERENCE_KEY not in options for _, options in conditioning)
    assert [len(options[REFERENCE_KEY]) for _, options in once] == [1, 1]
    assert all(o[REFERENCE_KEY][0] is first and o[REFERENCE_KEY][1] is second for _, o in twice)
    assert twice[0][1]["pooled_output"] is conditioning[0][1]["pooled_output"]


# ---- inpainting: each image with its masked region grey ---------------------------------------
def test_inpaint_encodes_each_image_with_its_mask_region_grey_as_inpaint_model_conditioning(tmp_path):
    root, masks = tmp_path / "set", tmp_path / "masks"
    root.mkdir(), masks.mkdir()
    picture((64, 64), 1).save(root / "a.png")
    picture((64, 64), 2).save(root / "b.png")  # no mask: nothing to paint, its own pixels
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8:40, 16:48] = 255
    mask[0, 0] = 100  # under one half: InpaintModelConditioning rounds the mask, so this pixel is kept
    Image.fromarray(mask).save(masks / "a.png")
    plan = dict(resolution=64, step=32, min_side=32, max_side=128)
    vae = Counting()
    bucket = encode_buckets(by_bucket(plan_folder(root, masks="mask folder", mask_root=masks, **plan)), vae,
                            inpaint=True)[0]
    assert vae.images == 4  # each image, and each masked image
    with Image.open(root / "a.png") as img:
        pixels = np.asarray(img.convert("RGB"))
    image = pixels.astype(np.float32) / 255
    keep = np.ones((64, 64, 1), dtype=np.float32)
    keep[8:40, 16:48] = 0  # the rounded mask by hand: [0, 0] (100/255) rounds to 0, so it is kept
    grey = (image - np.float32(0.5)) * keep + np.float32(0.5)  # (pixels − 0.5) · (1 − round(mask)) + 0.5
    assert np.all(grey[8:40, 16:48] == 0.5) and np.allclose(grey[0, 0], image[0, 0])
    assert np.array_equal(inpaint_pixels(pixels, mask.astype(np.float32) / 255), grey)
    assert torch.equal(bucket.inpaint[0], Counting()(torch.from_numpy(grey)[None])[0])
    with Image.open(root / "b.png") as img:
        assert torch.equal(bucket.inpaint[1], Counting()(torch.from_numpy(np.asarray(img.convert("RGB"))
                                                                           .astype(np.float32) / 255)[None])[0])
    with pytest.raises(ValueError, match="^flip: a flipped image would keep its unflipped inpainting image"):
        encode_buckets(by_bucket(plan_folder(root, masks="mask folder", mask_root=masks, **plan)), Counting(),
                       inpaint=True, flip=True)


def test_with_concat_image_sets_the_masked_image_and_the_mask_on_copies():
    latent, mask = torch.ones((1, 4, 8, 8)), torch.zeros((1, 1, 8, 8))
    conditioning = [[torch.zeros((1, 3, 8)), {"pooled_output": torch.zeros(1, 8)}]]
    out = with_concat_image(conditioning, latent, mask)
    assert out[0][1][CONCAT_KEY] is latent and out[0][1][CONCAT_MASK_KEY] is mask
    assert CONCAT_KEY not in conditioning[0][1] and out[0][1]["pooled_output"] is conditioning[0][1]["pooled_output"]
