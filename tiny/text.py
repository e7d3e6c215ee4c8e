"""A deterministic stand-in text encoder for the bundled tiny model (demo, tests, benchmarks).

Owns caption → context tensor for the tiny model; inside ComfyUI the real CLIP/T5 conditioning is
used instead. Each lowercased word becomes a fixed random vector: the word's SHA-256 digest
(`hashlib`, stable across runs and machines, unlike Python's salted `hash`) seeds a
`torch.Generator`, which draws the vector. Tokens are padded with zeros or truncated to a fixed
length, like a CLIP encoder's fixed 77-token context (Radford et al. 2021), here much shorter.
"""
from __future__ import annotations

import hashlib
import re

import torch

WORD = re.compile(r"\w+")


def tokenize(caption: str) -> list[str]:
    """Lowercased words of `caption`; punctuation and whitespace separate them."""
    return WORD.findall(caption.lower())


def word_vector(word: str, dim: int) -> torch.Tensor:
    """The fixed (dim,) float32 vector of one word, N(0, 1) per component."""
    seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(dim, generator=generator)


def encode_text(caption: str, dim: int, length: int = 8) -> torch.Tensor:
    """Caption → (1, length, dim) float32 on CPU; words past `length` are dropped, gaps are zeros.

    The same caption always gives an identical tensor.
    """
    if dim < 1:
        raise ValueError(f"dim: got {dim}; give the model's context width (1 or more)")
    if length < 1:
        raise ValueError(f"length: got {length}; give 1 or more tokens")
    context = torch.zeros(1, length, dim)
    for i, word in enumerate(tokenize(caption)[:length]):
        context[0, i] = word_vector(word, dim)
    return context


def encode_captions(captions: list[str], dim: int, length: int = 8) -> torch.Tensor:
    """Several captions → (B, length, dim), one row per caption, in order."""
    if not captions:
        raise ValueError("captions: got an empty list; give at least one caption")
    return torch.cat([encode_text(c, dim, length) for c in captions])
