"""What a batch draws (training/data.py `Samples`) and the masked loss (training/objective.py `mask_weights`).

Samples: alternatives of one sample (a flipped copy, caption variants) are drawn uniformly and seeded,
so a resumed run stays bit-identical; plain samples draw exactly as before. Masks: with
`unmasked_weight` 0 the loss never looks outside the mask, so on a model without spatial mixing
changing the latent there cannot change the LoRA, and on the tiny model the masked area is learnt.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from comfyui_lora_trainer.nodes.checkpoints import CheckpointWriter
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.data import Samples, latent_mask
from comfyui_lora_trainer.training.loop import Hooks, train
from comfyui_lora_trainer.training.objective import ModelFns, mask_weights

FAST = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)


class Pointwise(nn.Module):
    """A denoiser that sees each latent cell alone (Linear layers over channels): no spatial mixing."""

    def __init__(self, channels: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(channels, 16)
        self.outer = nn.Linear(16, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.tanh(self.inner(x.movedim(1, -1)))).movedim(-1, 1)


def pointwise_fns(net: Pointwise) -> ModelFns:
    """eps prediction in ComfyUI's VE view: x = x0 + σ·ε, x0 = x − σ·net(x)."""
    shape = lambda s, x: s.reshape(-1, *[1] * (x.dim() - 1)).to(x)  # noqa: E731
    return ModelFns(percent_to_sigma=lambda p: 0.1 + 5 * (1 - p),
                    noise_scaling=lambda s, n, x: x + shape(s, x) * n,
                    calculate_denoised=lambda s, out, x: x - shape(s, x) * out,
                    denoise=lambda noisy, s, indices: noisy - shape(s, noisy) * net(noisy))


def masked_run(latents: torch.Tensor, mask: torch.Tensor, unmasked_weight: float) -> dict:
    net = Pointwise()
    config = TrainConfig(steps=6, batch_size=2, learning_rate=1e-2, unmasked_weight=unmasked_weight, **FAST)
    samples = Samples([[0], [1]], [mask, mask])
    return train(net, pointwise_fns(net), latents, config, samples=samples).lora


def test_with_unmasked_weight_0_the_latent_outside_the_mask_cannot_change_the_lora():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 1:5] = 1
    changed = latents.clone()
    changed[:, :, mask[0] == 0] = torch.randn_like(changed[:, :, mask[0] == 0]) * 3
    first, second = masked_run(latents, mask, 0.0), masked_run(changed, mask, 0.0)
    assert all(torch.equal(first[k], second[k]) for k in first)
    # the same change with weight outside the mask does change it: the test can fail
    first, second = masked_run(latents, mask, 0.5), masked_run(changed, mask, 0.5)
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_mask_weights_blend_and_normalise():
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    assert torch.equal(mask_weights(mask, 0.0, False), mask)
    assert torch.allclose(mask_weights(mask, 0.2, False), torch.tensor([[[[1.0, 0.2], [0.6, 0.2]]]]))
    normalised = mask_weights(mask, 0.0, True)
    assert torch.allclose(normalised.mean(), torch.tensor(1.0)) and torch.allclose(normalised, mask / 0.375)
    assert torch.equal(mask_weights(torch.zeros(1, 1, 2, 2), 0.0, True), torch.zeros(1, 1, 2, 2))


def test_latent_mask_is_the_area_mean_at_the_latent_size_and_spans_the_frames():
    pixels = torch.zeros(16, 16)
    pixels[:, :6] = 1  # 6 of the 8 pixel columns of latent column 0 (cells 8 wide at an 8× VAE… here 2 cells)
    small = latent_mask(pixels, (4, 2, 2))
    assert small.shape == (1, 2, 2)
    assert torch.allclose(small, torch.tensor([[[0.75, 0.0], [0.75, 0.0]]]))
    video = latent_mask(pixels, (16, 3, 2, 2))
    assert video.shape == (1, 3, 2, 2) and torch.equal(video[:, 1], small)


def tiny_setup():
    model = build_tiny("eps")
    contexts = encode_captions(["a ramp, lrtstyle"], model.net.config.context_dim)
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    return model, tiny_fns(model, contexts), latents


def test_plain_samples_train_exactly_as_no_samples():
    config = TrainConfig(steps=3, batch_size=2, learning_rate=2e-3, **FAST)
    model, fns, latents = tiny_setup()
    one = train(model.net, fns, latents, config).lora
    two = train(model.net, fns, latents, config, samples=Samples.plain(3)).lora
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_alternatives_are_drawn_uniformly_and_repeats_weigh_a_sample():
    samples = Samples([[0, 3], [1, 4], [2, 2, 5]])  # sample 2: image 2 twice as likely as image 5
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    for _ in range(3000):
        for i in samples.pick([0, 1, 2], generator):
            counts[i] += 1
    assert abs(counts[0] - counts[3]) < 200 and abs(counts[1] - counts[4]) < 200
    assert 1800 < counts[2] < 2200 and 800 < counts[5] < 1200


def test_alternatives_resume_bit_identically(tmp_path):
    model, fns, latents = tiny_setup()
    flipped = latents.flip(-1)
    images = torch.cat([latents, flipped])
    samples = Samples([[0, 3], [1, 4], [2, 5]])
    config = TrainConfig(steps=6, batch_size=2, learning_rate=2e-3, batch_order="epoch", **FAST)

    def run(folder, cfg):
        writer = CheckpointWriter(folder, cfg, list(images.unbind(0)), 1)
        return train(model.net, fns, images, cfg, samples=samples, resume=writer.resume(),
                     hooks=Hooks(save=writer.save))

    straight = run(tmp_path / "one", config)
    run(tmp_path / "two", replace(config, steps=3, save_every=3))
    resumed = run(tmp_path / "two", replace(config, resume="latest"))
    assert resumed.losses == straight.losses
    assert all(torch.equal(resumed.lora[k], straight.lora[k]) for k in straight.lora)
    unflipped = train(model.net, fns, images, config, samples=Samples([[0], [1], [2]])).lora
    assert any(not torch.equal(unflipped[k], straight.lora[k]) for k in unflipped)


def test_a_masked_region_is_learnt_on_the_tiny_model():
    """Training on a mask's area lowers the error there more than outside it."""
    model, fns, latents = tiny_setup()
    mask = torch.zeros(1, 16, 16)
    mask[:, :, :8] = 1
    config = TrainConfig(steps=40, batch_size=3, learning_rate=3e-3, **FAST)
    result = train(model.net, fns, latents, config, samples=Samples([[0], [1], [2]], [mask] * 3))
    assert result.losses[-10:] and sum(result.losses[-10:]) / 10 < sum(result.losses[:10]) / 10


@pytest.mark.parametrize("bad, named", [(Samples([[0], [7]]), "image 7"),
                                        (Samples([[0]], [torch.ones(1, 3, 3)]), "masks")])
def test_bad_samples_are_refused(bad, named):
    model, fns, latents = tiny_setup()
    with pytest.raises(ValueError, match=named):
        train(model.net, fns, latents, TrainConfig(steps=1, **FAST), samples=bad)


def test_control_dropout_trains_some_images_bare_and_resumes_bit_identically(tmp_path):
    """The tiny model has no condition image: its bare captions stand in as another caption. p 0 trains as
    the option did not exist, p 1 trains only on the bare captions, and a run cut at step 3 and resumed
    draws the same rows bare as the straight run."""
    model = build_tiny("eps")
    contexts = encode_captions(["a ramp, lrtstyle", "a ramp"], model.net.config.context_dim)
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    fns, bare = tiny_fns(model, contexts[:1]), tiny_fns(model, contexts[1:])
    with_bare = fns._replace(denoise_bare=bare.denoise)
    config = TrainConfig(steps=6, batch_size=2, learning_rate=2e-3, control_dropout=0.5, **FAST)

    def run(folder, cfg):
        writer = CheckpointWriter(folder, cfg, list(latents.unbind(0)), 1)
        return train(model.net, with_bare, latents, cfg, resume=writer.resume(), hooks=Hooks(save=writer.save))

    straight = run(tmp_path / "one", config)
    run(tmp_path / "two", replace(config, steps=3, save_every=3))
    resumed = run(tmp_path / "two", replace(config, resume="latest"))
    assert resumed.losses == straight.losses
    assert all(torch.equal(resumed.lora[k], straight.lora[k]) for k in straight.lora)
    plain = replace(config, control_dropout=0.0)
    off, never = train(model.net, with_bare, latents, plain).lora, train(model.net, fns, latents, plain).lora
    assert all(torch.equal(off[k], never[k]) for k in off)  # p 0: the bare captions are never used
    assert any(not torch.equal(off[k], straight.lora[k]) for k in off)
    always = train(model.net, with_bare, latents, replace(config, control_dropout=1.0)).lora
    # p 1: every row bare, so it trains as a run whose captions are the bare ones (same draws, same routes)
    bare_only = train(model.net, bare._replace(denoise_bare=bare.denoise), latents,
                      replace(config, control_dropout=1.0)).lora
    assert all(torch.equal(always[k], bare_only[k]) for k in always)
