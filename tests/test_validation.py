"""The validation loss (training/validation.py) on the tiny model, and its line on the loss graph.

Checked: the same weights give the same number bit-for-bit, from its own RNG (the global and the
training streams untouched); it is measured before the first step, every `every` steps and after
the last; the LoRA trained with a validation set is bit-identical to one trained without; it keeps
no graph; it falls on the training images and rises on held-out ones once the LoRA overfits; it is
the config's loss (function, space) over every image × the fixed levels; its own captions work
through tiny_fns; errors name the input. The plot draws the line and the node's LOSS_MAP reading.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comfyui_lora_trainer.lora import inject
from comfyui_lora_trainer.nodes.loss_map import validation_points
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny, encode_images
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.evaluate import level_percents
from comfyui_lora_trainer.training.loop import lora_config_of, train
from comfyui_lora_trainer.training.objective import loss_function, output_coefficient
from comfyui_lora_trainer.training.plot import plot_losses
from comfyui_lora_trainer.training.validation import Validation

FAST = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)


def ramps(n: int = 4, size: int = 16) -> torch.Tensor:
    """n structured images (ramps of different colours) as tiny-model latents."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return encode_images(torch.stack([torch.stack([xx, yy * (i + 1) / n, 1 - xx], -1) for i in range(n)]))


def setup(kind: str = "eps"):
    model = build_tiny(kind)
    contexts = encode_captions(["a ramp, lrtstyle"], model.net.config.context_dim)
    return model, contexts, tiny_fns(model, contexts)


def held_out(n: int = 2, size: int = 16) -> torch.Tensor:
    """Images unlike the ramps: seeded noise latents."""
    return torch.randn(n, 4, size, size, generator=torch.Generator().manual_seed(7))


def test_deterministic_from_its_own_rng():
    model, _, fns = setup()
    config = TrainConfig(**FAST)
    torch.manual_seed(123)
    global_before = torch.get_rng_state()
    first = Validation(fns, ramps(), config, every=5)
    again = [first.loss(), first.loss()]
    torch.manual_seed(999)  # a different global RNG state changes nothing
    second = Validation(fns, ramps(), config, every=5).loss()
    assert again[0] == again[1] == second  # bit-for-bit, not approximately
    torch.manual_seed(123)
    Validation(fns, ramps(), config, every=5).loss()
    assert torch.equal(torch.get_rng_state(), global_before)  # the global RNG is not drawn from
    assert math.isfinite(second) and second > 0


def test_measured_before_the_first_step_every_n_and_after_the_last():
    model, _, fns = setup()
    validator = Validation(fns, held_out(), TrainConfig(**FAST), every=3)
    base = validator.loss()
    result = train(model.net, fns, ramps(), TrainConfig(steps=7, **FAST), validator=validator)
    assert [step for step, _ in result.validation] == [0, 3, 6, 7]
    assert all(math.isfinite(v) for _, v in result.validation)
    assert result.validation[0][1] == pytest.approx(base, rel=1e-6)  # step 0: the untrained model (up = 0)
    assert len({v for _, v in result.validation}) == 4  # it tracks the weights as they change
    exact = train(model.net, fns, ramps(), TrainConfig(steps=6, **FAST), validator=validator)
    assert [step for step, _ in exact.validation] == [0, 3, 6]  # the last step is measured once


@pytest.mark.parametrize("options", [dict(FAST), dict(network_dropout=0.2, batch_size=2)])
def test_training_with_validation_gives_a_bit_identical_lora(options):
    """Default dtypes (bf16 autocast, gradient checkpointing) and dropout too: the validation forward
    runs outside the training's RNG streams and its checkpointed graph."""
    model, _, fns = setup()
    config = TrainConfig(steps=5, learning_rate=2e-3, seed=4, **options)
    plain = train(model.net, fns, ramps(), config)
    validator = Validation(fns, held_out(), config, every=2)
    watched = train(model.net, fns, ramps(), config, validator=validator)
    assert len(watched.validation) == 4 and not plain.validation
    assert plain.losses == watched.losses
    assert plain.lora.keys() == watched.lora.keys()
    assert all(torch.equal(plain.lora[k], watched.lora[k]) for k in plain.lora)


def test_keeps_no_graph():
    model, _, fns = setup()
    outputs = []

    def recording(noisy, sigma, indices):
        out = fns.denoise(noisy, sigma, indices)
        outputs.append(out)
        return out

    validator = Validation(fns._replace(denoise=recording), held_out(), TrainConfig(**FAST), every=1)
    with inject(model.net, lora_config_of(TrainConfig(**FAST)), seed=0) as network:
        params = list(network.parameters())
        assert params and all(p.requires_grad for p in params)
        with torch.enable_grad():
            value = validator.loss()
        assert all(p.grad is None for p in params)
    assert math.isfinite(value) and outputs
    assert all(out.grad_fn is None and not out.requires_grad for out in outputs)


def test_falls_on_the_training_images_and_rises_on_held_out_ones():
    """v-prediction, 4 ramps, lr 2e-3: the training images' loss falls steadily, while the held-out
    images' loss ends above where it began: the LoRA overfits the ramps. (Measured: training-set
    0.74 → 0.29, held-out noise 1.15 → 1.36 over 60 steps.)"""
    model, _, fns = setup("v")
    config = TrainConfig(steps=60, learning_rate=2e-3, batch_size=4, **FAST)
    on_training = Validation(fns, ramps(), config, every=20)
    first = train(model.net, fns, ramps(), config, validator=on_training)
    seen = [v for _, v in first.validation]
    assert all(b < a for a, b in zip(seen, seen[1:])) and seen[-1] < 0.5 * seen[0], seen
    on_held_out = Validation(fns, held_out(), config, every=20)
    second = train(model.net, fns, ramps(), config, validator=on_held_out)
    unseen = [v for _, v in second.validation]
    assert unseen[-1] > 1.1 * unseen[0], unseen


def test_is_the_configs_loss_over_every_image_and_fixed_level():
    """Each (image, level) pair recomputed by hand from the fixed noisy latents, one at a time, for
    both loss spaces and a non-MSE loss; the levels are the bin midpoints through the schedule."""
    model, _, fns = setup("v")
    assert torch.allclose(level_percents(4), torch.tensor([0.125, 0.375, 0.625, 0.875]))
    latents = [ramps(3), held_out(1, 8)]  # two shapes
    for space, loss_name in [("native", "MSE"), ("x0", "L1")]:
        config = TrainConfig(batch_size=2, loss_space=space, loss_function=loss_name, **FAST)
        validator = Validation(fns, latents, config, every=1, noise_levels=4)
        assert [len(c.indices) for c in validator.chunks] == [2, 2, 2, 2, 2, 2, 2, 2]  # 3·4 pairs, then 1·4
        assert all(c.noisy.shape[0] == len(c.indices) for c in validator.chunks)
        sigmas = torch.cat([c.sigma for c in validator.chunks])
        assert torch.equal(sigmas, fns.percent_to_sigma(level_percents(4)).repeat(4))
        by_hand = []
        for chunk in validator.chunks:
            for row, index in enumerate(chunk.indices):
                sigma = chunk.sigma[row:row + 1]
                pred = fns.denoise(chunk.noisy[row:row + 1], sigma, [index])
                scale = output_coefficient(fns, sigma) if space == "native" else 1.0
                by_hand.append(loss_function(loss_name)(pred / scale, chunk.target[row:row + 1] / scale).mean().item())
        assert len(by_hand) == 16
        assert validator.loss() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)


def test_bf16_runs_under_the_trainings_autocast():
    model, _, fns = setup()
    seen = []

    def recording(noisy, sigma, indices):
        seen.append(torch.is_autocast_enabled("cpu"))
        return fns.denoise(noisy, sigma, indices)

    fp32 = Validation(fns, held_out(), TrainConfig(training_dtype="fp32"), every=1).loss()
    bf16 = Validation(fns._replace(denoise=recording), held_out(), TrainConfig(training_dtype="bf16"), every=1).loss()
    assert seen and all(seen)
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)


def test_a_second_caption_set_through_tiny_fns():
    """The validation images carry their own captions (one per image) through a second tiny_fns;
    training uses its own. The caption changes the number, and training with it runs."""
    model, contexts, fns = setup()
    dim = model.net.config.context_dim
    own = tiny_fns(model, encode_captions(["a dark square", "noise, lrtstyle"], dim))
    config = TrainConfig(steps=4, learning_rate=2e-3, **FAST)
    with_own = Validation(own, held_out(), config, every=2)
    with_training_caption = Validation(tiny_fns(model, contexts), held_out(), config, every=2)
    assert with_own.loss() != with_training_caption.loss()
    plain = train(model.net, fns, ramps(), config)
    result = train(model.net, fns, ramps(), config, validator=with_own)
    assert [s for s, _ in result.validation] == [0, 2, 4]
    assert all(torch.equal(plain.lora[k], result.lora[k]) for k in plain.lora)


def test_accepts_single_latents_and_a_batch_alike():
    _, _, fns = setup()
    config = TrainConfig(**FAST)
    batch = held_out(2)
    assert (Validation(fns, batch, config, every=1).loss()
            == Validation(fns, list(batch.unbind(0)), config, every=1).loss()
            == Validation(fns, [batch[:1], batch[1:]], config, every=1).loss())


def test_errors_name_the_input_and_the_fix():
    _, _, fns = setup()
    config = TrainConfig(**FAST)
    with pytest.raises(ValueError, match="validation latents: no images; connect at least one"):
        Validation(fns, [], config, every=1)
    with pytest.raises(ValueError, match=r"validation latents\[0\]: got \(4, 16\); give VAE-encoded latents"):
        Validation(fns, [torch.zeros(4, 16)], config, every=1)
    with pytest.raises(ValueError, match="validation every: got 0; give 1 or more"):
        Validation(fns, held_out(), config, every=0)
    with pytest.raises(ValueError, match="validation noise_levels: got 0; give 1 or more"):
        Validation(fns, held_out(), config, every=1, noise_levels=0)


# ---- the loss graph -------------------------------------------------------------------------
def test_plot_draws_the_validation_line():
    losses = list(np.exp(-np.arange(30) / 10.0))
    plain = plot_losses(losses)
    with_validation = plot_losses(losses, validation=[(0, 1.2), (10, 0.6), (20, 0.5), (30, 0.55)])
    assert plain.shape == with_validation.shape == (450, 800, 3)
    assert not np.array_equal(plain, with_validation)
    orange = np.array([255, 127, 14])  # tab:orange, the validation line's colour
    assert not np.any(np.all(plain == orange, -1))
    assert np.count_nonzero(np.all(with_validation == orange, -1)) > 200
    assert plot_losses([0.5], validation=[(0, 0.7)]).std() > 0  # one point each draws too


def test_the_loss_map_validation_keys():
    assert validation_points({"loss": [1.0]}) == []
    assert validation_points({"loss": [1.0, 0.5], "validation_step": [0, 2],
                              "validation_loss": [0.9, 0.4]}) == [(0, 0.9), (2, 0.4)]
    with pytest.raises(ValueError, match="loss: the validation lists do not match"):
        validation_points({"loss": [1.0], "validation_step": [0, 1], "validation_loss": [0.9]})
    with pytest.raises(ValueError, match="connect Train LoRA's loss output unchanged"):
        validation_points({"loss": [1.0], "validation_loss": [0.9]})


def test_the_validation_set_node_refuses_a_caption_count_that_fits_neither():
    from comfyui_lora_trainer.nodes.validation import ValidationSet

    latents = [{"samples": torch.zeros(2, 4, 8, 8)}, {"samples": torch.zeros(1, 4, 16, 16)}]
    (settings,) = ValidationSet().execute(latents, [["c1"], ["c2"], ["c3"]], [5], [3])  # one per image
    assert (settings.every, settings.noise_levels, len(settings.latents)) == (5, 3, 2)
    ValidationSet().execute(latents, [["c"]], [5], [3])  # one for all
    with pytest.raises(ValueError, match="positive: got 2 captions for 3 images; give 1 for all images"):
        ValidationSet().execute(latents, [["c1"], ["c2"]], [5], [3])
