"""The pretrained tiny base: the procedural pictures, the pretraining script, the shipped file, the
colour-histogram style measure."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from comfyui_lora_trainer.tiny import procedural
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny, encode_images
from comfyui_lora_trainer.tiny.pretrain import (
    PretrainSettings, _contexts, file_metadata, learning_rate, pretrain, save_base, shape_scores,
)
from comfyui_lora_trainer.tiny.pretrained import (
    BASE_FILE, METADATA_KEYS, load_pretrained, read_metadata, settings_digest, weights_digest,
)
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.evaluate import colour_distance, heldout_loss

CAPTION = re.compile(r"^(an? )?(\w+) (circle|square|triangle|ring|stripes|dots) on an? (\w+) background$")
TINY_RUN = PretrainSettings(steps=3, batch_size=2, warmup_steps=2)


def test_pictures_are_seeded_and_captioned():
    images, captions = procedural.fresh_set(12, 16)
    again, same = procedural.fresh_set(12, 16)
    assert images.shape == (12, 16, 16, 3) and images.dtype == torch.float32
    assert torch.equal(images, again) and captions == same
    assert not torch.equal(images, procedural.fresh_set(12, 16, seed=1)[0])
    for image, caption in zip(images, captions):
        fg, bg = CAPTION.match(caption).group(2, 4)
        assert fg != bg and {fg, bg} <= set(procedural.COLOURS)
        # Every pixel mixes the two named colours (edges are box-filtered), and both appear pure.
        pixels = image.reshape(-1, 3).double() * 255
        a, b = (torch.tensor(procedural.COLOURS[c], dtype=torch.float64) for c in (fg, bg))
        share = ((pixels - b) @ (a - b) / (a - b).square().sum()).clamp(0, 1)
        assert torch.allclose(b + share[:, None] * (a - b), pixels, atol=1e-3)
        assert (share > 1 - 1e-6).any() and (share < 1e-6).any()


def test_shape_recognition_reads_the_pictures_own_shapes():
    """The measure of the base's samples, on pictures whose shapes are known: nearly all recognised, no
    colour error; the same pictures under the wrong captions' colours lose their shapes."""
    images, captions = procedural.fresh_set(48, 32, seed=5)
    keep = [i for i, c in enumerate(captions) if procedural.caption_parts(c)[0] in procedural.CENTRED_SHAPES]
    templates = procedural.shape_templates(32)
    drawn, errors = procedural.recognise_shapes(images[keep], [captions[i] for i in keep], templates)
    right = sum(shape == procedural.caption_parts(captions[i])[0] for shape, i in zip(drawn, keep))
    assert len(keep) >= 24 and right >= 0.9 * len(keep) and max(errors) < 1e-6
    noise = torch.rand(len(keep), 32, 32, 3, generator=torch.Generator().manual_seed(0))
    assert min(procedural.recognise_shapes(noise, [captions[i] for i in keep], templates)[1]) > 0.2
    assert procedural.caption_parts("an orange ring on a blue background") == ("ring", "orange", "blue")
    assert procedural.caption_parts("red stripes on a gray background") == ("stripes", "red", "gray")
    assert procedural.caption_parts("a red sun over yellow and navy bands, lrtstyle") is None


def test_pretraining_contexts_are_the_text_encoders():
    captions = procedural.fresh_set(5, 8)[1]
    assert torch.equal(_contexts(captions, 64, {}), encode_captions(captions, 64))


def test_learning_rate_warms_up_then_decays_to_the_floor():
    s = PretrainSettings(steps=50, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    lrs = [learning_rate(step, s) for step in range(50)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("field, value, match", [
    ("steps", 0, "steps: got 0"), ("ema_decay", 1.0, "ema_decay: got 1.0"),
    ("seed", procedural.FRESH_SEED, "held-out sets' seed"),
])
def test_bad_settings_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        PretrainSettings(**{field: value})


def test_pretraining_is_deterministic_and_restores_torch_state():
    threads, rng_state = torch.get_num_threads(), torch.get_rng_state()
    first, second = pretrain(TINY_RUN), pretrain(TINY_RUN)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng_state)
    assert weights_digest(first.state_dict) == weights_digest(second.state_dict)
    assert first.losses == second.losses and len(first.losses) == 3
    other = pretrain(replace(TINY_RUN, seed=1))
    assert weights_digest(other.state_dict) != weights_digest(first.state_dict)


def test_saved_base_loads_and_carries_its_settings(tmp_path):
    result = pretrain(TINY_RUN)
    path = save_base(tmp_path / "base.safetensors", result.state_dict, file_metadata(TINY_RUN, result))
    assert [p.name for p in tmp_path.iterdir()] == ["base.safetensors"]  # no temp file left
    metadata = read_metadata(path)
    assert set(metadata) == set(METADATA_KEYS) and metadata["settings"] == TINY_RUN.to_json()
    model = load_pretrained(path)
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in result.state_dict.items())
    assert not model.net.training and not any(p.requires_grad for p in model.net.parameters())
    save_base(tmp_path / "other.safetensors", result.state_dict, {"format": "something else"})
    with pytest.raises(ValueError, match="format 'something else'"):
        read_metadata(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="scripts/pretrain.sh"):
        read_metadata(tmp_path / "missing.safetensors")


def test_shipped_base_matches_the_script_settings():
    metadata = read_metadata(BASE_FILE)
    assert metadata["settings"] == PretrainSettings().to_json()
    assert metadata["settings_sha256"] == settings_digest(metadata["settings"])
    assert metadata["steps"] == str(json.loads(metadata["settings"])["steps"])
    assert metadata["weights_sha256"] == weights_digest(load_file(str(BASE_FILE)))
    assert BASE_FILE.stat().st_size < 8 * 2 ** 20


def test_shipped_base_beats_random_weights_on_fresh_pictures():
    images, captions = procedural.fresh_set(6, PretrainSettings.size)
    latents = encode_images(images)
    contexts = encode_captions(captions, 64)
    pretrained = load_pretrained()
    random = build_tiny("eps", pretrained.net.config)
    trained_loss = heldout_loss(tiny_fns(pretrained, contexts), latents)
    random_loss = heldout_loss(tiny_fns(random, contexts), latents)
    assert trained_loss < 0.3 * random_loss, (trained_loss, random_loss)


def test_shipped_base_draws_the_captions_shapes_in_their_colours():
    """Samples of 24 fresh captions of circles, squares, triangles and rings (measured: all 24 drawn as
    the caption's shape, colour error 0.042; random weights 29 %, 0.756)."""
    (right, error), (right_random, error_random) = shape_scores(BASE_FILE)
    assert right >= 0.9 and error < 0.08, (right, error)
    assert right_random < 0.5 and error_random > 0.5, (right_random, error_random)


@pytest.mark.slow
def test_pretraining_reproduces_the_shipped_weights():
    """Reruns the full pretraining (about 40 minutes on two idle cores): same settings → same weights."""
    result = pretrain(PretrainSettings())
    assert weights_digest(result.state_dict) == read_metadata(BASE_FILE)["weights_sha256"]


def test_colour_distance_is_zero_for_the_same_colours_and_grows_with_the_difference():
    red = torch.zeros(2, 4, 4, 3)
    red[..., 0] = 1.0
    shuffled = red[:, torch.randperm(4)].reshape(1, 8, 4, 3)  # same pixels, other shape
    near, far = red.clone(), red.flip(-1)  # near: a slightly darker red; far: blue
    near[..., 0] = 0.9
    assert colour_distance(red, shuffled) == 0.0
    assert 0 < colour_distance(red, near) < colour_distance(red, far)
    black, white = torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2, 3)
    assert colour_distance(black, white) == pytest.approx(1.0, abs=0.2)
    with pytest.raises(ValueError, match=r"reference: got shape \(4, 4, 3\)"):
        colour_distance(red, red[0])
