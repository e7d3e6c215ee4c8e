"""The LoRA core: adapters, injection and removal, state-dict formats, merging into plain models.

Its names load on first use (PEP 562), so the modules that need only the standard library
(`lora.files`: atomic writes) import without torch, e.g. for the headless client.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {  # name → the module of this package that defines it
    "DTYPES": "formats", "load_lora_file": "formats", "parse_steps": "formats", "resolve_state_dict": "formats",
    "save_lora_file": "formats", "split_text_encoder": "formats", "to_state_dict": "formats",
    "FORMATS": "metadata", "BaseModel": "metadata", "LoraStateDict": "metadata", "file_metadata": "metadata",
    "network_metadata": "metadata", "portable": "metadata", "steps_of": "metadata",
    "MODULE_PATHS": "naming", "Naming": "naming",
    "LoraConfig": "injection", "LoraNetwork": "injection", "inject": "injection", "is_injected": "injection",
    "ALGORITHMS": "algos", "LayerWeights": "layers", "MergedLora": "merge", "merge_lora": "merge",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # found once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
