"""Shared bits of the node layer: category, the LoRA file list, ComfyUI folder look-ups.

ComfyUI's `folder_paths` is imported inside functions only, so schemas build without ComfyUI.
"""
from __future__ import annotations

CATEGORY = "LoRA Trainer"
NONE_LORA = "[None]"
OUTPUT_LORA_FOLDER = "loras"  # under ComfyUI's output folder, where Save LoRA writes by default
# The estimate command (headless/inprocess.py `estimate_command`) asks Train LoRA for its memory estimate alone:
# "only" estimates and stops before training, "measure" also runs the step for real; each Train LoRA appends
# a JSON line to the file ESTIMATE_OUT names. Environment variables: every copy of the pack in the process sees them.
ESTIMATE_MODE, ESTIMATE_OUT = "COMFYUI_LORA_TRAINER_ESTIMATE", "COMFYUI_LORA_TRAINER_ESTIMATE_OUT"
FOLDER_TIP = "A subfolder of ComfyUI's input folder; kohya-style '<N>_<name>' subfolders repeat their images N times."


def lora_choices() -> list[str]:
    """[None] + the `loras` folder's files (which include Save LoRA's output folder)."""
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI: schema tests
        return [NONE_LORA]
    return [NONE_LORA] + sorted(folder_paths.get_filename_list("loras"))


def input_files() -> list[str]:
    """Image files directly in ComfyUI's input folder (empty outside ComfyUI)."""
    try:
        import folder_paths
    except ImportError:
        return []
    from ..training.images import IMAGE_SUFFIXES, is_skipped
    import os

    root = folder_paths.get_input_directory()
    return sorted(f for f in os.listdir(root) if f.lower().endswith(IMAGE_SUFFIXES) and not is_skipped(f)
                  and os.path.isfile(os.path.join(root, f)))


def input_subfolders() -> list[str]:
    """Subfolders of ComfyUI's input folder, relative, '/'-separated (empty outside ComfyUI); hidden
    folders and `__MACOSX`, and everything under them, are left out."""
    try:
        import folder_paths
    except ImportError:
        return []
    import os

    from ..training.images import is_skipped

    root = folder_paths.get_input_directory()
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_skipped(d))
        found += [os.path.relpath(os.path.join(dirpath, d), root).replace(os.sep, "/") for d in dirnames]
    return sorted(found)
