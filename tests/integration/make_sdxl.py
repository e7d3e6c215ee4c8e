"""A tiny SDXL model with random weights, built in-process (there is no file to load).

ComfyUI's detection cannot load a toy-width SDXL from a file: `comfy/supported_models.py: SDXL`
matches only `model_channels 320`, `transformer_depth [0, 0, 2, 2, 10, 10]`, `context_dim 2048` and
`adm_in_channels 2816`, i.e. the full architecture (~2.6 G parameters). So the test-only loader node
ITTinySDXLLoader (it_family_nodes.py) calls `build_sdxl()` inside the server: ComfyUI's own
`supported_models.SDXL` config class with a toy UNet config, its `get_model()` (→
`comfy.model_base.SDXL`, EPS, with SDXL's `encode_adm`: CLIP-G pooled 1280 + six 256-wide size
embeddings = 2816) and a `ModelPatcher` on ComfyUI's load/offload devices, the way
`comfy.sd.load_diffusion_model_state_dict` does after reading a file.

The toy UNet: SDXL's layout (linear proj_in/out, `num_classes "sequential"`, `label_emb` from 2816
ADM inputs, cross-attention to a 2048-wide context, no attention at the first level) at width 32,
two levels, one res block each, one transformer block at the second level and in the middle.
Weights: make_checkpoint.py's init (torch's defaults under a fixed seed, N(0, 0.02) elsewhere).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SEED = 0
# The UNet config in the form comfy/model_detection.py returns for an SDXL file, at toy width.
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [0, 1], "channel_mult": [1, 2],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048,
    "num_head_channels": 16, "transformer_depth_output": [0, 0, 1, 1], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def _init_weights():
    spec = importlib.util.spec_from_file_location(
        "lora_trainer_it_make_checkpoint", Path(__file__).resolve().with_name("make_checkpoint.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._init_weights


def build_sdxl(seed: int = SEED):
    """A ModelPatcher holding a fresh tiny `comfy.model_base.SDXL` (fp32)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(UNET_CONFIG, dtype=torch.float32))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})  # {}: no edm/v_pred keys → EPS, like a plain SDXL base
    torch.manual_seed(seed)
    _init_weights()(model.diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def detection_accepts(model_patcher) -> bool:
    """Whether ComfyUI's detection would load this model's weights as a file (it does not)."""
    import comfy.model_detection

    sd = model_patcher.model.diffusion_model.state_dict()
    return comfy.model_detection.model_config_from_unet(sd, "") is not None
