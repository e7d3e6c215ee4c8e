"""Write a tiny SD1.5-shaped checkpoint with random weights, for integration tests.

Run with ComfyUI's Python from the ComfyUI folder (or with COMFYUI_DIR set):

    cd $COMFYUI_DIR && venv/bin/python /path/to/make_checkpoint.py OUT.safetensors

The modules are ComfyUI's own classes, built with the shapes ComfyUI's checkpoint loader
reads back (`comfy/model_detection.py: detect_unet_config`, `comfy/supported_models.py: SD15`):

- UNet (`model.diffusion_model.`): one level (`channel_mult [1]`) of 320 channels, one res
  block + one cross-attention transformer (context 768) per block, a middle block. ~26M params.
  `context_dim 768`, `model_channels 320`, conv `proj_in`, no `label_emb` -> detected as SD15.
- CLIP-L text encoder (`cond_stage_model.transformer.`) at full size (ComfyUI builds it from
  `comfy/sd1_clip_config.json` whatever the file holds).
- The SD1.x KL VAE (`first_stage_model.`) at full size (its shape is fixed in `comfy/sd.py: VAE`).

Weights use torch's default init under a fixed seed and are stored as fp16 (~466 MB).
If OUT already exists the script does nothing, so callers can cache the file.
"""
from __future__ import annotations

import json
import os
import sys

import torch

SEED = 0

# What detect_unet_config() returns for the file written below, plus SD15.unet_extra_config.
UNET_CONFIG = {
    "image_size": 32, "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
    "transformer_depth_output": [1, 1], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False,
    "num_heads": 8, "num_head_channels": -1,
}

# The SD1.x VAE config hard-coded in comfy/sd.py (VAE.__init__).
VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}


def _init_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter a value: ComfyUI's ops skip init and leave memory uninitialised."""
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)  # anything no torch layer below claims
    torch_layers = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm,
                    torch.nn.LayerNorm, torch.nn.Embedding)
    for m in module.modules():
        for cls in torch_layers:
            if isinstance(m, cls):
                cls.reset_parameters(m)  # torch's own default init, not ComfyUI's no-op
                break
    return module


def _prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {prefix + k: v.to(torch.float16).contiguous() for k, v in module.state_dict().items()}


def build_state_dict() -> dict[str, torch.Tensor]:
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: it picks the device on import
    import comfy.clip_model
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(SEED)
    ops = comfy.ops.disable_weight_init
    unet = _init_weights(UNetModel(**UNET_CONFIG, dtype=torch.float32, device="cpu", operations=ops))

    clip_config_path = os.path.join(os.path.dirname(comfy.clip_model.__file__), "sd1_clip_config.json")
    with open(clip_config_path) as f:
        clip_config = json.load(f)
    clip = _init_weights(comfy.clip_model.CLIPTextModel(clip_config, torch.float32, "cpu", ops))

    vae = _init_weights(AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4))

    sd = _prefixed("model.diffusion_model.", unet)
    clip_sd = _prefixed("cond_stage_model.transformer.", clip)
    clip_sd.pop("cond_stage_model.transformer.text_projection.weight")  # SD1.5 files lack it
    sd.update(clip_sd)
    sd.update(_prefixed("first_stage_model.", vae))
    return sd


def main(out_path: str) -> None:
    if os.path.exists(out_path):
        print(f"exists, skipping: {out_path}")
        return
    from safetensors.torch import save_file

    sd = build_state_dict()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp{os.getpid()}"
    save_file(sd, tmp, metadata={"format": "pt", "note": "random weights, for tests only"})
    os.replace(tmp, out_path)  # never leave a half-written file under the final name
    print(f"wrote {out_path} ({os.path.getsize(out_path) / 2**20:.0f} MiB, {len(sd)} tensors)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT.safetensors")
    for path in (os.environ.get("COMFYUI_DIR"), os.getcwd()):
        if path and path not in sys.path:
            sys.path.insert(0, path)
    main(sys.argv[1])
