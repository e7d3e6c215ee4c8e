"""Write a tiny SD3.5-shaped MMDiT diffusion model with random weights, for tests.

Run with ComfyUI's Python from the ComfyUI folder (or with COMFYUI_DIR set):

    cd $COMFYUI_DIR && venv/bin/python /path/to/make_sd3.py OUT_DIR

writes OUT_DIR/tiny_sd3.safetensors (for models/diffusion_models, core's UNETLoader). The model is
ComfyUI's own `comfy.ldm.modules.diffusionmodules.mmdit.MMDiT`, built with the shapes
`comfy/model_detection.py` reads back (`joint_blocks.0.context_block.attn.qkv.weight` → mmdit):
depth 2 (detection reads depth = hidden / 64, so hidden 128, 2 heads of 64, 2 joint blocks, the last
one's context block pre-only), 16 latent channels in and out, patch 2, `y_embedder` from 2048 pooled
inputs (CLIP-L + CLIP-G), `context_embedder` from 4096 (T5-XXL width), a 16×16 `pos_embed` grid, and
RMS q/k norms as SD3.5 has them. Detection accepts this width, and `supported_models.SD3` (flow,
shift 3) takes it: this script checks both.

Weights: torch's default init for torch layers under a fixed seed, RMSNorm scales 1, N(0, 0.02) for
the rest and for the `pos_embed` buffer (ComfyUI's ops skip init; left as torch.empty it holds
garbage and the model outputs NaN). Stored fp32 with plain keys. If the file exists the script does
nothing, so callers can cache it.
"""
from __future__ import annotations

import os
import sys

import torch
from make_flux import _init_weights, _save, detect_as  # run as a script: its folder is on sys.path

SEED = 0
SD3_NAME = "tiny_sd3.safetensors"

MMDIT_CONFIG = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "num_patches": 256, "pos_embed_max_size": 16, "qk_norm": "rms", "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}


def build_sd3() -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    torch.manual_seed(SEED)
    model = MMDiT(**MMDIT_CONFIG, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    torch.nn.init.normal_(model.pos_embed, std=0.02)  # a buffer (torch.empty), not a parameter: init skips it
    return {k: v.float().contiguous() for k, v in _init_weights(model).state_dict().items()}


def detect(sd: dict[str, torch.Tensor]) -> dict:
    """ComfyUI's own reading of the file's config (raises if it is not this MMDiT or not SD3)."""
    return detect_as(sd, MMDIT_CONFIG, "SD3")


def main(out_dir: str) -> None:
    path = os.path.join(out_dir, SD3_NAME)
    if os.path.exists(path):
        print(f"exists, skipping: {path}")
        return
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: it picks the device on import
    os.makedirs(out_dir, exist_ok=True)
    sd = build_sd3()
    print("detected:", detect(sd))
    _save(sd, path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    for path in (os.environ.get("COMFYUI_DIR"), os.getcwd()):
        if path and path not in sys.path:
            sys.path.insert(0, path)
    main(sys.argv[1])
