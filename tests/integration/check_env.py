"""Shared start of the check scripts run with ComfyUI's Python (loader_check.py, flux_loader_check.py):
ComfyUI on the CPU, the pack imported from a repository root, and warnings collected.

The scripts run as `python SCRIPT ...`, so this folder is on sys.path and they import this module.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from types import ModuleType


def start_comfyui(comfy_dir: str) -> None:
    """Put ComfyUI on sys.path and let it parse `--cpu` as its only flag (before comfy.* is imported)."""
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()


def import_pack(root: str) -> ModuleType:
    """The pack at `root` as `comfyui_lora_trainer` (the folder may have any name)."""
    spec = importlib.util.spec_from_file_location("comfyui_lora_trainer", root + "/__init__.py",
                                                  submodule_search_locations=[root])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_lora_trainer"] = pack
    spec.loader.exec_module(pack)
    return pack


class Collect(logging.Handler):
    """Every warning or error logged anywhere, as text; `install()` hooks it on the root logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def install(self) -> "Collect":
        logging.getLogger().addHandler(self)
        return self
