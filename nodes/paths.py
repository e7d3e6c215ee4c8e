"""Where Save LoRA and Plot Loss Graph write: a filename prefix → a folder and file stem inside
ComfyUI's output folder, and the first free counter. No ComfyUI import: the caller passes the
output folder (`folder_paths.get_output_directory()`), so these rules test without ComfyUI.

Prefix rules: relative, inside the output folder (no `..` out of it, no absolute path); a prefix
ending in `/` (or `\\`) means "into this folder", with the node's default file name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple


class PrefixInput(NamedTuple):
    """A node's prefix input: its name, the file stem used for a bare folder, an example value."""

    name: str
    default_stem: str
    example: str


def output_target(output_dir: str | os.PathLike, prefix: str, spec: PrefixInput) -> tuple[Path, str]:
    """(folder, file stem) inside `output_dir`; ValueError naming `spec.name` if the prefix is empty
    or leaves the output folder."""
    output = Path(output_dir).resolve()
    if not prefix.strip():
        raise ValueError(f"{spec.name}: is empty; give a name relative to the output folder, like {spec.example!r}")
    into_folder = prefix.rstrip().endswith(("/", "\\"))
    relative = prefix.strip().replace("\\", "/").rstrip("/")
    target = (output / relative / spec.default_stem) if into_folder else (output / relative)
    target = target.resolve()
    if os.path.isabs(prefix.strip()) or output not in target.parents:
        raise ValueError(f"{spec.name}: {prefix!r} points outside the output folder; "
                         f"use a relative name like {spec.example!r}")
    return target.parent, target.name


def next_free(folder: Path, make_name: Callable[[int], str],
              also_taken: Callable[[Path], bool] | None = None) -> Path:
    """First `make_name(counter)` (counter from 1) that does not exist yet, and for which `also_taken`
    (a file that goes with it, e.g. a checkpoint's training state) is not true: never overwrite."""
    counter = 1
    while (folder / make_name(counter)).exists() or (also_taken is not None and also_taken(folder / make_name(counter))):
        counter += 1
    return folder / make_name(counter)
