"""Each training option's maths against a hand-computed case (training/objective.py, optim.py, dropout.py)."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from comfyui_lora_trainer.lora import inject
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny
from comfyui_lora_trainer.tiny.schedules import make_schedule
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.dropout import rank_dropout
from comfyui_lora_trainer.training.loop import lora_config_of, train
from comfyui_lora_trainer.training.objective import (ModelFns, Objective, draw_percent, flux_shift, loss_weights,
                                                     offset_noise, pyramid_noise, shifted_sigma, snr)
from comfyui_lora_trainer.training.optim import lr_at, make_optimizer, set_lr

FAST = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)


def schedule_fns(kind: str, denoise=None, uncond=None) -> ModelFns:
    s = make_schedule(kind)
    return ModelFns(s.percent_to_sigma, s.noise_scaling, s.calculate_denoised, denoise or (lambda x, sg, i: x),
                    uncond, kind == "flow")


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def ks_statistic(samples: torch.Tensor) -> float:
    """Kolmogorov–Smirnov distance of samples from N(0, 1)."""
    x, _ = samples.double().sort()
    n = x.numel()
    cdf = normal_cdf(x)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    below = cdf - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(above, below).max())


# noise levels

def test_uniform_default_is_todays_rand_draw():
    config = TrainConfig()
    assert torch.equal(draw_percent(7, torch.Generator().manual_seed(4), config),
                       torch.rand(7, generator=torch.Generator().manual_seed(4)))


def test_logit_normal_draws_match_their_distribution():
    n = 20000
    config = TrainConfig(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=1.5)
    t = 1 - draw_percent(n, torch.Generator().manual_seed(0), config).double()
    z = (torch.log(t / (1 - t)) - 0.5) / 1.5
    assert ks_statistic(z) < 1.36 / math.sqrt(n)  # the 5 % critical value
    shifted = TrainConfig(timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.5)
    t0 = 1 - draw_percent(n, torch.Generator().manual_seed(0), shifted).double()
    assert ks_statistic(torch.log(t0 / (1 - t0)) / 1.5 - 0.5 / 1.5) > 0.1  # a wrong mean is caught


def test_sigmoid_scale_is_the_std_of_the_logit():
    config = TrainConfig(timestep_sampling="sigmoid", sigmoid_scale=2.0)
    t = 1 - draw_percent(20000, torch.Generator().manual_seed(1), config).double()
    logit = torch.log(t / (1 - t))
    assert ks_statistic(logit / 2.0) < 1.36 / math.sqrt(20000)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "sigmoid"])
def test_timestep_range(sampling):
    config = TrainConfig(timestep_sampling=sampling, min_timestep=200, max_timestep=600)
    t = 1 - draw_percent(5000, torch.Generator().manual_seed(2), config)
    assert t.min() >= 0.2 - 1e-6 and t.max() <= 0.6 + 1e-6
    if sampling == "uniform":
        assert abs(float(t.mean()) - 0.4) < 0.01
    with pytest.raises(ValueError, match="min_timestep: got 600, not below max_timestep 600"):
        TrainConfig(min_timestep=600, max_timestep=600)


def test_flow_shift_fixed_and_flux_resolution():
    assert float(shifted_sigma(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)  # 3·0.5 / (1 + 2·0.5)
    assert flux_shift(32, 32) == pytest.approx(math.exp(0.5))  # 16·16 = 256 tokens
    assert flux_shift(128, 128) == pytest.approx(math.exp(1.15))  # 4096 tokens
    fns = schedule_fns("flow")
    objective = Objective(fns, TrainConfig(flow_shift="fixed", flow_shift_value=3.0), torch.device("cpu"))
    percent = draw_percent(4, torch.Generator().manual_seed(5), TrainConfig())
    sigma = objective.sigma(4, torch.Size([4, 4, 32, 32]), torch.Generator().manual_seed(5))
    assert torch.allclose(sigma, 3 * (1 - percent) / (1 + 2 * (1 - percent)))
    flux = Objective(fns, TrainConfig(flow_shift="resolution"), torch.device("cpu"))
    s = math.exp(0.5)
    sigma = flux.sigma(4, torch.Size([4, 4, 32, 32]), torch.Generator().manual_seed(5))
    assert torch.allclose(sigma, s * (1 - percent) / (1 + (s - 1) * (1 - percent)))
    with pytest.raises(ValueError, match="flow_shift: got 'fixed', but this model is not a flow model"):
        Objective(schedule_fns("eps"), TrainConfig(flow_shift="fixed"), torch.device("cpu"))


# loss weighting

@pytest.mark.parametrize(("kind", "sigma", "snr_value", "min_snr", "debiased"), [
    ("eps", 2.0, 0.25, 1.0, 2.0),  # min(0.25, 5) / 0.25; 1/√0.25
    ("eps", 0.1, 100.0, 0.05, 0.1),  # 5 / 100; 1/√100
    ("v", 2.0, 0.25, 0.2, 0.4),  # 0.25 / 1.25; √0.25 / 1.25
    ("v", 0.1, 100.0, 5 / 101, 10 / 101),
    ("flow", 0.5, 1.0, 0.25, 0.25),  # SNR ((1−σ)/σ)² = 1; w0·σ²
    ("flow", 0.1, 81.0, 0.05, 0.09),  # 5·0.01; 9·0.01
])
def test_min_snr_and_debiased_weights_at_known_sigmas(kind, sigma, snr_value, min_snr, debiased):
    fns, s = schedule_fns(kind), torch.tensor([sigma])
    assert float(snr(fns, s)) == pytest.approx(snr_value, rel=1e-5)
    w = loss_weights(fns, s, TrainConfig(loss_weighting="min_snr", min_snr_gamma=5.0))
    assert float(w) == pytest.approx(min_snr, rel=1e-5)
    assert float(loss_weights(fns, s, TrainConfig(loss_weighting="debiased"))) == pytest.approx(debiased, rel=1e-5)
    x0 = TrainConfig(loss_weighting="min_snr", loss_space="x0")
    assert float(loss_weights(fns, s, x0)) == pytest.approx(min(snr_value, 5.0), rel=1e-5)
    assert loss_weights(fns, s, TrainConfig()) is None


# noise

def test_noise_offset_shifts_the_per_channel_mean():
    zeros = torch.zeros(2, 3, 8, 8)
    shifted = offset_noise(zeros, torch.Generator().manual_seed(0), 0.1)
    expect = 0.1 * torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(shifted.mean((2, 3)), expect) and torch.allclose(shifted.std((2, 3)), torch.zeros(2, 3))


def test_pyramid_noise_is_unit_variance_and_adds_low_frequencies():
    noise = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = pyramid_noise(noise, torch.Generator().manual_seed(1), 6, 0.0)  # discount 0: nothing added
    assert torch.allclose(plain, noise / noise.flatten(1).std(1).reshape(4, 1, 1, 1))
    pyramid = pyramid_noise(noise, torch.Generator().manual_seed(1), 6, 0.8)
    assert torch.allclose(pyramid.flatten(1).std(1), torch.ones(4))
    low = lambda x: torch.nn.functional.avg_pool2d(x, 8).var()  # noqa: E731
    assert low(pyramid) > 2 * low(noise / noise.flatten(1).std(1).reshape(4, 1, 1, 1))


def test_ip_noise_gamma_keeps_the_target_of_the_unperturbed_noise():
    """A perfect x0 prediction of the perturbed input leaves the eps error γ·ξ: the target is ε, not ε + γξ."""
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    perfect = schedule_fns("eps", denoise=lambda x, s, i: x0[i])
    config = TrainConfig(ip_noise_gamma=0.1, training_dtype="fp32")
    loss = Objective(perfect, config, torch.device("cpu")).loss(x0, [0, 1], torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    torch.randn(x0.shape, generator=g), torch.rand(2, generator=g)  # the noise and level draws
    xi = torch.randn(x0.shape, generator=g)
    assert float(loss) == pytest.approx(float(((0.1 * xi) ** 2).mean()), rel=1e-4)
    off = Objective(perfect, TrainConfig(training_dtype="fp32"), torch.device("cpu"))
    assert float(off.loss(x0, [0, 1], torch.Generator().manual_seed(3))) < 1e-10


# caption dropout

def test_caption_dropout_routes_dropped_images_to_the_empty_caption():
    seen = {"cond": [], "uncond": 0}

    def denoise(x, s, indices):
        seen["cond"].append(list(indices))
        return x

    def uncond(x, s):
        seen["uncond"] += x.shape[0]
        return x

    fns = schedule_fns("eps", denoise, uncond)
    x0 = torch.zeros(6, 4, 4, 4)
    Objective(fns, TrainConfig(caption_dropout=0.5), torch.device("cpu")).loss(x0, list(range(10, 16)),
                                                                            torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    torch.randn(x0.shape, generator=g), torch.rand(6, generator=g)
    dropped = (torch.rand(6, generator=g) < 0.5).tolist()
    assert seen["cond"] == [[10 + i for i, d in enumerate(dropped) if not d]] and seen["uncond"] == sum(dropped)
    assert 0 < sum(dropped) < 6
    with pytest.raises(ValueError, match="caption_dropout: got 0.5, but there is no unconditional conditioning"):
        Objective(schedule_fns("eps"), TrainConfig(caption_dropout=0.5), torch.device("cpu"))


def test_control_dropout_routes_rows_to_the_bare_captions_and_caption_dropout_wins():
    seen = {"cond": [], "uncond": 0, "bare": []}

    def denoise(x, s, indices):
        seen["cond"].append(list(indices))
        return x

    def uncond(x, s):
        seen["uncond"] += x.shape[0]
        return x

    def bare(x, s, indices):
        seen["bare"].append(list(indices))
        return x

    fns = schedule_fns("eps", denoise, uncond)._replace(denoise_bare=bare)
    x0 = torch.zeros(8, 4, 4, 4)
    config = TrainConfig(caption_dropout=0.3, control_dropout=0.5)
    Objective(fns, config, torch.device("cpu")).loss(x0, list(range(10, 18)), torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    torch.randn(x0.shape, generator=g), torch.rand(8, generator=g)  # the noise and level draws
    dropped = (torch.rand(8, generator=g) < 0.3).tolist()
    stripped = (torch.rand(8, generator=g) < 0.5).tolist()
    assert seen["uncond"] == sum(dropped)
    assert seen["bare"] == [[10 + i for i in range(8) if stripped[i] and not dropped[i]]]
    assert seen["cond"] == [[10 + i for i in range(8) if not stripped[i] and not dropped[i]]]
    assert seen["bare"][0] and seen["cond"][0] and seen["uncond"]  # this seed exercises all three
    with pytest.raises(ValueError, match="control_dropout: got 0.5, but no caption carries a condition image"):
        Objective(schedule_fns("eps"), TrainConfig(control_dropout=0.5), torch.device("cpu"))


def test_caption_dropout_trains_the_tiny_model():
    model = build_tiny("eps")
    ctx = encode_captions(["a ramp", ""], model.net.config.context_dim)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    result = train(model.net, tiny_fns(model, ctx[:1], uncond=ctx[1:]), latents,
                   TrainConfig(steps=3, caption_dropout=0.5, **FAST))
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)


# dropout

def test_rank_dropout_zeroes_whole_ranks_per_image_and_rescales():
    torch.manual_seed(0)
    h = rank_dropout(torch.ones(3, 5, 8), 0.5, conv=False)  # Linear: (B, tokens, rank)
    assert set(h.unique().tolist()) <= {0.0, 2.0} and torch.equal(h, h[:, :1].expand_as(h))
    c = rank_dropout(torch.ones(3, 8, 4, 4), 0.5, conv=True)  # conv: (B, rank, H, W)
    assert torch.equal(c, c[:, :, :1, :1].expand_as(c)) and set(c.unique().tolist()) <= {0.0, 2.0}
    torch.manual_seed(0)
    many = rank_dropout(torch.ones(2000, 8), 0.25, conv=False)
    assert abs(float(many.mean()) - 1.0) < 0.03  # unbiased


@pytest.mark.parametrize("field", ["network_dropout", "rank_dropout", "module_dropout"])
def test_dropout_is_reproducible_leaves_global_rng_and_survives_checkpointing(field):
    model = build_tiny("eps")
    ctx = encode_captions(["a ramp"], model.net.config.context_dim)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    fns = tiny_fns(model, ctx)
    before = torch.get_rng_state()
    runs = [train(model.net, fns, latents, TrainConfig(steps=3, **{field: 0.5}, **{**FAST, "gradient_checkpointing": ck}),
                  checkpoint_blocks=model.net.blocks) for ck in (False, True)]
    assert torch.equal(torch.get_rng_state(), before)
    assert runs[0].losses == runs[1].losses
    assert all(torch.allclose(v, runs[1].lora[k], atol=1e-6) for k, v in runs[0].lora.items())
    plain = train(model.net, fns, latents, TrainConfig(steps=3, **FAST))
    assert plain.losses[1:] != runs[0].losses[1:]


def test_dropout_needs_a_rank_algorithm():
    with pytest.raises(ValueError, match="rank_dropout: got 0.1, but algorithm loha has no rank-wide activation"):
        TrainConfig(rank_dropout=0.1, algorithm="loha")
    with pytest.raises(ValueError, match="lora_plus_ratio: got 16.0, but algorithm lokr"):
        TrainConfig(lora_plus_ratio=16.0, algorithm="lokr")


# optimizers and LR

def test_cosine_with_restarts_and_minimum_lr():
    c = TrainConfig(steps=10, learning_rate=1.0, lr_schedule="cosine_with_restarts", lr_restarts=2)
    assert lr_at(0, c) == 1.0 and lr_at(5, c) == 1.0  # the second cycle restarts at the base LR
    assert lr_at(2, c) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))
    floor = TrainConfig(steps=10, learning_rate=1.0, lr_schedule="linear", min_learning_rate=0.1)
    assert lr_at(9, floor) == pytest.approx(0.1 + 0.9 * 0.1) and lr_at(0, floor) == 1.0
    cos = TrainConfig(steps=10, learning_rate=1.0, lr_schedule="cosine", min_learning_rate=0.2)
    assert lr_at(5, cos) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="min_learning_rate: got 0.01, above learning_rate 0.001"):
        TrainConfig(learning_rate=1e-3, min_learning_rate=1e-2)


def named_lora_params():
    model = build_tiny("eps")
    network = inject(model.net, lora_config_of(TrainConfig()))
    return network, list(network.named_parameters())


def test_weight_decay_and_lora_plus_groups():
    network, named = named_lora_params()
    try:
        assert make_optimizer(named, TrainConfig()).param_groups[0]["weight_decay"] == 0.01  # AdamW's default
        assert make_optimizer(named, TrainConfig(optimizer="SGD")).param_groups[0]["weight_decay"] == 0
        assert make_optimizer(named, TrainConfig(weight_decay=0.1)).param_groups[0]["weight_decay"] == 0.1
        plus = make_optimizer(named, TrainConfig(lora_plus_ratio=16.0))
        set_lr(plus, 1e-3)
        rest, up = plus.param_groups
        ups = {id(p) for n, p in named if n.endswith("lora_up")}
        assert {id(p) for p in up["params"]} == ups and not ups & {id(p) for p in rest["params"]}
        assert rest["lr"] == 1e-3 and up["lr"] == pytest.approx(16e-3)
        with pytest.raises(ValueError, match="weight_decay: got -0.5; give 0 or more, or -1"):
            TrainConfig(weight_decay=-0.5)
    finally:
        network.remove()


def test_adafactor_trains_and_prodigy_missing_says_how_to_install(monkeypatch):
    network, named = named_lora_params()
    try:
        assert type(make_optimizer(named, TrainConfig(optimizer="Adafactor"))).__name__ == "Adafactor"
        monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as if not installed
        with pytest.raises(ImportError, match=r"optimizer: Prodigy needs the optional package prodigyopt.*pip install "
                                              r"prodigyopt"):
            make_optimizer(named, TrainConfig(optimizer="Prodigy", learning_rate=1.0))
    finally:
        network.remove()
    model = build_tiny("eps")
    ctx = encode_captions(["a ramp"], model.net.config.context_dim)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    result = train(model.net, tiny_fns(model, ctx), latents, TrainConfig(steps=8, batch_size=2, optimizer="Adafactor",
                                                                          learning_rate=2e-3, **FAST))
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
