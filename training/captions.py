"""Predicting a batch whose images have different captions: one model call per caption.

A host that conditions the whole batch at once (ComfyUI's guider combines every cond it holds over
the whole batch) is called once per distinct caption on that caption's rows, and the rows are put
back in batch order. `guider_predict` is the ComfyUI form: it sets the guider's positive conds to
one caption for one call and puts back what was there, also on error (the guider is shared).
Caption dropout (training/objective.py) routes dropped rows to the empty caption the same way.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import torch

from ..lora.patching import swapped_items

Predict = Callable[[torch.Tensor, torch.Tensor, Hashable], torch.Tensor]  # (noisy rows, sigma rows, caption) → x0


def rows_by_key(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Row numbers per key, keys in order of first appearance."""
    rows: dict[Hashable, list[int]] = {}
    for row, key in enumerate(keys):
        rows.setdefault(key, []).append(row)
    return rows


def predict_by_key(predict: Predict, noisy: torch.Tensor, sigma: torch.Tensor,
                   keys: Sequence[Hashable]) -> torch.Tensor:
    """`predict` once per distinct key on its rows; the results in batch order, in noisy's dtype."""
    groups = rows_by_key(keys)
    if len(groups) == 1:
        return predict(noisy, sigma, keys[0])
    out = torch.empty_like(noisy)
    for key, rows in groups.items():
        index = torch.tensor(rows, device=noisy.device)
        out = out.index_put((index,), predict(noisy[index], sigma[index], key).to(out.dtype))
    return out


def grouped_denoise(predict: Predict, captions: Sequence[Hashable]) -> Callable[[torch.Tensor, torch.Tensor, list[int]],
                                                                               torch.Tensor]:
    """A ModelFns.denoise from a per-caption predict; `captions[i]` is image i's caption key."""

    def denoise(noisy: torch.Tensor, sigma: torch.Tensor, indices: list[int]) -> torch.Tensor:
        return predict_by_key(predict, noisy, sigma, [captions[i] for i in indices])

    return denoise


def guider_predict(model_wrap: Any, entries: Sequence[Any], extra_args: dict) -> Predict:
    """Predict through a ComfyUI guider (`model_wrap(x, sigma, **extra_args)` with a `conds` dict):
    the caption key is a tuple of indices into `entries`, the conditioning entries applied together."""

    def predict(noisy: torch.Tensor, sigma: torch.Tensor, caption: Hashable) -> torch.Tensor:
        with swapped_items(model_wrap.conds, {"positive": [entries[e] for e in caption]}):
            return model_wrap(noisy, sigma, **extra_args)

    return predict
