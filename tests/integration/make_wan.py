"""Write a tiny Wan 2.1 text-to-video diffusion model with random weights, for tests.

Run with ComfyUI's Python from the ComfyUI folder (or with COMFYUI_DIR set):

    cd $COMFYUI_DIR && venv/bin/python /path/to/make_wan.py OUT_DIR

writes OUT_DIR/tiny_wan21_t2v.safetensors (for models/diffusion_models, core's UNETLoader), and
OUT_DIR/tiny_wan21_i2v.safetensors, the same model as image-to-video (see I2V below). The model
is ComfyUI's own `comfy.ldm.wan.model.WanModel`, built with the shapes `comfy/model_detection.py`
reads back: `head.modulation` → image_model "wan2.1"; dim from it (128, the smallest width detection
allows: num_heads = dim // 128 = 1), ffn_dim from `blocks.0.ffn.0`, num_layers by counting blocks (1),
in_dim from `patch_embedding` (16, Wan 2.1's latent channels); no `img_emb` → model_type "t2v" →
`supported_models.WAN21_T2V` (flow, shift 8). text_dim stays Wan's 4096 (umT5-XXL's width: detection
does not read it). ~1M parameters, fp32, plain keys. No VAE: the tests feed 16-channel video latents
from a test-only node (it_video_nodes.py). I2V: in_dim 36 (16 latent channels + 4 mask + 16 image
latent channels, which ComfyUI concatenates to the noisy latent) and the CLIP-vision projection
`img_emb` (1280 wide) → model_type "i2v" → `supported_models.WAN21_I2V`; the tests show Train LoRA
refuses it, naming it. VAE: ComfyUI's Wan 2.1 `comfy.ldm.wan.vae.WanVAE` at width 16 (comfy/sd.py reads
the width from `decoder.head.0.gamma`; the rest is Wan's: 16 latent channels, 8× down in space, 4× in
time, causal), for core's VAELoader → tiny_wan21_vae.safetensors. Files that exist are left as they are.

Weights: N(0, 0.02) for every parameter, then torch's default init for torch layers (Linear, Conv3d,
LayerNorm) under a fixed seed, RMSNorm scales 1.
"""
from __future__ import annotations

import os
import sys

import torch
from make_flux import _save, detect_as  # run as a script: its folder is on sys.path

SEED = 0
WAN_NAME = "tiny_wan21_t2v.safetensors"
I2V_NAME = "tiny_wan21_i2v.safetensors"

# What detect_unet_config() returns for the file written below (the keys this script sets).
WAN_CONFIG = {"image_model": "wan2.1", "model_type": "t2v", "dim": 128, "ffn_dim": 256, "num_heads": 1,
              "num_layers": 1, "in_dim": 16, "out_dim": 16, "patch_size": (1, 2, 2)}
I2V_CONFIG = {**WAN_CONFIG, "model_type": "i2v", "in_dim": 36}
VARIANTS = {WAN_NAME: (WAN_CONFIG, "WAN21_T2V"), I2V_NAME: (I2V_CONFIG, "WAN21_I2V")}
VAE_NAME = "tiny_wan21_vae.safetensors"
VAE_DIM = 16


def init_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter a value (ComfyUI's ops skip init), torch's defaults for torch layers, RMSNorm 1."""
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d, torch.nn.LayerNorm)) and getattr(m, "weight", None) is not None:
            type(m).reset_parameters(m)
        elif type(m).__name__ == "RMSNorm" and getattr(m, "weight", None) is not None:
            torch.nn.init.ones_(m.weight)
    return module


def build_wan(built: dict = WAN_CONFIG) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    torch.manual_seed(SEED)
    config = {k: v for k, v in built.items() if k != "image_model"}
    model = WanModel(**config, freq_dim=256, text_dim=4096, operations=comfy.ops.disable_weight_init,
                     dtype=torch.float32, device="cpu")
    return {k: v.float().contiguous() for k, v in init_weights(model).state_dict().items()}


def build_vae() -> dict[str, torch.Tensor]:
    from comfy.ldm.wan.vae import WanVAE

    torch.manual_seed(SEED)
    vae = WanVAE(dim=VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)
    for p in vae.parameters():
        torch.nn.init.normal_(p, std=0.02)
    for m in vae.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            type(m).reset_parameters(m) if type(m) in (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear) else \
                torch.nn.Conv3d.reset_parameters(m)
        elif type(m).__name__ == "RMS_norm":
            torch.nn.init.ones_(m.gamma)
    return {k: v.float().contiguous() for k, v in vae.state_dict().items()}


def main(out_dir: str) -> None:
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: it picks the device on import
    os.makedirs(out_dir, exist_ok=True)
    for name, (built, config_class) in VARIANTS.items():
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            print(f"exists, skipping: {path}")
            continue
        sd = build_wan(built)
        print("detected:", detect_as(sd, built, config_class))  # raises unless ComfyUI reads it as built
        _save(sd, path)
    vae_path = os.path.join(out_dir, VAE_NAME)
    if not os.path.exists(vae_path):
        _save(build_vae(), vae_path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    for p in (os.environ.get("COMFYUI_DIR"), os.getcwd()):
        if p and p not in sys.path:
            sys.path.insert(0, p)
    main(sys.argv[1])
