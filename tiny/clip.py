"""A tiny CLIP-shaped text encoder, to train the engine's text-encoder LoRA on the tiny model
(tests/test_text_encoder.py): the module paths of transformers' and ComfyUI's CLIPTextModel
(`text_model.encoder.layers.N.self_attn.q_proj`, `…mlp.fc1`, layer norms, `final_layer_norm`, an
embedding), at toy width, running on the tiny model's caption vectors (tiny/text.py) as its token
embeddings; and the tiny host's callables with the captions encoded through it at every call, as
nodes/comfy_text_encoder.py does in ComfyUI."""
from __future__ import annotations

import torch
from torch import nn

from ..training.loop import ModelFns


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)
        return self.out_proj(weights @ self.v_proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.layer_norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim)
        self.layer_norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Layer(dim) for _ in range(layers))


class TextModel(nn.Module):
    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.embeddings = nn.Embedding(16, dim)  # positions; has a weight, and no adapter trains it
        self.encoder, self.final_layer_norm = Encoder(dim, layers), nn.LayerNorm(dim)


class TinyTextEncoder(nn.Module):
    """(B, L, D) caption vectors → (B, L, D) context; `text_model` as CLIP names it."""

    def __init__(self, dim: int, layers: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.text_model = TextModel(dim, layers)
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.text_model.embeddings.weight[: x.shape[1]]
        for layer in self.text_model.encoder.layers:
            x = layer(x)
        return self.text_model.final_layer_norm(x)


def live_fns(model, captions: torch.Tensor, encoders: list[nn.Module]) -> ModelFns:
    """The tiny model's callables with `captions` (N, L, D) encoded through every encoder (their sum) at each
    call, with gradients: what a trained text encoder needs from its host."""
    schedule = model.schedule

    def denoise(noisy: torch.Tensor, sigma: torch.Tensor, indices: list[int]) -> torch.Tensor:
        tokens = captions[indices]
        context = sum(encoder(tokens) for encoder in encoders)
        return model.denoise(noisy, sigma, context)

    return ModelFns(schedule.percent_to_sigma, schedule.noise_scaling, schedule.calculate_denoised, denoise,
                    flow=schedule.kind == "flow")
