"""Node inputs generated from TrainConfig's field table (training/config.py): same names, same ranges.

A field becomes a combo (its choices), an INT, FLOAT, BOOLEAN or STRING widget with its default,
range and tooltip, on the node its Setting names (Train LoRA, or the options nodes: nodes/options.py groups them).
"""
from __future__ import annotations

from ..training.config import Setting, settings

_KINDS = {bool: "BOOLEAN", int: "INT", float: "FLOAT", str: "STRING"}


def widget(default: object, spec: Setting) -> tuple:
    """One ComfyUI input spec: (type or choices, {default, min, max, step, tooltip})."""
    options: dict[str, object] = {"default": default, "tooltip": spec.tooltip}
    if spec.choices:
        return list(spec.choices), options
    kind = _KINDS[type(default)]
    if spec.low is not None:
        options.update(min=spec.low, max=spec.high)
    if spec.step is not None:
        options["step"] = spec.step
    if kind == "FLOAT":
        options["round"] = False  # keep what the user typed (ComfyUI rounds to the step otherwise)
    return kind, options


def widgets(node: str) -> dict[str, tuple]:
    """Every field shown on `node` ("main" or "options"), in the table's order."""
    return {name: widget(default, spec) for name, (default, spec) in settings().items() if spec.node == node}
