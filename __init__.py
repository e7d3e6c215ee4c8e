"""comfyui-lora-trainer: train LoRAs inside a ComfyUI graph.

ComfyUI imports this folder as a package and reads the two mappings below. Importing it needs no
ComfyUI: the nodes import ComfyUI's modules only when they run. Inside ComfyUI, Save LoRA's output
folder is also registered as a `loras` folder so trained files are listed where users look.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

try:
    from .nodes.common import register_output_loras

    register_output_loras()
except ImportError:  # not inside ComfyUI (folder_paths absent)
    pass

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
