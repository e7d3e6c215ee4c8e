"""Which layers train: the `target` presets, on module paths and layer types.

- **all**: every Linear and Conv layer gets the algorithm's adapter; norms (and other layers with
  a weight) a weight difference, biases a bias difference (the switches `train_norms`,
  `train_biases` turn those off).
- **attention**: the Linear layers (and 1×1 convs) of the transformer blocks, which is what
  kohya-ss' plain LoRA trains (`networks/lora.py`, Transformer2DModel): a module path with a
  segment `transformer_blocks`, `attn…`, `ff`, `proj_in` or `proj_out` (SD1.x/SDXL UNets, ComfyUI's
  and diffusers' names), or inside the blocks of a DiT (`double_blocks`, `single_blocks`,
  `joint_blocks`: Flux, SD3).
- **attention+conv**: attention plus every conv layer, which is kohya's LoCon
  (`conv_dim`: ResnetBlock2D, Downsample2D, Upsample2D).
Include/exclude regexes on the module path narrow any preset further (LoraConfig.selects).

A text encoder (CLIP) trains what kohya-ss trains in it and every loader maps (`TEXT_ENCODER_TARGET`):
the attention projections and the MLP of each layer (`self_attn.q_proj` … `mlp.fc2`).
"""
from __future__ import annotations

import re

from torch import nn

TARGETS = ("all", "attention", "attention+conv")
ATTENTION_SCOPE = re.compile(
    r"(^|\.)(transformer_blocks|attn\w*|attention\w*|ff|proj_in|proj_out|double_blocks|single_blocks|joint_blocks)(\.|$)")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TEXT_ENCODER_TARGET = "text_encoder"  # not a node choice: the preset of a trained text encoder
TEXT_ENCODER_LAYERS = re.compile(r"(^|\.)(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc1|mlp\.fc2)$")


def in_target(target: str, path: str, module: nn.Module) -> bool:
    """Whether `target` selects the layer at `path`."""
    if target == "all":
        return True
    if target == TEXT_ENCODER_TARGET:
        return isinstance(module, nn.Linear) and TEXT_ENCODER_LAYERS.search(path) is not None
    conv = isinstance(module, _CONVS)
    if target == "attention+conv" and conv:
        return True
    pointwise = not conv or all(k == 1 for k in module.kernel_size)
    return pointwise and ATTENTION_SCOPE.search(path) is not None
