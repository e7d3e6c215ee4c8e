"""What Save LoRA writes for a LORA_MODEL and a format: the tensors and the metadata (no ComfyUI needed).

portable: only what every loader reads; weight/bias differences (diff/diff_b, read by ComfyUI alone)
are left out with one warning line giving their share of the weight change. full: everything.
"""
from __future__ import annotations

import logging

import torch

from ..lora import file_metadata, portable
from ..lora.metadata import PREFIX

log = logging.getLogger(__name__)


def file_contents(lora: dict, steps: int | None, file_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of the file; ValueError naming `format` when portable would leave nothing."""
    trained = dict(getattr(lora, "metadata", {}))
    sd = dict(lora)
    if file_format == "portable":
        sd, dropped = portable(sd)
        if dropped and not sd:
            raise ValueError("format: this LoRA holds only weight/bias differences (diff/diff_b), which portable "
                             "files leave out; choose format full (ComfyUI reads it)")
        if dropped:
            share = trained.get(PREFIX + "difference_share")
            of_change = f", {float(share):.1%} of the LoRA's weight change" if share is not None else ""
            log.warning("Save LoRA: format portable leaves out %d weight/bias differences (diff/diff_b%s), which only "
                        "ComfyUI reads; choose format full to keep them, or train with train_norms and train_biases "
                        "off", len(dropped), of_change)
            trained[PREFIX + "left_out"] = f"{len(dropped)} diff/diff_b tensors"
    return sd, file_metadata(sd, steps, file_format, trained)
