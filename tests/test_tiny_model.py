"""The bundled tiny model, its schedules, the stand-in text encoder and VAE, and the demo images."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from comfyui_lora_trainer.tiny.model import (
    TinyConfig, TinyDenoiser, build_tiny, decode_latents, encode_images, sample,
)
from comfyui_lora_trainer.tiny.schedules import (
    EpsSchedule, FlowSchedule, VSchedule, make_schedule,
)
from comfyui_lora_trainer.tiny.text import encode_captions, encode_text

KINDS = ("eps", "v", "flow")
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo_images"


def _target(kind: str, sigma: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The exact network output that denoises to x0 (derived from each kind's x0 formula)."""
    s = sigma.reshape(-1, 1, 1, 1)
    if kind == "eps":  # x = x0 + σn, x0 = x − σ·out  ⇒  out = n
        return noise
    if kind == "v":  # x0 = x/(σ²+1) − out·σ/√(σ²+1) with x = x0 + σn  ⇒  out = (n − σ·x0)/√(σ²+1)
        return (noise - s * x0) / (s ** 2 + 1).sqrt()
    return noise - x0  # flow: x = σn + (1−σ)x0, x0 = x − σ·out  ⇒  out = n − x0


@pytest.mark.parametrize("kind", KINDS)
def test_exact_target_denoises_to_x0(kind: str) -> None:
    schedule = make_schedule(kind)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 6, 6, generator=g), torch.randn(5, 4, 6, 6, generator=g)
    sigma = schedule.percent_to_sigma(torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0]))
    noisy = schedule.noise_scaling(sigma, noise, x0)
    denoised = schedule.calculate_denoised(sigma, _target(kind, sigma, noise, x0), noisy)
    torch.testing.assert_close(denoised, x0, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(schedule.calculate_denoised(sigma, torch.zeros_like(x0), noisy), x0)


@pytest.mark.parametrize("kind", KINDS)
def test_percent_to_sigma_endpoints_and_monotonic(kind: str) -> None:
    schedule = make_schedule(kind)
    percent = torch.linspace(0, 1, 101)
    sigma = schedule.percent_to_sigma(percent)
    assert sigma.shape == (101,)
    assert sigma[0].item() == pytest.approx(schedule.sigma_max, rel=1e-5)
    assert sigma[-1].item() == pytest.approx(schedule.sigma_min, rel=1e-5)
    assert bool((sigma[1:] < sigma[:-1]).all())


def test_schedule_tables_match_their_definitions() -> None:
    eps, flow = EpsSchedule(), FlowSchedule(shift=3.0)
    assert eps.sigma_min == pytest.approx(0.0291671, rel=1e-4)  # SD1.x's known sigma range
    assert eps.sigma_max == pytest.approx(14.614642, rel=1e-4)
    assert flow.sigma_max == 1.0
    assert flow.percent_to_sigma(torch.tensor([0.5])).item() == pytest.approx(0.75)  # 3·½ / (1 + 2·½)
    assert VSchedule().kind == "v" and isinstance(make_schedule("v"), EpsSchedule)


@pytest.mark.parametrize("kind", ("eps", "flow"))
def test_timestep_inverts_sigma(kind: str) -> None:
    schedule = make_schedule(kind)
    percent = torch.tensor([0.0, 0.25, 0.5, 1.0])
    t = schedule.timestep(schedule.percent_to_sigma(percent))
    if kind == "eps":
        torch.testing.assert_close(t, (1 - percent) * 999, rtol=0, atol=1e-2)
    else:
        assert t[0].item() == pytest.approx(1000.0) and bool((t[1:] < t[:-1]).all())


@pytest.mark.parametrize("kind", KINDS)
def test_sigmas_for_sampling_descend_to_zero(kind: str) -> None:
    sigmas = make_schedule(kind).sigmas_for_sampling(10)
    assert sigmas.shape == (11,) and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_make_schedule_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"kind: got 'x0'.*eps, v, flow"):
        make_schedule("x0")


@pytest.mark.parametrize("hw", [(32, 32), (24, 40), (15, 9)])
def test_denoiser_output_shape(hw: tuple[int, int]) -> None:
    model = build_tiny("eps")
    x = torch.randn(2, 4, *hw)
    context = encode_text("a red circle", TinyConfig.default().context_dim)
    out = model.net(x, torch.tensor([10.0, 900.0]), context)
    assert out.shape == x.shape and torch.isfinite(out).all()
    sigma = torch.tensor([0.5, 3.0])
    assert model.denoise(x, sigma, context).shape == x.shape


def test_forward_runs_each_top_level_block_once_as_h_emb_context() -> None:
    net = build_tiny().net
    calls: list[tuple[int, int]] = []
    for i, block in enumerate(net.blocks):
        block.register_forward_hook(lambda module, args, out, i=i: calls.append((i, len(args))))
    net(torch.randn(1, 4, 8, 8), torch.tensor([5.0]), torch.zeros(1, 8, net.config.context_dim))
    assert calls == [(i, 3) for i in range(len(net.blocks))]
    kinds = {type(m).__name__ for m in net.modules()}
    assert {"Conv2d", "Linear", "GroupNorm", "LayerNorm"} <= kinds
    assert any(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in net.modules())


def test_build_tiny_is_deterministic_and_frozen() -> None:
    a, b, c = build_tiny("v", seed=3), build_tiny("v", seed=3), build_tiny("v", seed=4)
    state_a, state_b, state_c = a.net.state_dict(), b.net.state_dict(), c.net.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert not a.net.training and not any(p.requires_grad for p in a.net.parameters())


def test_build_tiny_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny()
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_sample_is_deterministic_and_finite(kind: str) -> None:
    model = build_tiny(kind)
    context = encode_text("a red circle", TinyConfig.default().context_dim)
    a = sample(model, context, (1, 4, 16, 16), steps=4, seed=1)
    b = sample(model, context, (1, 4, 16, 16), steps=4, seed=1)
    assert a.shape == (1, 4, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(model, context, (1, 4, 16, 16), steps=4, seed=2))


def test_encode_decode_round_trip() -> None:
    images = torch.rand(2, 12, 20, 3, generator=torch.Generator().manual_seed(0))
    latents = encode_images(images)
    assert latents.shape == (2, 4, 12, 20)
    assert latents.min() >= -1 and latents.max() <= 1
    torch.testing.assert_close(decode_latents(latents), images, rtol=0, atol=1e-5)


def test_codec_rejects_wrong_layout() -> None:
    with pytest.raises(ValueError, match="images: got shape"):
        encode_images(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="latents: got shape"):
        decode_latents(torch.rand(1, 3, 8, 8))


def test_encode_text_is_deterministic() -> None:
    a = encode_text("A red circle, lrtstyle", 64)
    assert a.shape == (1, 8, 64)
    assert torch.equal(a, encode_text("a red  CIRCLE lrtstyle", 64))  # lowercased words only
    assert not torch.equal(a, encode_text("a blue circle, lrtstyle", 64))
    assert torch.equal(a[0, 4:], torch.zeros(4, 64))  # padded with zeros
    assert encode_text("one two three four", 16, length=2).shape == (1, 2, 16)
    assert encode_captions(["a", "b c"], 16).shape == (2, 8, 16)


def test_encode_text_known_value() -> None:
    """Pins the hash → generator path, so a change to it (and to every trained demo LoRA) shows."""
    expected = torch.tensor([-0.2901681, -1.3885344, 0.8178672, -0.7930473])
    torch.testing.assert_close(encode_text("lrtstyle", 4)[0, 0], expected, rtol=0, atol=1e-6)


def test_default_preset_is_small_and_wide_is_sd_shaped() -> None:
    count = sum(p.numel() for p in TinyDenoiser(TinyConfig.default()).parameters())
    assert 200_000 < count < 3_000_000
    wide = TinyConfig.wide()
    assert (wide.width, wide.context_dim) == (320, 768)


def test_text_positions_make_the_word_order_count() -> None:
    """Without positions the context is a set (cross-attention is blind to the order of its keys), so
    "a red circle on a blue background" and "a blue circle on a red background" give the same output;
    with them, they differ."""
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    one, other = (encode_text(c, 64) for c in ("a red circle on a blue background", "a blue circle on a red background"))
    for positions in (False, True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = TinyDenoiser(TinyConfig(text_positions=positions)).eval()
        with torch.no_grad():
            a, b = net(x, t, one), net(x, t, other)
        if positions:
            assert (a - b).abs().max() > 1e-3
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_outer_self_attention_can_be_left_out() -> None:
    with_it, without = TinyDenoiser(TinyConfig()), TinyDenoiser(TinyConfig(outer_self_attention=False))
    gone = set(with_it.state_dict()) - set(without.state_dict())
    assert gone and all(".attn1." in name or ".norm1." in name for name in gone)
    assert all(name.startswith("blocks.4.") for name in gone)  # only the full-resolution transformer's
    assert without(torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0]), torch.randn(2, 8, 64)).shape == (2, 4, 16, 16)


def test_config_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="groups"):
        TinyConfig(width=30, groups=8)
    with pytest.raises(ValueError, match="heads: got 0"):
        TinyConfig(heads=0)


def test_demo_images_and_captions_ship() -> None:
    pngs = sorted(ASSETS.glob("*.png"))
    assert len(pngs) == 6
    assert all(p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in pngs)
    assert sum(p.stat().st_size for p in ASSETS.iterdir()) <= 200_000


def test_guidance_one_is_plain_sampling_and_guidance_pushes_away_from_the_empty_caption() -> None:
    """CFG: x0 = x0_empty + g·(x0_caption − x0_empty); g = 1 is the plain sampler, bit for bit; g = 0 samples
    the empty caption (a zero context), whatever the caption."""
    model = build_tiny("eps")
    context = encode_text("a red circle", TinyConfig.default().context_dim)
    plain = sample(model, context, (1, 4, 16, 16), steps=4, seed=1)
    assert torch.equal(sample(model, context, (1, 4, 16, 16), steps=4, seed=1, guidance=1.0), plain)
    empty = sample(model, torch.zeros_like(context), (1, 4, 16, 16), steps=4, seed=1)
    torch.testing.assert_close(sample(model, context, (1, 4, 16, 16), steps=4, seed=1, guidance=0.0), empty)
    guided = sample(model, context, (1, 4, 16, 16), steps=4, seed=1, guidance=3.0)
    assert torch.isfinite(guided).all() and not torch.equal(guided, plain)
