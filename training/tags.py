"""Caption variants for encode-once training: a caption's comma-separated tags shuffled and/or dropped,
the first `keep_tokens` tags kept in place (kohya-ss's `--shuffle_caption`, `--caption_tag_dropout_rate`
and `--keep_tokens`).

kohya varies the caption at every use, which needs the text encoder in the loop; here each caption is
varied `n` times up front and each variant encoded once, and training draws one per use (training/data.py
`Samples`). Variant 0 is the caption as written; the others come from a generator seeded by `seed` and
the caption's position, so the same settings give the same variants (and a resumed run the same draws).
"""
from __future__ import annotations

import random


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def caption_variants(caption: str, n: int, *, shuffle: bool, dropout: float, keep_tokens: int, seed: int,
                     index: int = 0) -> list[str]:
    """`n` variants of `caption`: the caption itself, then n − 1 varied ones (see the module docstring)."""
    if n < 1:
        raise ValueError(f"caption_variants: got {n}; give 1 (the caption as written) or more")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"tag_dropout: got {dropout}; give a probability from 0 to below 1")
    variants = [caption]
    if n == 1:
        return variants
    if not shuffle and dropout == 0:
        raise ValueError(f"caption_variants: got {n}, but shuffle_tags is off and tag_dropout is 0, so every variant "
                         "would be the caption itself; turn on shuffle_tags or raise tag_dropout, or set 1")
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng = random.Random(f"{seed}:{index}")
    for _ in range(n - 1):
        varied = [t for t in rest if rng.random() >= dropout] if dropout else list(rest)
        if shuffle:
            rng.shuffle(varied)
        variants.append(", ".join(kept + varied))
    return variants
