"""comfyui-lora-trainer: train LoRAs inside a ComfyUI graph.

ComfyUI imports this folder as a package and reads the two mappings below. Importing it needs no
ComfyUI: the nodes import ComfyUI's modules only when they run. (ComfyUI itself lists
`<output>/loras`, where Save LoRA writes, as a `loras` folder, so trained files appear in the
LoRA lists without moving them.)
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
