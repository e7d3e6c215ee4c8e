"""The training objective: the noise-level draw, the noise, the loss weighting and the loss functions.

One call of `Objective.loss` is the loss of one same-shape group of images:
1) noise ε ~ N(0, I), seeded (plus the noise options: offset, multires);
2) a noise level per image: a percent through the model's schedule, uniform by default
   (0 = most noise, ComfyUI's `percent_to_sigma`), or logit-normal / sigmoid, in a min/max range;
   flow models may override the schedule's shift; an expert (Wan 2.2 A14B) draws only inside its σ
   range, from the same distribution truncated there (`draw_percent`'s `window`);
3) the noisy latent through the model's own `noise_scaling`, the prediction through the host;
4) the loss in the model's native prediction space (eps / v / flow velocity) or in x0 space,
   per image, weighted (min-SNR-γ, debiased estimation), averaged.

The host's denoise is affine in the network output, `x0 = a(x, σ) + c(σ)·out`, so the native error
is the x0 error divided by `c(σ)` (`output_coefficient`), for any family. Everything is expressed
through sigma, never through a family's timestep table.
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .config import TrainConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pred, target) → per-element loss


class ModelFns(NamedTuple):
    """How the engine drives one diffusion model. Shapes: sigma (B,), latents (B, C, H, W), or
    (B, C, T, H, W) for video (any rank from 4 up: everything here is per image, whatever its axes).

    percent_to_sigma: percent in [0, 1] → sigma (0 = most noise), through the model's schedule.
    noise_scaling: (sigma, noise, x0) → noisy latent.
    calculate_denoised: (sigma, network output, noisy latent) → x0; affine in the output.
    denoise: (noisy latent, sigma, image indices) → predicted x0; the host picks the conditioning
        of those images and runs the network (with adapters) on them.
    denoise_uncond: (noisy latent, sigma) → predicted x0 with the empty caption; None when the host
        has no unconditional conditioning (caption dropout then refuses to run).
    denoise_bare: like denoise, with the images' captions without their condition images (reference,
        start frame, inpainting image); None when no caption has one (control dropout then refuses to run).
    flow: the model is a rectified-flow model (σ in (0, 1], x = (1 − σ)·x0 + σ·ε): a shift override
        applies to it only.
    denoise_preserve: like denoise, with the images' preservation captions (the trigger word replaced by
        the class word); None when the host has none (differential output preservation then refuses to run).
    """

    percent_to_sigma: Callable[[torch.Tensor], torch.Tensor]
    noise_scaling: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    calculate_denoised: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    denoise: Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]
    denoise_uncond: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    flow: bool = False
    denoise_bare: Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor] | None = None
    denoise_preserve: Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor] | None = None


_LOSSES: dict[str, LossFn] = {
    "MSE": lambda p, t: F.mse_loss(p, t, reduction="none"),
    "L1": lambda p, t: F.l1_loss(p, t, reduction="none"),
    "Huber": lambda p, t: F.huber_loss(p, t, reduction="none"),  # delta 1
    "SmoothL1": lambda p, t: F.smooth_l1_loss(p, t, reduction="none"),  # beta 1
}


def loss_function(name: str) -> LossFn:
    """The per-element loss of that name (MSE, L1, Huber with delta 1, SmoothL1 with beta 1)."""
    return _LOSSES[name]


def output_coefficient(fns: ModelFns, sigma: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    """c(σ) = ∂x0/∂out, shaped (B, 1, …) with `ndim` axes, the latents' (5 for video): the slope of
    the affine denoise. The trap: a (B, 1, 1, 1) against (B, C, T, H, W) broadcasts B onto C."""
    one = torch.ones(sigma.shape[0], *[1] * (ndim - 1), device=sigma.device)
    zero = torch.zeros_like(one)
    return fns.calculate_denoised(sigma, one, zero) - fns.calculate_denoised(sigma, zero, zero)


def snr(fns: ModelFns, sigma: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio (a/b)² of `noisy = a·x0 + b·ε` at each sigma, (B,), from the model's own
    noise_scaling: 1/σ² for eps and v (ComfyUI's VE view of a VP model), ((1 − σ)/σ)² for flow."""
    one = torch.ones(sigma.shape[0], 1, 1, 1, device=sigma.device)
    zero = torch.zeros_like(one)
    a = fns.noise_scaling(sigma, zero, one).flatten()
    b = fns.noise_scaling(sigma, one, zero).flatten()
    return (a / b) ** 2


def per_image(loss: torch.Tensor) -> torch.Tensor:
    """(B, ...) element losses → (B,) means."""
    return loss.flatten(1).mean(1)


def space_loss(loss_fn: LossFn, pred: torch.Tensor, target: torch.Tensor, coefficient: torch.Tensor | float,
               space: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) the loss per image in the loss space, the one place it is written. pred, target: x0
    (B, C, …); coefficient: c(σ) broadcastable to them (`output_coefficient`). native: prediction and
    target over c(σ), the error of the model's own output (eps / v / flow); x0: as they are.
    `weight`: per-element weights broadcastable to them (a masked loss: `mask_weights`), or None."""
    if space == "native":
        loss = loss_fn(pred / coefficient, target / coefficient)
    else:
        loss = loss_fn(pred, target)
    return per_image(loss if weight is None else loss * weight)


def mask_weights(mask: torch.Tensor, unmasked_weight: float, normalize: bool) -> torch.Tensor:
    """A masked loss's element weights from masks (B, 1, …) in [0, 1] at the latent's size: 1 inside,
    `unmasked_weight` outside, blended at soft edges. `normalize` divides each image's weights by their
    mean, so a small mask weighs as much as a large one (a mask of all zeros with weight 0 stays zero)."""
    weight = unmasked_weight + (1.0 - unmasked_weight) * mask.float()
    if not normalize:
        return weight
    mean = weight.flatten(1).mean(1).clamp(min=1e-6)
    return weight / mean.reshape(-1, *[1] * (weight.dim() - 1))


def draw_percent(n: int, generator: torch.Generator, config: TrainConfig,
                 window: tuple[float, float] | None = None) -> torch.Tensor:
    """(n,) noise levels as percents through the schedule (0 = most noise), in the min/max timestep range.

    The timestep fraction t = 1 − percent is drawn uniform, logit-normal (t = sigmoid(N(mean, std)),
    SD3's "logit-normal sampling") or sigmoid (t = sigmoid(scale·N(0, 1)), kohya's Flux default),
    then mapped affinely into [min_timestep, max_timestep] / 1000.
    `window` (t_low, t_high): only t in it, drawn from that same distribution truncated to it (its shape
    kept, as musubi-tuner's preserve_distribution_shape keeps it by redrawing; here by inverting the CDF,
    one uniform draw per image); None: the whole range, drawn as without it.
    """
    low, high = config.min_timestep / 1000, config.max_timestep / 1000
    if window is not None:
        a, b = _raw_window(config, window)
        cdf_a, cdf_b = _cdf(config, a), _cdf(config, b)
        q = cdf_a + (cdf_b - cdf_a) * torch.rand(n, generator=generator, dtype=torch.float64)
        t = _quantile(config, q).clamp(a, b)  # the clamp only catches the CDF's rounding at the edges
        return (1 - (low + (high - low) * t)).float()
    if config.timestep_sampling == "uniform":
        # percent uniform in [1 − high, 1 − low]: with the full range exactly today's torch.rand draw
        return (1 - high) + (high - low) * torch.rand(n, generator=generator)
    z = torch.randn(n, generator=generator)
    if config.timestep_sampling == "logit_normal":
        t = torch.sigmoid(config.logit_mean + config.logit_std * z)
    else:
        t = torch.sigmoid(config.sigmoid_scale * z)
    return 1 - (low + (high - low) * t)


def _logit_normal(config: TrainConfig) -> tuple[float, float]:
    """(mean, std) of the normal whose sigmoid is the drawn fraction: logit_normal's, or sigmoid's (0, scale)."""
    if config.timestep_sampling == "logit_normal":
        return config.logit_mean, config.logit_std
    return 0.0, config.sigmoid_scale


def _cdf(config: TrainConfig, u: float) -> float:
    """P(drawn fraction ≤ u) of the configured distribution on [0, 1], before the min/max mapping."""
    if config.timestep_sampling == "uniform" or u <= 0 or u >= 1:
        return min(max(u, 0.0), 1.0)
    mean, std = _logit_normal(config)
    return float(torch.special.ndtr(torch.tensor((math.log(u / (1 - u)) - mean) / std, dtype=torch.float64)))


def _quantile(config: TrainConfig, q: torch.Tensor) -> torch.Tensor:
    """The inverse of `_cdf` (float64 in, float64 out)."""
    if config.timestep_sampling == "uniform":
        return q
    mean, std = _logit_normal(config)
    return torch.sigmoid(mean + std * torch.special.ndtri(q))


def _raw_window(config: TrainConfig, window: tuple[float, float]) -> tuple[float, float]:
    """A window of the final fraction t → the same window before the min/max mapping, inside [0, 1]."""
    low, high = config.min_timestep / 1000, config.max_timestep / 1000
    a = min(max((window[0] - low) / (high - low), 0.0), 1.0)
    b = min(max((window[1] - low) / (high - low), 0.0), 1.0)
    return a, b


def window_mass(config: TrainConfig, window: tuple[float, float]) -> float:
    """The probability that a draw of the whole range lands in `window` (t_low, t_high): an expert's share
    of the steps when each step trains the expert whose range holds its level (training/experts.py)."""
    a, b = _raw_window(config, window)
    return _cdf(config, b) - _cdf(config, a)


def expert_range(expert: str, boundary: float) -> tuple[float, float] | None:
    """The σ range (low, high) an expert of a Wan 2.2 A14B-style model trains on: high_noise σ ≥ boundary,
    low_noise σ < boundary (Wan's own switch, `t ≥ boundary · 1000` on the shifted timestep t = 1000·σ);
    None for "none" (the whole range)."""
    return {"none": None, "high_noise": (boundary, 1.0), "low_noise": (0.0, boundary)}[expert]


def _schedule_fraction(fns: ModelFns, sigma: float) -> float:
    """The fraction t = 1 − percent at which the model's own schedule reaches `sigma` (flow: σ in (0, 1)),
    by bisection on `percent_to_sigma` (decreasing in percent), to float precision."""
    lo, hi = 0.0, 1.0  # percents: σ(lo) ≥ sigma ≥ σ(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(fns.percent_to_sigma(torch.tensor([mid]))[0]) >= sigma:
            lo = mid
        else:
            hi = mid
    return 1 - (lo + hi) / 2


def unshifted_fraction(sigma: float, shift: float) -> float:
    """The inverse of `shifted_sigma`: t = σ / (s − (s − 1)·σ)."""
    return sigma / (shift - (shift - 1) * sigma)


def shifted_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Rectified flow's timestep shift (Esser et al. 2024): σ = s·t / (1 + (s − 1)·t), t in (0, 1]."""
    return shift * t / (1 + (shift - 1) * t)


def flux_shift(height: int, width: int) -> float:
    """Flux's resolution-dependent shift for a latent of height × width: s = e^μ, μ linear in the
    token count (2×2 patches) from 0.5 at 256 tokens to 1.15 at 4096 (Flux's `time_shift`)."""
    tokens = (height // 2) * (width // 2)
    return math.exp(0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256))


def offset_noise(noise: torch.Tensor, generator: torch.Generator, offset: float) -> torch.Tensor:
    """noise + offset·N(0, 1) per image and channel (B, C, 1, 1) (Guttenberg's "noise offset")."""
    shift = torch.randn(noise.shape[0], noise.shape[1], *[1] * (noise.dim() - 2), generator=generator)
    return noise + offset * shift


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multires (pyramid) noise (Whitaker 2023): for level i = 1…iterations, noise drawn at the size
    divided by r^i (r uniform in [2, 4)), upsampled bilinearly, weighted discount^i and added; stops
    once a side reaches 1; each image renormalised to unit standard deviation.

    Video (B, C, T, H, W): per frame, each frame an image of its own (its own coarse noise, its own
    renormalisation; the level ratios r are shared by all frames of the call)."""
    if noise.dim() > 4:
        frames = noise.movedim(1, -3)  # (B, T…, C, H, W)
        flat = pyramid_noise(frames.reshape(-1, *frames.shape[-3:]), generator, iterations, discount)
        return flat.reshape(frames.shape).movedim(-3, 1)
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(1, iterations + 1):
        r = 2 + 2 * float(torch.rand(1, generator=generator))
        hi, wi = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        coarse = torch.randn(b, c, hi, wi, generator=generator)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount ** i
        if hi == 1 or wi == 1:
            break
    return out / out.flatten(1).std(1).reshape(b, 1, 1, 1)


def loss_weights(fns: ModelFns, sigma: torch.Tensor, config: TrainConfig) -> torch.Tensor | None:
    """Per-image weights (B,) of the loss in the config's loss space; None = all 1.

    Defined on the x0 error (Hang et al. 2023 write min-SNR as min(SNR, γ)·‖x̂0 − x0‖²), so they hold
    for every parameterisation: min_snr w0 = min(SNR, γ), debiased w0 = √SNR (SNR capped at 1000, as
    kohya-ss does). The native loss is the x0 loss over c(σ)², so there w = w0·c(σ)²: for eps
    min(SNR, γ)/SNR and 1/√SNR, for v min(SNR, γ)/(SNR + 1).
    """
    if config.loss_weighting == "none":
        return None
    ratio = snr(fns, sigma)
    if config.loss_weighting == "min_snr":
        w0 = ratio.clamp(max=config.min_snr_gamma)
    else:
        w0 = ratio.clamp(max=1000.0).sqrt()
    if config.loss_space == "native":
        return w0 * output_coefficient(fns, sigma).flatten() ** 2
    return w0


class Objective:
    """The loss of one same-shape group; `loss(x0, indices, generator)` draws from `generator` only.

    Preservation (ai-toolkit's differential output and blank-prompt preservation): for the same noisy
    latents and levels, the prediction with the preservation caption (`denoise_preserve`) or the empty
    caption (`denoise_uncond`) and the adapters off (`bypass`, no gradient) is the target of the
    prediction with the same caption and the adapters on; its loss, times `dop_multiplier` or
    `blank_prompt_multiplier`, is added per image, so what the LoRA changes is kept to the trigger."""

    def __init__(self, fns: ModelFns, config: TrainConfig, device: torch.device,
                 bypass: Callable[[], AbstractContextManager] | None = None,
                 sigma_range: tuple[float, float] | None = None):
        """`bypass`: a context in which the adapters are off (preservation needs it). `sigma_range` (low, high):
        draw only σ in it (an expert's range; None: the config's `expert`, by default the whole range). Raises
        ValueError for options this model or host cannot take (named by field)."""
        if config.flow_shift != "model" and not fns.flow:
            raise ValueError(f"flow_shift: got {config.flow_shift!r}, but this model is not a flow model (SD3, Flux, "
                             "...) and has no shift; set flow_shift to model")
        if config.caption_dropout > 0 and fns.denoise_uncond is None:
            raise ValueError(f"caption_dropout: got {config.caption_dropout}, but there is no unconditional "
                             "conditioning to drop captions to; connect an empty-prompt CONDITIONING to the options "
                             "node's unconditional input, or set caption_dropout to 0")
        if config.control_dropout > 0 and fns.denoise_bare is None:
            raise ValueError(f"control_dropout: got {config.control_dropout}, but no caption carries a condition image "
                             "to drop (a reference latent, a start frame, an inpainting image); give the captions one "
                             "(e.g. Encode Training Folder's control_folder), or set control_dropout to 0")
        if config.dop_multiplier and fns.denoise_preserve is None:
            raise ValueError(f"dop_multiplier: got {config.dop_multiplier}, but there are no preservation captions; "
                             "connect the text encoder (clip) and the captions (as text) to the LoRA Preservation "
                             "node, or set dop_multiplier to 0")
        if config.blank_prompt_multiplier and fns.denoise_uncond is None:
            raise ValueError(f"blank_prompt_multiplier: got {config.blank_prompt_multiplier}, but there is no empty "
                             "caption; connect an empty-prompt CONDITIONING to the options node's unconditional "
                             "input, or set blank_prompt_multiplier to 0")
        self.window = self._expert_window(fns, config, sigma_range)
        self.preserved = [(m, call) for m, call in (
            (config.dop_multiplier, fns.denoise_preserve),
            (config.blank_prompt_multiplier, lambda n, s, _: fns.denoise_uncond(n, s))) if m]
        self.bypass = bypass
        self.fns, self.config = fns, config
        self.loss_fn = loss_function(config.loss_function)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.training_dtype == "bf16")

    def loss(self, x0: torch.Tensor, indices: list[int], generator: torch.Generator,
             rows: list[int] | None = None, mask: torch.Tensor | None = None,
             image_weights: torch.Tensor | None = None) -> torch.Tensor | None:
        """x0 (B, C, H, W), the latents of images `indices` → the mean loss (0-d, fp32, with grad).

        Draw order (all from `generator`): noise, its offset and pyramid, levels, input perturbation,
        caption dropout, control dropout; an option that is off draws nothing, so the defaults draw as before options.
        `rows` (data-parallel training, training/distributed.py): everything is drawn for all B rows,
        as without it, but only these rows run through the model; the result is their share of the
        mean (their sum over B), so the shares of all processes add up to it; None if `rows` is empty.
        `mask` (B, 1, …) at the latents' size weighs the loss per element (`mask_weights`); it draws nothing.
        `image_weights` (B,) weigh each image's loss (a regularisation image's prior_loss_weight).
        """
        cfg, fns = self.config, self.fns
        noise = self.noise(x0.shape, generator).to(x0.device, x0.dtype)
        sigma = self.sigma(len(indices), x0.shape, generator).to(x0.device)
        noisy = fns.noise_scaling(sigma, noise, x0)
        target = x0
        if cfg.ip_noise_gamma:
            # the input sees noise + γξ; the target stays the one for `noise`: in x0 terms, x0 moved by
            # how far the perturbed input moves the denoise's output-free part a(x, σ)
            xi = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
            perturbed = fns.noise_scaling(sigma, noise + cfg.ip_noise_gamma * xi, x0)
            target = x0 + self._free_part(sigma, perturbed) - self._free_part(sigma, noisy)
            noisy = perturbed
        dropped = torch.rand(len(indices), generator=generator) < cfg.caption_dropout if cfg.caption_dropout else None
        bare = torch.rand(len(indices), generator=generator) < cfg.control_dropout if cfg.control_dropout else None
        batch = len(indices)
        if rows is not None:
            if not rows:
                return None
            x0, noisy, target, sigma = x0[rows], noisy[rows], target[rows], sigma[rows]
            mask = mask[rows] if mask is not None else None
            indices = [indices[r] for r in rows]
            dropped = dropped[rows] if dropped is not None else None
            bare = bare[rows] if bare is not None else None
            image_weights = image_weights[rows] if image_weights is not None else None
        with self.autocast:
            pred = self.predict(noisy, sigma, indices, dropped, bare)
        c = output_coefficient(fns, sigma, x0.dim()) if cfg.loss_space == "native" else 1.0
        weight = None if mask is None else mask_weights(mask.to(x0.device), cfg.unmasked_weight, cfg.normalize_mask)
        per = space_loss(self.loss_fn, pred.float(), target, c, cfg.loss_space, weight)
        weights = loss_weights(fns, sigma, cfg)
        per = per if weights is None else per * weights
        if image_weights is not None:
            per = per * image_weights.to(per.device)
        if self.preserved:
            per = per + self.preservation(noisy, sigma, indices, c, weights)
        return per.mean() if rows is None else per.sum() / batch

    def preservation(self, noisy: torch.Tensor, sigma: torch.Tensor, indices: list[int], c: torch.Tensor | float,
                     weights: torch.Tensor | None) -> torch.Tensor:
        """(B,) the preservation losses of these rows, each times its multiplier: the adapters' prediction
        with the preservation (or empty) caption against the base's, at the same noisy latents and levels."""
        total = torch.zeros((), device=noisy.device)
        for multiplier, call in self.preserved:
            with torch.no_grad(), self.bypass(), self.autocast:
                target = call(noisy, sigma, indices).float()
            with self.autocast:
                pred = call(noisy, sigma, indices)
            term = space_loss(self.loss_fn, pred.float(), target, c, self.config.loss_space)
            total = total + multiplier * (term if weights is None else term * weights)
        return total

    @staticmethod
    def _expert_window(fns: ModelFns, config: TrainConfig,
                       sigma_range: tuple[float, float] | None) -> tuple[float, float] | None:
        """The σ range as a window (t_low, t_high) of the drawn fraction t (before the shift, which is monotone:
        the window's draws are exactly the σ range's); None for the whole range."""
        sigma_range = sigma_range or expert_range(config.expert, config.expert_boundary)
        if sigma_range is None:
            return None
        if not fns.flow:
            raise ValueError(f"expert: got {config.expert}, but this model is not a flow model; noise-range experts "
                             "(Wan 2.2 A14B) switch on the flow σ; set expert to none")
        if config.flow_shift == "resolution":
            raise ValueError("flow_shift: 'resolution' gives each latent size its own shift, so an expert's σ range "
                             "has no one timestep window; set flow_shift to model or fixed")
        if config.flow_shift == "fixed":
            to_t = lambda sigma: unshifted_fraction(sigma, config.flow_shift_value)  # noqa: E731
        else:
            to_t = lambda sigma: _schedule_fraction(fns, sigma)  # noqa: E731
        window = tuple(1.0 if s >= 1 else 0.0 if s <= 0 else to_t(s) for s in sigma_range)
        if window_mass(config, window) <= 0:
            raise ValueError(f"expert: the range σ {sigma_range[0]:g}–{sigma_range[1]:g} (timestep fraction "
                             f"{window[0]:.3f}–{window[1]:.3f} before the shift) lies outside min_timestep "
                             f"{config.min_timestep} to max_timestep {config.max_timestep}; widen that range, or "
                             "move expert_boundary")
        return window

    def noise(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """ε ~ N(0, I) of `shape` (B, C, H, W) or (B, C, T, H, W) on the CPU, with the config's offset
        (per image and channel) and pyramid (per frame for video)."""
        noise = torch.randn(shape, generator=generator)
        if self.config.noise_offset:
            noise = offset_noise(noise, generator, self.config.noise_offset)
        if self.config.multires_noise_iterations:
            noise = pyramid_noise(noise, generator, self.config.multires_noise_iterations,
                                  self.config.multires_noise_discount)
        return noise

    def sigma(self, n: int, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """(n,) noise levels: the drawn percents through the model's schedule, or the shift override."""
        percent = draw_percent(n, generator, self.config, self.window)
        if self.config.flow_shift == "model":
            return self.fns.percent_to_sigma(percent)
        if self.config.flow_shift == "resolution" and len(shape) > 4:
            raise ValueError(f"flow_shift: 'resolution' is Flux's shift for image latents, but these latents are video "
                             f"{tuple(shape[1:])} (channels, frames, height, width); set flow_shift to model (the "
                             "model's own shift, e.g. Wan's) or fixed with a flow_shift_value")
        shift = self.config.flow_shift_value if self.config.flow_shift == "fixed" else flux_shift(shape[-2], shape[-1])
        return shifted_sigma((1 - percent).clamp(1e-5, 1.0), shift)

    def predict(self, noisy: torch.Tensor, sigma: torch.Tensor, indices: list[int],
                dropped: torch.Tensor | None, bare: torch.Tensor | None = None) -> torch.Tensor:
        """The host's x0 prediction; rows whose caption is dropped use the empty caption, the other rows whose
        condition image is dropped (`bare`) their caption without it. Each kind runs as one call."""
        fns = self.fns
        calls = (fns.denoise, lambda n, s, _: fns.denoise_uncond(n, s), fns.denoise_bare)
        route = torch.zeros(len(indices), dtype=torch.long)
        if bare is not None:
            route[bare.cpu()] = 2
        if dropped is not None:
            route[dropped.cpu()] = 1
        kinds = sorted(set(route.tolist()))
        if len(kinds) == 1:
            return calls[kinds[0]](noisy, sigma, indices)
        out = torch.empty_like(noisy)
        for kind in kinds:
            rows = (route == kind).nonzero().flatten()
            part = calls[kind](noisy[rows], sigma[rows], [indices[i] for i in rows.tolist()])
            out = out.index_put((rows.to(noisy.device),), part.to(out.dtype))
        return out

    def _free_part(self, sigma: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """a(x, σ): the denoise with a zero network output."""
        return self.fns.calculate_denoised(sigma, torch.zeros_like(noisy), noisy)
