"""Train LoRA's previews without ComfyUI: the labelled grid (training/grid.py), the isolation a preview
sample runs under (training/isolation.py), and a bit-identical LoRA with a sampling hook in the loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.grid import BACKGROUND, label_height, labelled_grid, layout
from comfyui_lora_trainer.training.isolation import isolated
from comfyui_lora_trainer.training.loop import Hooks, train


def _noise_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- the grid ----------------------------------------------------------------------------
@pytest.mark.parametrize("count, rows, columns", [(1, 1, 1), (2, 1, 2), (3, 2, 2), (4, 2, 2), (5, 2, 3), (10, 3, 4)])
def test_layout_is_near_square_rows_first(count, rows, columns):
    plan = layout(count, 64, 96)
    assert (plan.rows, plan.columns) == (rows, columns)
    assert plan.size == (rows * (64 + label_height(96)), columns * 96)


def test_each_image_sits_under_its_label_in_step_order():
    images = [_noise_image(64, 48, seed) for seed in range(3)]
    grid = labelled_grid(images, ["step 0", "step 50", "step 100"])
    plan = layout(3, 64, 48)
    assert grid.shape == (*plan.size, 3) and grid.dtype == np.uint8
    for i, image in enumerate(images):
        top, left = (i // plan.columns) * plan.cell_height, (i % plan.columns) * plan.cell_width
        assert np.array_equal(grid[top + plan.label_height: top + plan.cell_height, left: left + 48], image), i
        strip = grid[top: top + plan.label_height, left: left + 48]
        assert (strip != BACKGROUND).any(axis=-1).sum() > 20, f"no label drawn over image {i}"
    # the fourth cell of the 2×2 grid stays empty
    assert (grid[plan.cell_height:, plan.cell_width:] == BACKGROUND).all()
    strips = [grid[:plan.label_height, :48], grid[:plan.label_height, 48:96]]
    assert not np.array_equal(*strips), "different steps, same label"


def test_smaller_images_are_centred_in_the_largest_cell():
    big, small = _noise_image(32, 32, 1), _noise_image(16, 8, 2)
    grid = labelled_grid([big, small], ["step 1", "step 2"])
    strip = label_height(32)
    assert grid.shape == (32 + strip, 64, 3)
    assert np.array_equal(grid[strip + 8: strip + 24, 32 + 12: 32 + 20], small)
    assert (grid[strip: strip + 8, 32:] == BACKGROUND).all()


def test_bad_grid_input_names_it():
    image = _noise_image(8, 8, 0)
    with pytest.raises(ValueError, match=r"labels: got 1 labels for 2 images"):
        labelled_grid([image, image], ["step 0"])
    with pytest.raises(ValueError, match=r"previews: no preview was taken"):
        labelled_grid([], [])
    with pytest.raises(ValueError, match=r"images\[0\]: got float32 \(8, 8, 3\); give uint8"):
        labelled_grid([image.astype(np.float32)], ["step 0"])


# ---- isolation ---------------------------------------------------------------------------
def _sampler_side_effects(module: torch.nn.Module) -> None:
    """What a sampler could do: reseed and draw from the global RNG, switch modes, touch requires_grad."""
    torch.manual_seed(1234)
    torch.randn(100)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(not p.requires_grad)


def test_isolated_leaves_the_global_rng_modes_and_grad_mode_as_they_were():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    net[0].bias.requires_grad_(False)
    torch.manual_seed(7)
    expected = torch.randn(5)
    torch.manual_seed(7)
    with isolated(net):
        assert not torch.is_grad_enabled()
        _sampler_side_effects(net)
        assert net(torch.ones(1, 4)).grad_fn is None
    assert torch.equal(torch.randn(5), expected), "the global RNG moved"
    assert torch.is_grad_enabled() and all(m.training for m in net.modules())
    assert net[0].weight.requires_grad and not net[0].bias.requires_grad


def test_isolated_restores_on_error():
    net = torch.nn.Linear(2, 2).train()
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    with pytest.raises(KeyboardInterrupt):  # like ComfyUI's cancel: not an Exception
        with isolated(net):
            _sampler_side_effects(net)
            raise KeyboardInterrupt
    assert torch.equal(torch.rand(3), expected) and net.training and net.weight.requires_grad


def test_training_draws_from_nothing_a_sampler_touches():
    """A preview hook that reseeds the global RNG, switches modes and flips requires_grad (no isolation):
    the LoRA is still bit-identical, since the engine's streams are its own. Dropout and gradient
    checkpointing on: the paths that replay RNG states. (isolated() additionally keeps the caller's RNG.)"""
    model = build_tiny("eps")
    fns = tiny_fns(model, encode_captions(["a ramp, lrtstyle"], model.net.config.context_dim))
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    config = TrainConfig(steps=4, learning_rate=2e-3, training_dtype="fp32", lora_dtype="fp32",
                         gradient_checkpointing=True, network_dropout=0.2, module_dropout=0.1)
    plain = train(model.net, fns, latents, config)
    sampled = []

    def sample(state) -> None:  # a preview: the current LoRA denoising, with a sampler's side effects
        with torch.no_grad():
            _sampler_side_effects(model.net)
            x = torch.randn(1, 4, 16, 16)
            sampled.append(fns.denoise(x, fns.percent_to_sigma(torch.tensor([0.5])), [0]))

    previewed = train(model.net, fns, latents, config, hooks=Hooks(on_step=sample, on_start=sample))
    assert len(sampled) == 5 and not torch.equal(sampled[0], sampled[-1]), "the samples did not see the LoRA train"
    assert previewed.losses == plain.losses
    assert previewed.lora.keys() == plain.lora.keys()
    assert all(torch.equal(previewed.lora[k], plain.lora[k]) for k in plain.lora)
