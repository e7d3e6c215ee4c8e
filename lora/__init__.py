"""The LoRA core: adapters, injection and removal, state-dict formats, merging into plain models."""
from .formats import (DTYPES, load_lora_file, parse_steps, resolve_state_dict, save_lora_file, split_text_encoder,
                      to_state_dict)
from .metadata import FORMATS, BaseModel, LoraStateDict, file_metadata, network_metadata, portable, steps_of
from .naming import MODULE_PATHS, Naming
from .inject import LoraConfig, LoraNetwork, inject, is_injected
from .algos import ALGORITHMS
from .layers import LayerWeights
from .merge import MergedLora, merge_lora

__all__ = [
    "ALGORITHMS", "BaseModel", "DTYPES", "FORMATS", "LayerWeights", "LoraStateDict", "MODULE_PATHS", "Naming",
    "file_metadata", "portable", "LoraConfig", "LoraNetwork", "MergedLora", "inject", "is_injected",
    "load_lora_file", "merge_lora", "network_metadata", "parse_steps", "resolve_state_dict", "save_lora_file",
    "split_text_encoder", "steps_of", "to_state_dict",
]
