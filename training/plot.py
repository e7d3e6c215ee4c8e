"""The loss graph: raw and smoothed curves, steps on x, log scale when the loss spans decades.

Drawn with matplotlib's object API on an Agg canvas (no pyplot global state, no display needed).
One step, or a flat curve, draws fine. A validation loss (training/validation.py), when given, is a
second line in another colour with a marker at each measured step, labelled "validation"; its step
k is the loss after k optimizer steps (0 = before training), on the same x axis as the loss list.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def smooth(values: Sequence[float], window: int | None = None) -> np.ndarray:
    """Centred moving average (window ~ n/10, at least 1), narrowing symmetrically at the ends: no lag."""
    v = np.asarray(values, dtype=np.float64)
    half = (window or max(1, len(v) // 10)) // 2
    cumsum = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(len(v))
    reach = np.minimum(np.minimum(i, len(v) - 1 - i), half)  # symmetric, so the ends do not lean
    lo, hi = i - reach, i + reach + 1
    return (cumsum[hi] - cumsum[lo]) / (hi - lo)


def plot_losses(losses: Sequence[float], first_step: int = 1, title: str = "Training loss",
                validation: Sequence[tuple[int, float]] = ()) -> np.ndarray:
    """Render the curve (loss i at step first_step + i) and the validation points (step, loss), if any;
    returns an RGB uint8 image (H, W, 3). Raises ValueError on an empty loss list."""
    if len(losses) == 0:
        raise ValueError("loss: the loss history is empty; train for at least one step")
    values = np.asarray(losses, dtype=np.float64)
    steps = np.arange(first_step, first_step + len(values))
    fig = Figure(figsize=(8, 4.5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=1, marker="o" if len(values) < 3 else None,
            label="loss")
    if len(values) >= 3:
        ax.plot(steps, smooth(values), color="tab:blue", linewidth=2, label="smoothed")
    if len(validation):
        val_steps, val_values = (np.asarray(column, dtype=np.float64) for column in zip(*validation))
        ax.plot(val_steps, val_values, color="tab:orange", linewidth=2, marker="o", markersize=5, label="validation")
        values = np.concatenate([values, val_values])  # the scale covers both lines
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() >= 10:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
