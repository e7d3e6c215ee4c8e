"""The adapter algorithms behind one registry: name → class, and detection from a file's key suffixes.

Adding an algorithm is one more module here with an `Algorithm` subclass (base.py states the
contract) and one line in ALGORITHMS. Detection order matters: DoRA's files also hold LoRA's keys.
"""
from __future__ import annotations

from .base import ALPHA, AlgoOptions, Algorithm, effective_alpha
from .functional import LayerShape
from .loha import Loha
from .lokr import Lokr
from .lora import Dora, Lora

ALGORITHMS: dict[str, type[Algorithm]] = {cls.NAME: cls for cls in (Lora, Loha, Lokr, Dora)}
_DETECTION_ORDER: tuple[type[Algorithm], ...] = (Dora, Loha, Lokr, Lora)

# Every suffix some algorithm writes or reads, for the key parser.
ALGORITHM_SUFFIXES: frozenset[str] = frozenset(s for cls in ALGORITHMS.values() for s in cls.SUFFIXES)


def algorithm(name: str) -> type[Algorithm]:
    """The class registered under `name`; ValueError naming the choices otherwise."""
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm: got {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def detect(suffixes: frozenset[str]) -> type[Algorithm] | None:
    """The algorithm whose keys a layer's file suffixes hold; None for only diff/diff_b (or alpha)."""
    return next((cls for cls in _DETECTION_ORDER if cls.claims(suffixes)), None)


__all__ = ["ALGORITHMS", "ALGORITHM_SUFFIXES", "ALPHA", "AlgoOptions", "Algorithm", "Dora", "LayerShape", "Loha",
           "Lokr", "Lora", "algorithm", "detect", "effective_alpha"]
