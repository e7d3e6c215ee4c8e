"""comfyui-lora-trainer: train LoRAs inside a ComfyUI graph.

ComfyUI imports this folder as a package and reads the two mappings below. Importing it needs no
ComfyUI: the nodes import ComfyUI's modules only when they run. (ComfyUI itself lists
`<output>/loras`, where Save LoRA writes, as a `loras` folder, so trained files appear in the
LoRA lists without moving them.) `WEB_DIRECTORY` serves web/progress.js, which shows Train LoRA's
progress event (nodes/progress.py) on its node in ComfyUI's frontend. Without torch (a client machine
running only `python -m comfyui_lora_trainer run`, which needs the standard library alone) it
imports with no nodes.
"""
try:
    import torch  # noqa: F401  (the nodes need it; ComfyUI always has it)
except ModuleNotFoundError as err:  # a Python without torch: only the headless `run` client (standard library)
    if err.name != "torch":
        raise
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
