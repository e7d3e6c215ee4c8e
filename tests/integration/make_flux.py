"""Write a tiny Flux-dev-shaped diffusion model and a 16-channel VAE with random weights, for tests.

Run with ComfyUI's Python from the ComfyUI folder (or with COMFYUI_DIR set):

    cd $COMFYUI_DIR && venv/bin/python /path/to/make_flux.py OUT_DIR

writes OUT_DIR/tiny_flux.safetensors (for models/diffusion_models, core's UNETLoader) and
OUT_DIR/tiny_flux_vae.safetensors (for models/vae, core's VAELoader). The modules are ComfyUI's own
classes, built with the shapes ComfyUI's loaders read back:

- Diffusion model: `comfy.ldm.flux.model.Flux` in the Flux-dev layout (`comfy/model_detection.py`:
  `double_blocks.0.img_attn.norm.key_norm.weight` + `img_in.weight` → image_model "flux"; the
  guidance embedder → `supported_models.Flux`, not Schnell). Hidden 256; detection derives
  num_heads = 256 / sum(axes_dim [16, 56, 56]) = 2, in_channels = img_in's 64 inputs / patch 2², depth
  and depth_single_blocks by counting blocks (1 each). Context 4096 (T5-XXL width), vector 768
  (CLIP-L pooled width). ~4M params, stored with plain keys (`img_in.weight`), as
  load_diffusion_model takes them.
- VAE: `AutoencodingEngine` with ComfyUI's `Encoder`/`Decoder` (`comfy/sd.py: VAE`, the default
  KL branch): no `post_quant_conv` → AutoencodingEngine; z_channels (= latent channels) read from
  `decoder.conv_in.weight`, 16. The encoder's `ch` is fixed at 128 there; the decoder's is read back
  as `decoder.conv_in.weight.shape[0] // ch_mult[-1]`, so the decoder is built narrower (ch 32).

Weights: torch's default init for torch layers under a fixed seed, RMSNorm scales 1, N(0, 0.02) for
the rest (ComfyUI's ops skip init). The diffusion model is stored as fp32 (~19 MiB), the VAE as fp16
(~70 MiB). If both files exist the script does nothing, so callers can cache them.
"""
from __future__ import annotations

import os
import sys

import torch
from make_checkpoint import _init_weights as init_torch_layers  # run as a script: its folder is on sys.path

SEED = 0
FLUX_NAME = "tiny_flux.safetensors"
VAE_NAME = "tiny_flux_vae.safetensors"

# What detect_unet_config() returns for the file written below (image_model "flux").
FLUX_CONFIG = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
    "context_in_dim": 4096, "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
    "qkv_bias": True, "guidance_embed": True, "txt_ids_dims": [],
}

# comfy/sd.py's default KL ddconfig with 16 latent channels; the decoder is narrower (see above).
VAE_DDCONFIG = {
    "double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3,
    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
VAE_DECODER_CH = 32


def _init_weights(module: torch.nn.Module) -> torch.nn.Module:
    """make_checkpoint.py's init (torch's defaults over a normal fill), plus RMSNorm scales of 1."""
    init_torch_layers(module)
    for name, m in module.named_modules():
        if type(m).__name__ == "RMSNorm" and getattr(m, "weight", None) is not None:
            torch.nn.init.ones_(m.weight)  # RMSNorm scales: 1, as a real model starts
    return module


def _state_dict(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype).contiguous() for k, v in module.state_dict().items()}


def build_flux() -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    torch.manual_seed(SEED)
    config = {k: v for k, v in FLUX_CONFIG.items() if k != "image_model"}
    model = Flux(image_model="flux", **config, operations=comfy.ops.disable_weight_init,
                 dtype=torch.float32, device="cpu")
    return _state_dict(_init_weights(model), torch.float32)


def build_vae() -> dict[str, torch.Tensor]:
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    torch.manual_seed(SEED + 1)
    target = "comfy.ldm.modules.diffusionmodules.model."
    vae = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": target + "Encoder", "params": VAE_DDCONFIG},
        decoder_config={"target": target + "Decoder", "params": {**VAE_DDCONFIG, "ch": VAE_DECODER_CH}})
    return _state_dict(_init_weights(vae), torch.float16)  # ~70 MiB instead of ~140


def detect_as(sd: dict[str, torch.Tensor], built: dict, config_class: str) -> dict:
    """ComfyUI's own reading of a diffusion model's file: its detected config, which must hold `built`,
    and its supported_models class, which must be `config_class` (else SystemExit saying what differs).
    make_sd3.py and make_wan.py use it too."""
    import comfy.model_detection

    config = comfy.model_detection.detect_unet_config(sd, "")
    wrong = {k: (config.get(k), v) for k, v in built.items() if config.get(k) != v}
    if wrong:
        raise SystemExit(f"ComfyUI detects a different model: {{key: (detected, built)}} = {wrong}")
    model_config = comfy.model_detection.model_config_from_unet(sd, "")
    if model_config is None or type(model_config).__name__ != config_class:
        raise SystemExit(f"ComfyUI picks {type(model_config).__name__} for it, not {config_class}")
    return config


def detect(flux_sd: dict[str, torch.Tensor]) -> dict:
    """ComfyUI's own reading of the diffusion model's config (raises if it is not Flux-dev)."""
    return detect_as(flux_sd, FLUX_CONFIG, "Flux")


def _save(sd: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    tmp = f"{path}.tmp{os.getpid()}"
    save_file(sd, tmp, metadata={"format": "pt", "note": "random weights, for tests only"})
    os.replace(tmp, path)  # never leave a half-written file under the final name
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, {len(sd)} tensors)")


def main(out_dir: str) -> None:
    flux_path, vae_path = os.path.join(out_dir, FLUX_NAME), os.path.join(out_dir, VAE_NAME)
    if os.path.exists(flux_path) and os.path.exists(vae_path):
        print(f"exist, skipping: {flux_path}, {vae_path}")
        return
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: it picks the device on import
    os.makedirs(out_dir, exist_ok=True)
    flux_sd = build_flux()
    print("detected:", detect(flux_sd))
    _save(flux_sd, flux_path)
    _save(build_vae(), vae_path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    for path in (os.environ.get("COMFYUI_DIR"), os.getcwd()):
        if path and path not in sys.path:
            sys.path.insert(0, path)
    main(sys.argv[1])
