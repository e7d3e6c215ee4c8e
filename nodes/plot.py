"""Plot Loss Graph (docs/nodes.md#plot-loss-graph-loratrainer_plotlossgraph): the loss curve as a UI preview and an IMAGE.

The LOSS_MAP (nodes/loss_map.py) is drawn with its validation loss as a second line, and its values
are returned in the UI dict.
"""
from __future__ import annotations

from .common import CATEGORY
from .loss_map import EXPERTS_KEY, VALIDATION_LOSS, VALIDATION_STEP, validation_points


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
        if loss.get(EXPERTS_KEY):  # both Wan 2.2 experts trained: each value's expert
            ui[EXPERTS_KEY] = [str(e) for e in loss[EXPERTS_KEY]]
        validation = validation_points(loss)
        if validation:
            ui[VALIDATION_STEP] = [step for step, _ in validation]
            ui[VALIDATION_LOSS] = [value for _, value in validation]
        return {"ui": ui, "result": (image,)}
