"""Noise schedules in ComfyUI's three parameterisations: epsilon, v-prediction and rectified flow.

Owns the bundled tiny model's sigma ↔ timestep tables and per-parameterisation maths. Method names
and semantics mirror ComfyUI's `comfy/model_sampling.py` (`ModelSamplingDiscrete` + `EPS` /
`V_PREDICTION`, `ModelSamplingDiscreteFlow` + `CONST`), so the engine drives a ComfyUI model and
the tiny model through the same calls. Everything is in terms of sigma, the noise level, never the
integer timestep.

Sources:
- SD1.x "scaled linear" betas (Rombach et al. 2022, CompVis `ldm` config: linear_start 0.00085,
  linear_end 0.012) and sigma = sqrt((1 - ᾱ) / ᾱ) (Karras et al. 2022, "Elucidating the Design
  Space", the VE view of a VP model).
- v-prediction: Salimans & Ho 2022, "Progressive Distillation", written with sigma_data as in
  Karras et al. 2022: x0 = x·sd²/(σ²+sd²) − out·σ·sd/√(σ²+sd²).
- Rectified flow with timestep shift: Esser et al. 2024 (SD3), σ(t) = s·t / (1 + (s−1)·t).

Shapes: sigma is (B,) (or a 0-d tensor) and broadcasts over latents (B, C, H, W).
"""
from __future__ import annotations

import math
from typing import Protocol

import torch

NUM_TIMESTEPS = 1000
SD1_BETA_START = 0.00085
SD1_BETA_END = 0.012
KINDS = ("eps", "v", "flow")


class Schedule(Protocol):
    """What the engine and the tiny model need from a schedule (ComfyUI `model_sampling` subset)."""

    kind: str

    @property
    def sigma_min(self) -> float: ...

    @property
    def sigma_max(self) -> float: ...

    def percent_to_sigma(self, percent: torch.Tensor) -> torch.Tensor: ...

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor: ...

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor: ...

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor: ...

    def calculate_input(self, sigma: torch.Tensor, x_noisy: torch.Tensor) -> torch.Tensor: ...

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           x_noisy: torch.Tensor) -> torch.Tensor: ...

    def sigmas_for_sampling(self, steps: int) -> torch.Tensor: ...


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sigma (B,) or 0-d → (B, 1, 1, 1) (as many 1s as `like` needs), in `like`'s dtype and device."""
    return sigma.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _sampling_sigmas(schedule: Schedule, steps: int) -> torch.Tensor:
    """`steps` sigmas from sigma_max to sigma_min, evenly spaced in timestep, then a final 0."""
    if steps < 1:
        raise ValueError(f"steps: got {steps}; give 1 or more")
    percent = torch.linspace(0.0, 1.0, steps) if steps > 1 else torch.zeros(1)
    return torch.cat([schedule.percent_to_sigma(percent), torch.zeros(1)])


class _SigmaTable:
    """`sigmas`: a 1000-entry table ascending with the timestep; its ends are the schedule's range."""

    sigmas: torch.Tensor

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])


class EpsSchedule(_SigmaTable):
    """SD1.x discrete schedule, epsilon prediction: the network predicts the added noise.

    x_noisy = x0 + σ·noise; network input x / √(σ²+1); x0 = x − out·σ. Target: out = noise.
    """

    kind = "eps"
    sigma_data = 1.0

    def __init__(self) -> None:
        betas = torch.linspace(math.sqrt(SD1_BETA_START), math.sqrt(SD1_BETA_END), NUM_TIMESTEPS,
                               dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.sigmas = sigmas.float()  # ascending with the timestep, index 0..999
        self.log_sigmas = sigmas.log().float()

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Continuous timestep in [0, 999] → sigma, interpolating log σ between table entries."""
        t = timestep.float().clamp(0, NUM_TIMESTEPS - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        table = self.log_sigmas.to(t.device)
        return ((1 - w) * table[low] + w * table[high]).exp()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma → continuous index into the log-sigma table, in [0, 999] (the network's t)."""
        log_sigma = sigma.float().clamp_min(1e-10).log().reshape(-1)
        table = self.log_sigmas.to(log_sigma.device)
        high = torch.searchsorted(table, log_sigma).clamp(1, NUM_TIMESTEPS - 1)
        low = high - 1
        w = ((log_sigma - table[low]) / (table[high] - table[low])).clamp(0, 1)
        return (low.float() + w).reshape(sigma.shape)

    def percent_to_sigma(self, percent: torch.Tensor) -> torch.Tensor:
        """percent 0 → sigma_max, 1 → sigma_min, through the table (ComfyUI: σ((1 − p)·999))."""
        return self.sigma((1.0 - percent.float().clamp(0, 1)) * (NUM_TIMESTEPS - 1))

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        """x0 + σ·noise; `max_denoise` (pure noise start) uses √(1+σ²) as ComfyUI does."""
        s = _per_sample(sigma, noise)
        if max_denoise:
            s = (s ** 2 + 1.0).sqrt()
        return latent + noise * s

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Identity for eps/v: the sampled latent is already x0-scaled."""
        return latent

    def calculate_input(self, sigma: torch.Tensor, x_noisy: torch.Tensor) -> torch.Tensor:
        """x / √(σ² + sd²): unit-variance network input."""
        s = _per_sample(sigma, x_noisy)
        return x_noisy / (s ** 2 + self.sigma_data ** 2).sqrt()

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           x_noisy: torch.Tensor) -> torch.Tensor:
        """x0 = x − out·σ."""
        return x_noisy - model_output * _per_sample(sigma, x_noisy)

    def sigmas_for_sampling(self, steps: int) -> torch.Tensor:
        """(steps + 1,) descending sigmas ending with 0, evenly spaced in timestep."""
        return _sampling_sigmas(self, steps)


class VSchedule(EpsSchedule):
    """SD2.x-style v-prediction on the same discrete sigmas (sigma_data = 1).

    x0 = x·sd²/(σ²+sd²) − out·σ·sd/√(σ²+sd²). Target (sd = 1): out = (noise − σ·x0) / √(σ²+1).
    """

    kind = "v"

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           x_noisy: torch.Tensor) -> torch.Tensor:
        s = _per_sample(sigma, x_noisy)
        sd2 = self.sigma_data ** 2
        return x_noisy * sd2 / (s ** 2 + sd2) - model_output * s * self.sigma_data / (s ** 2 + sd2).sqrt()


class FlowSchedule(_SigmaTable):
    """Rectified flow (SD3/Flux-style `CONST` sampling) with a timestep shift.

    σ(t) = shift·t / (1 + (shift−1)·t), t in (0, 1] on a 1000-step table; x_noisy = σ·noise + (1−σ)·x0;
    network input x unchanged, network t = σ·1000; x0 = x − out·σ. Target: out = noise − x0.
    """

    kind = "flow"

    def __init__(self, shift: float = 3.0) -> None:
        if not shift > 0:
            raise ValueError(f"shift: got {shift}; give a positive number (3.0 is SD3's)")
        self.shift = float(shift)
        t = torch.arange(1, NUM_TIMESTEPS + 1, dtype=torch.float64) / NUM_TIMESTEPS
        self.sigmas = self._shifted(t).float()  # ascending, sigmas[-1] == 1

    def _shifted(self, t: torch.Tensor) -> torch.Tensor:
        return self.shift * t / (1 + (self.shift - 1) * t)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma → the network's t = σ·1000."""
        return sigma.float() * NUM_TIMESTEPS

    def percent_to_sigma(self, percent: torch.Tensor) -> torch.Tensor:
        """percent 0 → sigma_max (1.0), 1 → sigma_min; σ = shift(1 − p) as ComfyUI, kept in the table."""
        t = (1.0 - percent.float()).clamp(1.0 / NUM_TIMESTEPS, 1.0)
        return self._shifted(t)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        """σ·noise + (1 − σ)·x0 (`max_denoise` changes nothing for flow)."""
        s = _per_sample(sigma, noise)
        return s * noise + (1.0 - s) * latent

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """latent / (1 − σ), with 1 − σ kept ≥ 1e-4 so σ = 1 gives a finite value."""
        s = _per_sample(sigma, latent)
        return latent / (1.0 - s).clamp_min(1e-4)

    def calculate_input(self, sigma: torch.Tensor, x_noisy: torch.Tensor) -> torch.Tensor:
        """Identity: flow models take the noisy latent as is."""
        return x_noisy

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           x_noisy: torch.Tensor) -> torch.Tensor:
        """x0 = x − out·σ."""
        return x_noisy - model_output * _per_sample(sigma, x_noisy)

    def sigmas_for_sampling(self, steps: int) -> torch.Tensor:
        """(steps + 1,) descending sigmas from 1.0, ending with 0, evenly spaced in t before the shift."""
        return _sampling_sigmas(self, steps)


def make_schedule(kind: str) -> EpsSchedule | VSchedule | FlowSchedule:
    """"eps" → EpsSchedule, "v" → VSchedule, "flow" → FlowSchedule(shift=3.0)."""
    if kind == "eps":
        return EpsSchedule()
    if kind == "v":
        return VSchedule()
    if kind == "flow":
        return FlowSchedule()
    raise ValueError(f"kind: got {kind!r}; choose one of {', '.join(KINDS)}")
