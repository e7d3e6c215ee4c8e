"""Plot Loss Graph (docs/nodes.md#plot-loss-graph-loratrainer_plotlossgraph): the loss curve as a UI preview and an IMAGE.

The LOSS_MAP is core's `{"loss": [...]}` (one value per optimizer step), plus, when Train LoRA had
a validation set, `"validation_step"` and `"validation_loss"`: equal-length lists of the steps
measured (k = after k optimizer steps, 0 = before training) and their validation loss. Those are
drawn as a second line and returned next to "loss" in the UI dict.
"""
from __future__ import annotations

from .common import CATEGORY

VALIDATION_STEP, VALIDATION_LOSS = "validation_step", "validation_loss"  # LOSS_MAP keys


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


class PlotLossGraph:
    DESCRIPTION = ("Draws the loss curve (raw and smoothed, steps on x; log scale when it spans decades), and the "
                   "validation loss as a second line when Train LoRA had a validation set.")
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The graph as an image.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "loss": ("LOSS_MAP", {"tooltip": "The loss history from Train LoRA ({'loss': [...]}, and "
                                                 "'validation_step'/'validation_loss' with a validation set)."}),
                "filename_prefix": ("STRING", {"default": "loss_graph", "tooltip": "Prefix of the PNG saved in the output folder (relative; ending in / saves into that folder)."}),
            },
        }

    def execute(self, loss: dict, filename_prefix: str) -> dict:
        from .comfy_io import save_loss_graph

        image, ui_entry = save_loss_graph(loss, filename_prefix)
        # The values ride along in the UI dict so headless clients can read them from /history.
        ui = {"images": [ui_entry], "loss": [float(v) for v in loss["loss"]]}
        validation = validation_points(loss)
        if validation:
            ui[VALIDATION_STEP] = [step for step, _ in validation]
            ui[VALIDATION_LOSS] = [value for _, value in validation]
        return {"ui": ui, "result": (image,)}
