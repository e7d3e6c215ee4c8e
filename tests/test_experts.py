"""Noise-range experts (Wan 2.2 A14B): one expert's σ range with the distribution's shape kept
(training/objective.py), both experts in one run with one LoRA each (training/experts.py), and the files'
metadata and names (lora/metadata.py). Tiny flow models stand in for the two experts."""
from __future__ import annotations

import math

import pytest
import torch

from comfyui_lora_trainer.lora.metadata import EXPERT, ExpertLoras, LoraStateDict, expert_stem
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny
from comfyui_lora_trainer.tiny.schedules import FlowSchedule, make_schedule
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.experts import EXPERT_STEPS, Expert, split_weights, train_experts
from comfyui_lora_trainer.training.loop import train
from comfyui_lora_trainer.training.objective import ModelFns, Objective, draw_percent, window_mass

FAST = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)
SHAPE = (1, 4, 8, 8)
BOUNDARY = 0.875
CPU = torch.device("cpu")


def flow_fns(denoise=None) -> ModelFns:
    s = make_schedule("flow")  # shift 3, as ComfyUI's ModelSamplingDiscreteFlow (percent_to_sigma = shift(1 − p))
    return ModelFns(s.percent_to_sigma, s.noise_scaling, s.calculate_denoised, denoise or (lambda x, sg, i: x),
                    None, True)


def ks_two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kolmogorov–Smirnov distance between two samples' empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b, grid, right=True).double() / b.numel()
    return float((cdf_a - cdf_b).abs().max())


def ks_critical(n: int, m: int) -> float:
    return 1.63 * math.sqrt((n + m) / (n * m))  # the 1 % critical value


def sigmas(config: TrainConfig, n: int, seed: int) -> torch.Tensor:
    return Objective(flow_fns(), config, CPU).sigma(n, SHAPE, torch.Generator().manual_seed(seed))


def in_range(sigma: torch.Tensor, expert: str) -> torch.Tensor:
    return sigma >= BOUNDARY if expert == "high_noise" else sigma < BOUNDARY


# ---- one expert's range, the shape kept -----------------------------------------------------
CASES = [dict(timestep_sampling="uniform"), dict(timestep_sampling="logit_normal", logit_mean=0.4, logit_std=1.2),
         dict(timestep_sampling="sigmoid", sigmoid_scale=1.5),
         dict(timestep_sampling="logit_normal", flow_shift="fixed", flow_shift_value=5.0),
         dict(timestep_sampling="uniform", min_timestep=100, max_timestep=900)]


@pytest.mark.parametrize("settings", CASES, ids=lambda s: "-".join(str(v) for v in s.values()))
@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_an_expert_draws_the_configured_distribution_truncated_to_its_sigma_range(settings, expert):
    """Every σ lies in the expert's range (σ after the shift: where Wan's boundary is), and the draws follow
    the whole-range distribution restricted to it (rejection sampling from the whole range, as musubi-tuner's
    preserve_distribution_shape does): a two-sample KS test, which the affine squeeze into the range fails."""
    n = 20000
    ours = sigmas(TrainConfig(expert=expert, **settings), n, 0)
    assert bool(in_range(ours, expert).all())
    whole = sigmas(TrainConfig(**settings), 10 * n, 1)
    kept = whole[in_range(whole, expert)]
    assert ks_two_sample(ours, kept) < ks_critical(n, kept.numel())
    # the expert's share of the steps is the whole distribution's mass in its range
    objective = Objective(flow_fns(), TrainConfig(expert=expert, **settings), CPU)
    assert window_mass(objective.config, objective.window) == pytest.approx(kept.numel() / whole.numel(), abs=0.01)


def test_the_affine_squeeze_into_the_range_does_not_keep_the_shape():
    """Why the window is drawn by the truncated CDF and not by mapping the whole distribution into it: the
    squeeze (min/max_timestep's mapping) of a logit-normal draw differs from it, and the test above sees that."""
    n, settings = 20000, dict(timestep_sampling="logit_normal", logit_mean=0.4, logit_std=1.2)
    objective = Objective(flow_fns(), TrainConfig(expert="high_noise", **settings), CPU)
    t_low, t_high = objective.window
    squeezed_config = TrainConfig(min_timestep=round(t_low * 1000), max_timestep=round(t_high * 1000), **settings)
    squeezed = sigmas(squeezed_config, n, 0)
    whole = sigmas(TrainConfig(**settings), 10 * n, 1)
    kept = whole[whole >= BOUNDARY]
    assert ks_two_sample(squeezed, kept) > 3 * ks_critical(n, kept.numel())


def test_the_boundary_is_on_sigma_after_the_models_shift():
    """Shift 3: σ = 0.875 is at the unshifted fraction t = σ / (s − (s − 1)σ) = 0.7, so the high-noise expert
    draws t in [0.7, 1]; with no expert the draw is the one it always was."""
    objective = Objective(flow_fns(), TrainConfig(expert="high_noise"), CPU)
    assert objective.window[0] == pytest.approx(0.7, abs=1e-6) and objective.window[1] == 1.0
    # Wan's shift in ComfyUI is 8: the high-noise expert takes t ≥ 0.875 / (8 − 7 · 0.875) = 0.4667 of the draw
    wan = FlowSchedule(shift=8.0)
    wan_fns = ModelFns(wan.percent_to_sigma, wan.noise_scaling, wan.calculate_denoised, lambda x, s, i: x, flow=True)
    assert Objective(wan_fns, TrainConfig(expert="high_noise"), CPU).window[0] == pytest.approx(0.875 / 1.875, abs=2e-3)
    fixed = Objective(flow_fns(), TrainConfig(expert="low_noise", flow_shift="fixed", flow_shift_value=8.0), CPU)
    assert fixed.window == (0.0, pytest.approx(0.875 / (8 - 7 * 0.875)))
    assert torch.equal(draw_percent(9, torch.Generator().manual_seed(5), TrainConfig(), None),
                       torch.rand(9, generator=torch.Generator().manual_seed(5)))


def test_expert_refuses_what_it_cannot_do():
    eps = make_schedule("eps")
    eps_fns = ModelFns(eps.percent_to_sigma, eps.noise_scaling, eps.calculate_denoised, lambda x, s, i: x)
    with pytest.raises(ValueError, match="expert: got high_noise, but this model is not a flow model"):
        Objective(eps_fns, TrainConfig(expert="high_noise"), CPU)
    with pytest.raises(ValueError, match="flow_shift: 'resolution'"):
        Objective(flow_fns(), TrainConfig(expert="low_noise", flow_shift="resolution"), CPU)
    # the high-noise range starts at t = 0.7: nothing of it below max_timestep 500
    with pytest.raises(ValueError, match="expert: the range σ 0.875–1 .* lies outside min_timestep 0 to "
                                         "max_timestep 500"):
        Objective(flow_fns(), TrainConfig(expert="high_noise", max_timestep=500), CPU)
    with pytest.raises(ValueError, match="expert_boundary: got 1.0; give a value from 0.01 to 0.99"):
        TrainConfig(expert_boundary=1.0)


# ---- both experts in one run --------------------------------------------------------------
def two_experts(steps: int = 40, **settings):
    """Two tiny flow models (other seeds: other weights), each call of each recorded as (expert, σ rows)."""
    low, high = build_tiny("flow", seed=0), build_tiny("flow", seed=1)
    contexts = encode_captions(["a ramp, lrtstyle"], low.net.config.context_dim)
    calls: list[tuple[str, torch.Tensor]] = []
    resident: list[str] = []

    def recorded(name, model):
        fns = tiny_fns(model, contexts)

        def denoise(noisy, sigma, indices):
            calls.append((name, sigma.detach().clone()))
            return fns.denoise(noisy, sigma, indices)
        return Expert(name, model.net, fns._replace(denoise=denoise), resident=lambda: resident.append(name))

    experts = [recorded("low_noise", low), recorded("high_noise", high)]
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    config = TrainConfig(steps=steps, batch_size=2, learning_rate=2e-3, seed=4, **{**FAST, **settings})
    return experts, latents, config, calls, resident


def test_each_step_trains_the_expert_whose_range_holds_its_levels():
    experts, latents, config, calls, resident = two_experts(steps=60)
    bases = {e.name: {k: v.clone() for k, v in e.net.state_dict().items()} for e in experts}
    result = train_experts(experts, latents, config)
    assert len(calls) == len(result.experts) == 60  # one model call per step (one caption, one size)
    for (name, sigma), stepped in zip(calls, result.experts):
        assert name == stepped and bool(in_range(sigma, name).all()), (name, sigma)
    # residency follows the switches: the first step's expert, then every change, and nothing else
    switches = [name for i, name in enumerate(result.experts) if i == 0 or result.experts[i - 1] != name]
    assert resident == switches
    # the high-noise share is about the mass above the boundary (shift 3, uniform: 0.3)
    high = result.experts.count("high_noise")
    assert 5 <= high <= 35
    for e in experts:  # both bases untouched
        assert all(torch.equal(bases[e.name][k], v) for k, v in e.net.state_dict().items())


def test_each_expert_gets_a_lora_of_its_own_that_only_its_steps_train():
    experts, latents, config, _, _ = two_experts(steps=12)
    result = train_experts(experts, latents, config)
    lora = result.lora
    assert isinstance(lora, ExpertLoras) and set(lora.experts) == {"low_noise", "high_noise"}
    assert dict(lora).keys() == lora.experts["low_noise"].keys()  # the LORA value itself is the main expert's
    assert lora.experts["low_noise"].keys() == lora.experts["high_noise"].keys()  # one architecture, one naming
    ups = [k for k in lora if k.endswith("lora_up.weight")]
    for name in lora.experts:  # every expert that had steps moved its up matrices from zero
        assert any(lora.experts[name][k].abs().sum() > 0 for k in ups), name
    assert not all(torch.equal(lora.experts["low_noise"][k], lora.experts["high_noise"][k]) for k in ups)
    # (the check above fails if the second expert's adapters train at text_encoder_lr, as a text encoder's
    # joined adapters do). An expert whose range min/max_timestep cut off is refused (shift 3: σ ≥ 0.875 from
    # t = 0.7 up)
    experts, latents, config, _, _ = two_experts(steps=4, max_timestep=600)
    with pytest.raises(ValueError, match="expert: the range σ 0.875–1"):
        train_experts(experts, latents, config)


def test_the_files_say_which_expert_they_are_for():
    experts, latents, config, _, _ = two_experts(steps=10)
    result = train_experts(experts, latents, config)
    steps = 0
    for name, lora in result.lora.experts.items():
        meta = lora.metadata
        assert meta[EXPERT] == name and meta["lora_trainer.expert_boundary"] == "0.875"
        assert (meta["ss_min_timestep"], meta["ss_max_timestep"]) == \
            (("875", "1000") if name == "high_noise" else ("0", "875"))
        assert meta["ss_steps"] == "10"
        steps += int(meta[EXPERT_STEPS])
        assert expert_stem("loras/wan22", meta) == f"loras/wan22_{name}"
        assert expert_stem(f"loras/wan22_{name}", meta) == f"loras/wan22_{name}"  # already named so
    assert steps == 10
    assert expert_stem("loras/plain", {}) == "loras/plain"
    # one expert trained alone (the options' expert) says so too
    model = build_tiny("flow")
    contexts = encode_captions(["a ramp, lrtstyle"], model.net.config.context_dim)
    alone = train(model.net, tiny_fns(model, contexts), latents, TrainConfig(steps=2, expert="high_noise", **FAST))
    assert alone.metadata[EXPERT] == "high_noise" and alone.metadata["ss_min_timestep"] == "875"
    assert EXPERT not in train(model.net, tiny_fns(model, contexts), latents,
                               TrainConfig(steps=1, **FAST)).metadata


def test_two_expert_runs_refuse_what_they_do_not_train():
    experts, latents, config, _, _ = two_experts(steps=2)
    with pytest.raises(ValueError, match="expert: got high_noise, but both experts train in this run"):
        train_experts(experts, latents, TrainConfig(steps=2, expert="high_noise", **FAST))
    with pytest.raises(ValueError, match="experts: got \\['low_noise', 'low_noise'\\]"):
        train_experts([experts[0], experts[0]], latents, config)
    with pytest.raises(ValueError, match="dop_multiplier: got 1.0, but a run of two experts"):
        train_experts(experts, latents, TrainConfig(steps=2, dop_multiplier=1.0, trigger_word="sks", **FAST))


def test_split_weights_takes_the_first_experts_paths_as_they_are():
    split = split_weights({"a.b": 1, "high_noise.a.b": 2}, ["low_noise", "high_noise"])
    assert split == {"low_noise": {"a.b": 1}, "high_noise": {"a.b": 2}}
    both = ExpertLoras({"low_noise": LoraStateDict({"k": torch.zeros(1)}, {EXPERT: "low_noise"}),
                        "high_noise": LoraStateDict({"k": torch.ones(1)}, {EXPERT: "high_noise"})}, "low_noise")
    assert both.metadata[EXPERT] == "low_noise" and torch.equal(both["k"], torch.zeros(1))
