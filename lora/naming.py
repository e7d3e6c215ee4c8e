"""How a model's layers are named in a LoRA file: the naming kohya-ss writes for the family, or ours.

kohya-ss sd-scripts names each family's layers `lora_unet_<module path, dots → underscores>`, on
the module paths of the model implementation it trains:
- SD1.x / SD2.x: diffusers' UNet2DConditionModel (`lora_unet_down_blocks_0_attentions_0_proj_in`);
- SDXL: the original (SGM) UNet (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`);
- Flux.1: BFL's model (`lora_unet_double_blocks_0_img_attn_qkv`); SD3: SAI's MMDiT.
ComfyUI's module paths are the original ones for SDXL, Flux and SD3, so there the kohya name is
`kohya_name(path)`. SD1.x/SD2.x need a rename (ComfyUI's `unet_to_diffusers` gives it), which the
ComfyUI glue passes in as `renames`. A model with no shared naming (the bundled tiny model) keeps
its own module paths, and the file's metadata says so (`SCHEMES`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .keys import kohya_name

# Scheme name (written to the metadata) → what it means.
SCHEMES = {
    "kohya-diffusers": "kohya-ss names on diffusers' module paths, as sd-scripts writes SD1.x/SD2.x",
    "kohya-original": "kohya-ss names on the original module paths, as sd-scripts writes SDXL, Flux.1 and SD3",
    "module-paths": "lora_unet_ + this model's own module paths: no naming is shared with other tools for it",
}


@dataclass(frozen=True)
class Naming:
    """module path → layer name in the file: `renames[path]` (a dotted name in the shared scheme) where
    given, else the path itself, each written the kohya way (`lora_unet_…`, dots → underscores)."""

    scheme: str = "module-paths"
    renames: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"naming scheme: got {self.scheme!r}; choose one of {', '.join(SCHEMES)}")

    def name(self, path: str) -> str:
        return kohya_name(self.renames.get(path, path))

    def aliases(self) -> dict[str, str]:
        """file layer name (kohya-style and dotted) → module path, for reading such files back."""
        found = {}
        for path, renamed in self.renames.items():
            found[renamed] = found[kohya_name(renamed)] = path
        return found


MODULE_PATHS = Naming()
