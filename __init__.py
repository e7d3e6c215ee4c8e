"""comfyui-lora-trainer: train LoRAs inside a ComfyUI graph.

ComfyUI imports this folder as a package and reads the two mappings below. Importing it needs no
ComfyUI: the nodes import ComfyUI's modules only when they run. (ComfyUI itself lists
`<output>/loras`, where Save LoRA writes, as a `loras` folder, so trained files appear in the
LoRA lists without moving them.) `WEB_DIRECTORY` serves web/progress.js, which shows Train LoRA's
progress event (nodes/progress.py) on its node in ComfyUI's frontend.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
