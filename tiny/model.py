"""The bundled tiny diffusion model: a small conv + cross-attention denoiser, a sampler, a stand-in VAE.

Owns everything the demo, the tests and the benchmarks need to run the real training engine on CPU
without ComfyUI: `TinyDenoiser` (a miniature of the latent-diffusion UNet: ResBlocks with a
timestep embedding, a stride-2 down conv and a nearest-neighbour up path with a skip, and
transformer blocks with self- and cross-attention), `TinyDiffusion` (the network + one of the
schedules in `schedules.py`, wired as ComfyUI's `BaseModel.apply_model` wires them), a
deterministic Euler sampler, and a pixel-space latent codec that stands in for the VAE.

Sources: the UNet layout of Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent
Diffusion Models": ResBlock, SpatialTransformer = proj_in → self-attn → cross-attn → feed-forward
→ proj_out), the sinusoidal embedding of Vaswani et al. 2017 as used by Ho et al. 2020 (DDPM), and
the Euler sampler of Karras et al. 2022 (Algorithm 1 without churn). Written from those papers.
`build_tiny` gives seeded random weights (the tests' and benchmarks' model); the demo's base is the
one `pretrain.py` trains (`pretrained.load_pretrained`).

The network's top-level blocks are `TinyDenoiser.blocks`, each called as `block(h, emb, context)`,
so gradient checkpointing can wrap each one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .schedules import Schedule, make_schedule


@dataclass(frozen=True)
class TinyConfig:
    """Shape of a TinyDenoiser. `width` is the full-resolution channel count, `width·inner_mult`
    the half-resolution one; `context_dim` is the width of the text context (B, L, context_dim)."""

    in_channels: int = 4
    width: int = 32
    inner_mult: int = 2
    context_dim: int = 64
    heads: int = 4
    groups: int = 8
    ff_mult: int = 4
    # Self-attention at full resolution (1024 tokens at 32×32): about half of a training step's time.
    outer_self_attention: bool = True
    # A fixed sinusoidal position added to each context token, as CLIP's position embedding does: without
    # it the context is a set of word vectors, and "a red circle on a blue background" is the same set as
    # "a blue circle on a red background".
    text_positions: bool = False

    def __post_init__(self) -> None:
        for name in ("in_channels", "width", "inner_mult", "context_dim", "heads", "groups", "ff_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"TinyConfig.{name}: got {getattr(self, name)}; give 1 or more")
        for channels in (self.width, self.width * self.inner_mult):
            if channels % self.groups or channels % self.heads:
                raise ValueError(f"TinyConfig: {channels} channels must divide by groups ({self.groups}) "
                                 f"and heads ({self.heads}); change width or those counts")

    @classmethod
    def default(cls) -> TinyConfig:
        """About 0.6M parameters; one step at batch 1, 32×32 latents takes milliseconds on CPU."""
        return cls()

    @classmethod
    def wide(cls) -> TinyConfig:
        """Shaped like one SD1.x UNet level: 320 channels, 8 heads, cross-attention to 768-wide
        context (CLIP ViT-L). For benchmarks at 64×64 latents."""
        return cls(width=320, inner_mult=1, context_dim=768, heads=8, groups=32)


def timestep_embedding(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps (float, any scale ~0..1000) → (B, dim) [cos | sin] features, float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timestep.device) / half)
    args = timestep.float().reshape(-1, 1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, + Linear(time embedding) per channel, GroupNorm → SiLU → conv, + skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.silu(self.norm1(h)))
        x = x + self.emb_proj(F.silu(emb))[:, :, None, None]
        x = self.conv2(F.silu(self.norm2(x)))
        return self.skip(h) + x


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out Linears; k and v project from `context_dim`
    (cross-attention) or from the query width (self-attention, `context_dim=None`)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        kv_dim = dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim), context (B, L, context_dim) or None → (B, N, dim)."""
        source = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
        b, n, d = q.shape
        q, k, v = (t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    """Linear → GELU → Linear, widening by `mult` in between."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * mult)
        self.fc2 = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SpatialTransformer(nn.Module):
    """GroupNorm → 1×1 conv in → [LN → self-attn, LN → cross-attn(context), LN → FF] → 1×1 conv out,
    added to the input. Tokens are the H·W positions. `self_attention=False` leaves out the first."""

    def __init__(self, channels: int, config: TinyConfig, self_attention: bool = True):
        super().__init__()
        self.norm = nn.GroupNorm(config.groups, channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.norm1 = nn.LayerNorm(channels) if self_attention else None
        self.attn1 = Attention(channels, config.heads) if self_attention else None
        self.norm2 = nn.LayerNorm(channels)
        self.attn2 = Attention(channels, config.heads, config.context_dim)
        self.norm3 = nn.LayerNorm(channels)
        self.ff = FeedForward(channels, config.ff_mult)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, height, width = h.shape
        x = self.proj_in(self.norm(h)).flatten(2).transpose(1, 2)  # (B, H·W, C)
        if self.attn1 is not None:
            x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        x = x.transpose(1, 2).reshape(b, c, height, width)
        return h + self.proj_out(x)


class Downsample(nn.Module):
    """3×3 conv with stride 2: (B, C, H, W) → (B, C, ⌈H/2⌉, ⌈W/2⌉)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.conv(h)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv from `in_ch` to `out_ch`."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))


class UNetBlock(nn.Module):
    """One top-level block: its layers in order, each called as `layer(h, emb, context)`.

    `saves_skip`: its output is kept for the matching `takes_skip` block, which receives it
    concatenated on the channels (the UNet skip connection).
    """

    def __init__(self, layers: list[nn.Module], saves_skip: bool = False, takes_skip: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.saves_skip = saves_skip
        self.takes_skip = takes_skip

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, emb, context)
        return h


def _to_batch(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a batch-1 `t` (timestep embedding, context) to x's batch size."""
    return t.expand(x.shape[0], *t.shape[1:]) if t.shape[0] == 1 else t


class TinyDenoiser(nn.Module):
    """forward(x (B, C, H, W), timestep (B,), context (B, L, context_dim)) → output shaped like x.

    The output is the raw network prediction (epsilon, v or flow velocity, per the schedule it is
    paired with). Any H, W ≥ 1 works; odd sizes are cropped back after the up path.
    """

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        w, inner, emb_dim, g = config.width, config.width * config.inner_mult, config.width * 4, config.groups
        self.time_embed = nn.Sequential(nn.Linear(w, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(config.in_channels, w, 3, padding=1)
        self.blocks = nn.ModuleList([
            UNetBlock([ResBlock(w, w, emb_dim, g)], saves_skip=True),
            UNetBlock([Downsample(w), ResBlock(w, inner, emb_dim, g), SpatialTransformer(inner, config)]),
            UNetBlock([ResBlock(inner, inner, emb_dim, g), SpatialTransformer(inner, config),
                       ResBlock(inner, inner, emb_dim, g)]),
            UNetBlock([ResBlock(inner, inner, emb_dim, g), Upsample(inner, w)]),
            UNetBlock([ResBlock(2 * w, w, emb_dim, g), SpatialTransformer(w, config, config.outer_self_attention)],
                      takes_skip=True),
        ])
        self.norm_out = nn.GroupNorm(g, w)
        self.conv_out = nn.Conv2d(w, config.in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        emb = _to_batch(self.time_embed(timestep_embedding(timestep, self.config.width).to(x.dtype)), x)
        context = _to_batch(context.to(x.dtype), x)
        if self.config.text_positions:
            positions = timestep_embedding(torch.arange(context.shape[1], device=x.device), self.config.context_dim)
            context = context + positions.to(x.dtype)
        h = self.conv_in(x)
        skips: list[torch.Tensor] = []
        for block in self.blocks:
            if block.takes_skip:
                skip = skips.pop()
                h = torch.cat([h[..., :skip.shape[-2], :skip.shape[-1]], skip], dim=1)
            h = block(h, emb, context)
            if block.saves_skip:
                skips.append(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass(frozen=True)
class TinyDiffusion:
    """A TinyDenoiser and its schedule, wired as ComfyUI's `BaseModel.apply_model`:
    x0 = calculate_denoised(σ, net(calculate_input(σ, x), timestep(σ), context), x)."""

    net: TinyDenoiser
    schedule: Schedule

    @property
    def kind(self) -> str:
        return self.schedule.kind

    def denoise(self, x_noisy: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Noisy latent (B, C, H, W) at noise level sigma (B,) → predicted x0, same shape."""
        sigma = sigma.to(x_noisy.device)
        net_in = self.schedule.calculate_input(sigma, x_noisy)
        out = self.net(net_in, self.schedule.timestep(sigma), context.to(x_noisy.device))
        return self.schedule.calculate_denoised(sigma, out, x_noisy)


def build_tiny(kind: str = "eps", config: TinyConfig | None = None, seed: int = 0) -> TinyDiffusion:
    """A randomly initialised tiny model, the same weights for the same (config, seed); frozen, eval.

    `kind` is "eps", "v" or "flow". The global torch RNG is left as it was.
    """
    schedule = make_schedule(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = TinyDenoiser(config or TinyConfig.default())
    net.eval().requires_grad_(False)
    return TinyDiffusion(net, schedule)


@torch.no_grad()
def sample(model: TinyDiffusion, context: torch.Tensor, shape: tuple[int, int, int, int],
           steps: int = 20, seed: int = 0, guidance: float = 1.0) -> torch.Tensor:
    """Euler sampling (Karras et al. 2022) from seeded noise → latent of `shape` (B, C, H, W).

    context (1 or B, L, context_dim). Starts from noise scaled to sigma_max as ComfyUI does for a
    full denoise, steps x += (x − x0)/σ · (σ_next − σ), and undoes the schedule's noise scaling.
    `guidance` ≠ 1: classifier-free guidance (Ho & Salimans 2022) against the empty caption (a zero
    context), x0 = x0_empty + guidance · (x0_caption − x0_empty), as ComfyUI's CFG does.
    """
    param = next(model.net.parameters())
    schedule = model.schedule
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(param.device, param.dtype)
    sigmas = schedule.sigmas_for_sampling(steps).to(param.device)
    batch = shape[0]
    x = schedule.noise_scaling(sigmas[0].expand(batch), noise, torch.zeros_like(noise), max_denoise=True)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = model.denoise(x, sigma.expand(batch), context)
        if guidance != 1.0:
            empty = model.denoise(x, sigma.expand(batch), torch.zeros_like(context))
            denoised = empty + guidance * (denoised - empty)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    return schedule.inverse_noise_scaling(sigmas[-1].expand(batch), x)


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights


def _luma(rgb: torch.Tensor, channel_dim: int) -> torch.Tensor:
    weights = torch.tensor(LUMA, dtype=rgb.dtype, device=rgb.device)
    shape = [1] * rgb.ndim
    shape[channel_dim] = 3
    return (rgb * weights.reshape(shape)).sum(channel_dim, keepdim=True)


def encode_images(images: torch.Tensor) -> torch.Tensor:
    """Stand-in VAE encoder: images (B, H, W, 3) float in [0, 1] (ComfyUI IMAGE layout) →
    latents (B, 4, H, W) = R, G, B, luma, each mapped to [-1, 1]. No downsampling: the caller
    resizes images to the latent size it wants."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: got shape {tuple(images.shape)}; give (B, H, W, 3) RGB in [0, 1]")
    rgb = images.float().permute(0, 3, 1, 2)
    return torch.cat([rgb, _luma(rgb, 1)], dim=1) * 2.0 - 1.0


def decode_latents(latents: torch.Tensor) -> torch.Tensor:
    """Stand-in VAE decoder: latents (B, 4, H, W) → images (B, H, W, 3) in [0, 1].

    RGB come from channels 0–2; half the disagreement between channel 3 (luma) and the luma of
    that RGB is added to every channel, so an exact encoding decodes exactly.
    """
    if latents.ndim != 4 or latents.shape[1] != 4:
        raise ValueError(f"latents: got shape {tuple(latents.shape)}; give (B, 4, H, W)")
    x = (latents.float() + 1.0) / 2.0
    rgb, luma = x[:, :3], x[:, 3:]
    rgb = rgb + 0.5 * (luma - _luma(rgb, 1))
    return rgb.clamp(0.0, 1.0).permute(0, 2, 3, 1)
