"""Plot Loss Graph (SPEC.md): the loss curve as a UI preview and an IMAGE."""
from __future__ import annotations

from .common import CATEGORY


class PlotLossGraph:
    DESCRIPTION = "Draws the loss curve (raw and smoothed, steps on x; log scale when it spans decades)."
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
                "loss": ("LOSS_MAP", {"tooltip": "The loss history from Train LoRA ({'loss': [...]})."}),
                "filename_prefix": ("STRING", {"default": "loss_graph", "tooltip": "Prefix of the PNG saved in the output folder (relative; ending in / saves into that folder)."}),
            },
        }

    def execute(self, loss: dict, filename_prefix: str) -> dict:
        from .comfy_io import save_loss_graph

        image, ui_entry = save_loss_graph(loss, filename_prefix)
        # The values ride along in the UI dict so headless clients can read them from /history.
        return {"ui": {"images": [ui_entry], "loss": [float(v) for v in loss["loss"]]}, "result": (image,)}
