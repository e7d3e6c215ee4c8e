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

Text encoders are named as kohya-ss names CLIP (`lora_te_text_model_encoder_layers_0_mlp_fc1`): the
CLIP's module path after `lora_te_` (SD1.x's one encoder) or `lora_te1_` / `lora_te2_` (SDXL's CLIP-L
and CLIP-G). Their layers' paths carry diffusers' component name as a prefix (`text_encoder.`,
`text_encoder_2.`: `TEXT_ENCODER_PARTS`), which `text_encoder_prefixes` maps to the file's.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

from .keys import kohya_name

# Scheme name (written to the metadata) → what it means.
SCHEMES = {
    "kohya-diffusers": "kohya-ss names on diffusers' module paths, as sd-scripts writes SD1.x/SD2.x",
    "kohya-original": "kohya-ss names on the original module paths, as sd-scripts writes SDXL, Flux.1 and SD3",
    "module-paths": "lora_unet_ + this model's own module paths: no naming is shared with other tools for it",
}


# the path prefix of each trained text encoder's layers, in the order a family lists its encoders
TEXT_ENCODER_PARTS = ("text_encoder.", "text_encoder_2.")
# the file's prefixes for a family with that many trained encoders, as kohya-ss writes them
_KOHYA_TEXT_ENCODERS = {1: ("lora_te_",), 2: ("lora_te1_", "lora_te2_")}


def text_encoder_prefixes(count: int) -> dict[str, str]:
    """Path prefix → file prefix for `count` text encoders (1: SD1.x, 2: SDXL)."""
    if count not in _KOHYA_TEXT_ENCODERS:
        raise ValueError(f"text encoders: kohya names 1 or 2 trained text encoders, got {count}")
    return dict(zip(TEXT_ENCODER_PARTS, _KOHYA_TEXT_ENCODERS[count]))


@dataclass(frozen=True)
class Naming:
    """module path → layer name in the file: `renames[path]` (a dotted name in the shared scheme) where
    given, else the path itself, each written the kohya way (`lora_unet_…`, dots → underscores); a text
    encoder's layer (its path starting with a key of `text_encoders`) after that key's file prefix."""

    scheme: str = "module-paths"
    renames: Mapping[str, str] = field(default_factory=dict)
    text_encoders: Mapping[str, str] = field(default_factory=dict)  # path prefix → file prefix (`lora_te1_`)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"naming scheme: got {self.scheme!r}; choose one of {', '.join(SCHEMES)}")

    def name(self, path: str) -> str:
        for part, prefix in self.text_encoders.items():
            if path.startswith(part):
                return prefix + path[len(part):].replace(".", "_")
        return kohya_name(self.renames.get(path, path))

    def with_text_encoders(self, count: int) -> "Naming":
        """This naming with `count` trained text encoders named as kohya names them."""
        return replace(self, text_encoders=text_encoder_prefixes(count))

    def aliases(self) -> dict[str, str]:
        """file layer name (kohya-style and dotted) → module path, for reading such files back."""
        found = {}
        for path, renamed in self.renames.items():
            found[renamed] = found[kohya_name(renamed)] = path
        return found


MODULE_PATHS = Naming()
