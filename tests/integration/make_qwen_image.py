"""A tiny Qwen-Image diffusion model built in-process, for tests (it_video_nodes.ITTinyQwenImageLoader).

ComfyUI's detection (`comfy/model_detection.py`, "Qwen Image") reads only the layer count and the
input channels from a file and takes every width at full size (24 heads of 128, 3,072 wide), so a
toy-width file would be built wrong: the model is ComfyUI's own `QwenImageTransformer2DModel`
(through `supported_models.QwenImage` → `model_base.QwenImage`: flow, shift 1.15, Wan 2.1's
16-channel latent format with 3 latent axes) at toy width, wrapped in a `ModelPatcher` on
ComfyUI's load/offload devices, as UNETLoader would return it. 2 heads of 32 (rope axes 8+12+12),
1 block, context width 3,584 (Qwen2.5-VL's). Weights: N(0, 0.02), torch's default init for torch
layers, RMSNorm scales 1, under a fixed seed.
"""
from __future__ import annotations

import torch

SEED = 0
UNET_CONFIG = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 1,
               "attention_head_dim": 32, "num_attention_heads": 2, "axes_dims_rope": (8, 12, 12),
               "joint_attention_dim": 3584}


def init_weights(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) and getattr(m, "weight", None) is not None:
            type(m).reset_parameters(m)
        elif type(m).__name__ == "RMSNorm" and getattr(m, "weight", None) is not None:
            torch.nn.init.ones_(m.weight)
    return module


def build_qwen_image(seed: int = SEED):
    """A ModelPatcher holding a fresh tiny `comfy.model_base.QwenImage` (fp32)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.QwenImage(dict(UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    torch.manual_seed(seed)
    init_weights(model.diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def detection_reads_it_back(model_patcher) -> bool:
    """Whether ComfyUI's detection would rebuild this model from its weights (it does not: full widths)."""
    import comfy.model_detection

    sd = model_patcher.model.diffusion_model.state_dict()
    config = comfy.model_detection.detect_unet_config(sd, "")
    return all(config.get(k, v) == v for k, v in UNET_CONFIG.items()) and "attention_head_dim" in config
