"""The LOSS_MAP, Train LoRA's `loss` output and Plot Loss Graph's input: core's `{"loss": [...]}` (one
value per optimizer step), plus, when Train LoRA had a validation set, `"validation_step"` and
`"validation_loss"`: equal-length lists of the steps measured (k = after k optimizer steps, 0 = before
training) and their validation loss; when it trained both experts of a model (high_noise_model), `"expert"`:
the expert each step trained ("high_noise" or "low_noise"), one per loss value. No ComfyUI import.
"""
from __future__ import annotations

VALIDATION_STEP, VALIDATION_LOSS = "validation_step", "validation_loss"  # LOSS_MAP keys
EXPERTS_KEY = "expert"


def validation_points(loss: dict) -> list[tuple[int, float]]:
    """The LOSS_MAP's validation as (step, loss) pairs; [] when it has none."""
    steps, values = loss.get(VALIDATION_STEP), loss.get(VALIDATION_LOSS)
    if steps is None and values is None:
        return []
    if steps is None or values is None or len(steps) != len(values):
        counts = {key: None if v is None else len(v) for key, v in ((VALIDATION_STEP, steps), (VALIDATION_LOSS, values))}
        raise ValueError(f"loss: the validation lists do not match ({counts}); connect Train LoRA's loss output "
                         "unchanged, or give both lists with one value per step")
    return [(int(s), float(v)) for s, v in zip(steps, values)]
