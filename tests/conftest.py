"""Load the repository root as the package `comfyui_lora_trainer`, whatever the folder is called.

ComfyUI imports the pack under its folder's name; tests import it under one fixed name so they do not
depend on where the repository was cloned. (This file lives in tests/, not beside the root
`__init__.py`: there pytest would import it as part of a package named after the folder, which
fails for a folder name such as `comfyui-lora-trainer`.)
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "comfyui_lora_trainer"

if NAME not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    spec.loader.exec_module(module)
