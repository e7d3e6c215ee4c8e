"""Video latents (B, C, T, H, W), as Wan's: the engine takes any rank from 4 up (training/data.py,
objective.py, validation.py). A tiny 3-D conv denoiser stands in for a video model here; the real Wan
model in ComfyUI is tests/integration/test_families_video.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from comfyui_lora_trainer.lora import merge_lora, resolve_state_dict
from comfyui_lora_trainer.tiny.schedules import make_schedule
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.data import as_model_rank, check_latent_rank, flatten_latents
from comfyui_lora_trainer.training.loop import train
from comfyui_lora_trainer.training.objective import ModelFns, Objective, output_coefficient, pyramid_noise
from comfyui_lora_trainer.training.validation import Validation, validation_images

FAST = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)


class TinyVideoNet(nn.Module):
    """Conv3d in → a sigma-conditioned Linear over channels → Conv3d out: the layer kinds of Wan's
    patch embedding and blocks, small enough for a CPU test."""

    def __init__(self, channels: int = 4, width: int = 16):
        super().__init__()
        self.conv_in = nn.Conv3d(channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.mix = nn.Linear(width, width)
        self.conv_out = nn.Conv3d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x) + self.time(t[:, None])[:, :, None, None, None]
        h = self.mix(torch.nn.functional.silu(h).movedim(1, -1)).movedim(-1, 1)
        return self.conv_out(torch.nn.functional.silu(h))


def video_fns(net: nn.Module, kind: str = "flow") -> ModelFns:
    s = make_schedule(kind)

    def denoise(noisy: torch.Tensor, sigma: torch.Tensor, indices: list[int]) -> torch.Tensor:
        out = net(s.calculate_input(sigma, noisy), s.timestep(sigma).float() / 1000)
        return s.calculate_denoised(sigma, out, noisy)

    return ModelFns(s.percent_to_sigma, s.noise_scaling, s.calculate_denoised, denoise, None, kind == "flow")


def build(seed: int = 0) -> TinyVideoNet:
    torch.manual_seed(seed)
    net = TinyVideoNet().eval()
    net.requires_grad_(False)
    return net


def videos(n: int = 2, frames: int = 3, seed: int = 1) -> torch.Tensor:
    """Smooth, learnable clips: a per-video pattern drifting over the frames."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 4, 1, 4, 4, generator=g)
    base = torch.nn.functional.interpolate(base[:, :, 0], size=(8, 8), mode="bilinear", align_corners=False)[:, :, None]
    return torch.cat([base.roll(t, dims=-1) for t in range(frames)], dim=2)


@torch.no_grad()
def fixed_noise_loss(net: nn.Module, latents: torch.Tensor, kind: str = "flow") -> float:
    fns = video_fns(net, kind)
    g = torch.Generator().manual_seed(5)
    total = []
    for percent in (0.2, 0.5, 0.8):
        sigma = fns.percent_to_sigma(torch.full((latents.shape[0],), percent))
        noise = torch.randn(latents.shape, generator=g)
        pred = fns.denoise(fns.noise_scaling(sigma, noise, latents), sigma, list(range(latents.shape[0])))
        total.append(float(((pred - latents) ** 2).mean()))
    return sum(total) / len(total)


# data

def test_video_batches_flatten_to_single_clips_in_order():
    a, b = torch.randn(2, 16, 3, 8, 8), torch.randn(1, 16, 5, 8, 8)
    clips = flatten_latents([a, b])
    assert [tuple(c.shape) for c in clips] == [(16, 3, 8, 8)] * 2 + [(16, 5, 8, 8)]
    assert torch.equal(clips[1], a[1]) and torch.equal(clips[2], b[0])


def test_latents_under_four_axes_are_refused_with_the_shapes_to_give():
    with pytest.raises(ValueError, match=r"latents\[0\].*\(8, 8\).*frames, height, width"):
        flatten_latents(torch.zeros(8, 8))


def test_video_latents_for_an_image_model_are_refused_naming_the_model():
    clips = flatten_latents(torch.zeros(1, 4, 3, 8, 8))
    with pytest.raises(ValueError, match=r"latents: they are video latents \(4, 3, 8, 8\).*this model \(SDXL\) takes image"):
        check_latent_rank(clips, 2, "SDXL")
    check_latent_rank(clips, 3, "WAN21_T2V")  # a video model takes them
    check_latent_rank(flatten_latents(torch.zeros(1, 16, 8, 8)), 3, "QwenImage")  # and single images


def test_image_latents_for_a_model_of_3d_latents_get_a_frame_axis():
    images = flatten_latents([torch.randn(2, 16, 8, 8), torch.randn(1, 16, 2, 8, 8)])
    shaped = as_model_rank(images, 3)
    assert [tuple(x.shape) for x in shaped] == [(16, 1, 8, 8)] * 2 + [(16, 2, 8, 8)]
    assert torch.equal(shaped[0][:, 0], images[0])
    assert as_model_rank(images, 2) is images  # image models: unchanged


# objective

def test_output_coefficient_has_the_latents_rank_so_each_clip_gets_its_own():
    fns = video_fns(build(), "eps")
    sigma = torch.tensor([0.5, 3.0])
    c5 = output_coefficient(fns, sigma, 5)
    assert c5.shape == (2, 1, 1, 1, 1)
    assert torch.equal(c5.flatten(), output_coefficient(fns, sigma).flatten())


def test_video_loss_is_the_per_clip_loss_by_hand():
    """Native-space loss of two clips at different noise levels: a (B, 1, 1, 1) coefficient against
    (B, C, T, H, W) would broadcast the batch onto the channels and give another number."""
    net = build()
    fns = video_fns(net, "eps")
    x0 = videos(4, frames=2)  # B = 4 = C: a wrong broadcast would run silently
    config = TrainConfig(**FAST)
    objective = Objective(fns, config, torch.device("cpu"))
    got = objective.loss(x0, [0, 1, 2, 3], torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g)
    sigma = fns.percent_to_sigma(torch.rand(4, generator=g))
    pred = fns.denoise(fns.noise_scaling(sigma, noise, x0), sigma, [0, 1, 2, 3])
    per_clip = [float((((pred[i] - x0[i]) / output_coefficient(fns, sigma[i:i + 1])) ** 2).mean()) for i in range(4)]
    assert float(got) == pytest.approx(sum(per_clip) / 4, rel=1e-5)


def test_pyramid_noise_on_video_is_per_frame():
    noise = torch.randn(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = pyramid_noise(noise, torch.Generator().manual_seed(1), 3, 0.5)
    frames = noise.movedim(1, 2).reshape(6, 4, 16, 16)
    by_frame = pyramid_noise(frames, torch.Generator().manual_seed(1), 3, 0.5).reshape(2, 3, 4, 16, 16).movedim(2, 1)
    assert out.shape == noise.shape and torch.equal(out, by_frame)
    assert torch.allclose(out.movedim(1, 2).flatten(2).std(2), torch.ones(2, 3), atol=1e-5)
    assert not torch.allclose(out[:, :, 0], out[:, :, 1])  # each frame its own pyramid


def test_resolution_shift_on_video_is_refused_naming_flow_shift():
    objective = Objective(video_fns(build()), TrainConfig(flow_shift="resolution", **FAST), torch.device("cpu"))
    with pytest.raises(ValueError, match="flow_shift: 'resolution'.*video.*set flow_shift to model"):
        objective.loss(videos(1), [0], torch.Generator().manual_seed(0))


# training

def state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def same(net: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_video_latents_train_and_the_loss_falls_base_unchanged():
    """Two clips through train() (offset and per-frame pyramid noise on): the fixed-noise loss falls
    by half with the LoRA merged; the Conv3d layers have adapters; the base is untouched."""
    net = build()
    before, clips = state(net), videos(2, frames=3)
    start = fixed_noise_loss(net, clips)
    config = TrainConfig(steps=300, learning_rate=1e-2, rank=4, batch_size=2, seed=7, noise_offset=0.05,
                         multires_noise_iterations=2, **FAST)
    result = train(net, video_fns(net), clips, config)
    assert same(net, before)
    assert len(result.losses) == 300
    assert any(v.dim() == 5 for v in result.lora.values())  # a Conv3d's down (rank, C, 3, 3, 3)
    weights = resolve_state_dict(result.lora, net)
    assert {"conv_in", "conv_out", "mix", "time"} <= set(weights)
    with merge_lora(net, weights):
        end = fixed_noise_loss(net, clips)
    assert end < 0.5 * start, (start, end)
    assert same(net, before)


def test_clips_of_different_lengths_and_images_train_in_same_shape_groups():
    """A 3-frame and a 5-frame clip (two LATENTs) in one run, batch 2: each step stacks only same-shape
    clips (the engine groups them), and training runs to the end with finite losses."""
    net = build()
    seen: list[tuple[int, ...]] = []
    fns = video_fns(net)
    denoise = fns.denoise

    def recording(noisy, sigma, indices):
        seen.append(tuple(noisy.shape))
        return denoise(noisy, sigma, indices)

    config = TrainConfig(steps=4, learning_rate=1e-3, rank=2, batch_size=2, seed=1, **FAST)
    result = train(net, fns._replace(denoise=recording), [videos(1, 3), videos(1, 5, seed=2)], config)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert set(seen) == {(1, 4, 3, 8, 8), (1, 4, 5, 8, 8)}


def test_validation_on_video_latents_is_the_per_clip_loss():
    """The validation loss of 5-D latents: native-space per clip (its own c(σ)), by hand at one level."""
    net = build()
    fns = video_fns(net, "eps")
    clips = videos(2, frames=2)
    validation = Validation(fns, clips, TrainConfig(batch_size=2, **FAST), every=1, noise_levels=1)
    assert [tuple(c.shape) for c in validation_images([clips])] == [(4, 2, 8, 8)] * 2
    chunk = validation.chunks[0]
    pred = fns.denoise(chunk.noisy, chunk.sigma, chunk.indices)
    c = output_coefficient(fns, chunk.sigma, 5)
    expected = float((((pred - chunk.target) / c) ** 2).flatten(1).mean(1).mean())
    assert validation.loss() == pytest.approx(expected, rel=1e-5)


def test_model_latents_fits_latents_to_a_model_in_one_call():
    from comfyui_lora_trainer.training.data import model_latents

    images = model_latents([torch.zeros(2, 16, 8, 8), torch.zeros(1, 16, 4, 8)], 16, 3, "WAN21_T2V")
    assert [tuple(x.shape) for x in images] == [(16, 1, 8, 8), (16, 1, 8, 8), (16, 1, 4, 8)]
    assert [tuple(x.shape) for x in model_latents([torch.zeros(1, 4, 8, 8)], None, None, "?")] == [(4, 8, 8)]
    with pytest.raises(ValueError, match=r"^validation latents: they have 4 channels, but this model \(Flux\)"):
        model_latents([torch.zeros(1, 4, 8, 8)], 16, 2, "Flux", "validation latents")
    with pytest.raises(ValueError, match=r"^latents: they are video latents .* this model \(SDXL\)"):
        model_latents([torch.zeros(1, 4, 3, 8, 8)], 4, 2, "SDXL")
    with pytest.raises(ValueError, match=r"^validation latents: no images"):
        model_latents([torch.zeros(0, 4, 8, 8)], 4, 2, "SDXL", "validation latents")
