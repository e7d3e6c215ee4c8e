"""The one table of nodes: id → (class, name). Ids are frozen once shipped.

ComfyUI core has nodes called "Train LoRA", "Load LoRA Model" and "Plot Loss Graph" too (comfy_extras/
nodes_train.py), so every display name carries the pack's marker, "Train LoRA (LoRA Trainer)": node
search and the canvas tell ours from core's at a glance, and typing "lora trainer" lists the pack.
"""
from __future__ import annotations

from .adapter import LoRATrainingAdapter
from .clips import EncodeTrainingClips
from .dataset import EncodeTrainingFolder
from .images import LoadCaptionedImageSet, LoadImageSet, LoadImageSetFromFolder
from .lora_io import LoadLoRAModel, SaveLoRA
from .options import GROUP_NODES, TrainingOptionsNode
from .plot import PlotLossGraph
from .preservation import LoRAPreservation
from .preview import TrainingPreview
from .text_encoder import LoRATextEncoder
from .train import TrainLoRA
from .validation import ValidationSet

NODES: dict[str, tuple[type, str]] = {
    "LoRATrainer_TrainLoRA": (TrainLoRA, "Train LoRA"),
    **GROUP_NODES,  # the options by topic: LoRA Options: Noise & Timesteps, Loss, ... (nodes/options.py)
    "LoRATrainer_TrainingOptions": (TrainingOptionsNode, "LoRA Training Options"),  # all of them (deprecated)
    "LoRATrainer_Preservation": (LoRAPreservation, "LoRA Preservation"),
    "LoRATrainer_TextEncoder": (LoRATextEncoder, "LoRA Text Encoder"),
    "LoRATrainer_TrainingAdapter": (LoRATrainingAdapter, "LoRA Training Adapter"),
    "LoRATrainer_TrainingPreview": (TrainingPreview, "LoRA Training Preview"),
    "LoRATrainer_ValidationSet": (ValidationSet, "LoRA Validation Set"),
    "LoRATrainer_SaveLoRA": (SaveLoRA, "Save LoRA"),
    "LoRATrainer_LoadLoRAModel": (LoadLoRAModel, "Load LoRA Model"),
    "LoRATrainer_PlotLossGraph": (PlotLossGraph, "Plot Loss Graph"),
    "LoRATrainer_LoadImageSet": (LoadImageSet, "Load Image Set"),
    "LoRATrainer_LoadImageSetFromFolder": (LoadImageSetFromFolder, "Load Image Set From Folder"),
    "LoRATrainer_LoadCaptionedImageSet": (LoadCaptionedImageSet, "Load Captioned Image Set"),
    "LoRATrainer_EncodeTrainingFolder": (EncodeTrainingFolder, "Encode Training Folder"),
    "LoRATrainer_EncodeTrainingClips": (EncodeTrainingClips, "Encode Training Clips"),
}

NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in NODES.items()}
PACK_MARKER = "(LoRA Trainer)"
NODE_DISPLAY_NAME_MAPPINGS = {node_id: f"{name} {PACK_MARKER}" for node_id, (_, name) in NODES.items()}
