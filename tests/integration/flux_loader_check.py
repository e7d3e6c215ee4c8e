"""Run with ComfyUI's Python (diffusers and peft installed): a Flux LoRA file of ours in ComfyUI and in
diffusers, on a Flux-dev model with one block of each kind.

    python flux_loader_check.py COMFYUI_DIR PACK_ROOT OUT_LORA TARGET

- The model: Flux-dev at full width (hidden 3072, 24 heads, context 4096, vector 768, guidance) with
  one double and one single block (~0.5 B parameters, random weights as make_flux.py draws them):
  diffusers' kohya Flux converter assumes Flux's widths, so make_flux.py's narrow model cannot be
  used here.
- The LoRA: the pack's adapters injected into ComfyUI's Flux at Train LoRA's defaults and `target`
  TARGET (all: every Linear layer; attention: those of the double and single blocks), with random non-zero weights so every layer changes the output, written with the naming
  Train LoRA gives Flux (nodes/families.py: kohya's, BFL's module paths) and saved as portable.
- ComfyUI: `comfy.sd.load_diffusion_model_state_dict` loads the model, `load_lora_for_models` the LoRA ("lora key
  not loaded" lines collected); the model runs on fixed inputs.
- diffusers: a FluxTransformer2DModel built from the same weights by diffusers' single-file
  conversion (`convert_flux_transformer_checkpoint_to_diffusers`); its base output must equal
  ComfyUI's (latents packed into 2×2 patches and position ids made as both models expect). The
  LoRA goes in through `FluxPipeline.lora_state_dict` + `load_lora_into_transformer` (what
  `load_lora_weights` runs for the transformer); every warning it logs is collected and the layers
  that got an adapter are counted.
Prints one JSON line.
"""
from __future__ import annotations

import json
import sys

from check_env import Collect, import_pack, start_comfyui

comfy_dir, root, out_path, target = sys.argv[1:5]
start_comfyui(comfy_dir)
import_pack(root)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import comfy.sd  # noqa: E402
from comfyui_lora_trainer.lora import file_metadata, inject, save_lora_file, to_state_dict  # noqa: E402
from comfyui_lora_trainer.nodes.families import base_model  # noqa: E402
from comfyui_lora_trainer.training.config import TrainConfig  # noqa: E402
from comfyui_lora_trainer.training.loop import lora_config_of  # noqa: E402


def make_lora(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    base = base_model("Flux", "FLUX", {})
    with inject(net, lora_config_of(TrainConfig(rank=4, target=target)), seed=0) as network:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in network.named_parameters():
                if name.endswith("lora_up"):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        sd = to_state_dict(network.weights(), torch.float32, base.naming)
    save_lora_file(out_path, sd, file_metadata(sd, 1, "portable", base.metadata()))
    return load_file(out_path)


def full_width_flux() -> dict[str, torch.Tensor]:
    """Flux-dev's widths, one block of each kind, make_flux.py's init; BFL's key names."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    from make_flux import FLUX_CONFIG, SEED, _init_weights

    torch.manual_seed(SEED)
    config = {**{k: v for k, v in FLUX_CONFIG.items() if k != "image_model"}, "hidden_size": 3072, "num_heads": 24}
    model = Flux(image_model="flux", **config, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                 device="cpu")
    return {k: v.contiguous() for k, v in _init_weights(model).state_dict().items()}


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, C·4), the 2×2 patches in the order both models use."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def main() -> dict:
    collect = Collect().install()
    weights = full_width_flux()
    model = comfy.sd.load_diffusion_model_state_dict(dict(weights))
    net = model.model.diffusion_model.float()
    lora = make_lora(net)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.6])
    ctx, y, guidance = torch.randn(1, 7, 4096, generator=g), torch.randn(1, 768, generator=g), torch.tensor([3.5])
    with torch.no_grad():
        base_comfy = net(x, t, context=ctx, y=y, guidance=guidance)
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
        patched.patch_model()
        lora_comfy = patched.model.diffusion_model(x, t, context=ctx, y=y, guidance=guidance)
        patched.unpatch_model()
    comfy_log, collect.lines = collect.lines, []

    from diffusers import FluxPipeline, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    # BFL's files name the RMSNorm scales `.scale`; ComfyUI (which wrote the tiny file) names them `.weight`
    bfl = {(k[: -len("weight")] + "scale" if k.endswith(("query_norm.weight", "key_norm.weight")) else k): v
           for k, v in weights.items()}
    converted = convert_flux_transformer_checkpoint_to_diffusers(bfl)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    missing, unexpected = transformer.load_state_dict(converted, strict=False)
    h = w = 4
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    inputs = dict(hidden_states=pack_latents(x), encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
                  img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(7, 3), guidance=guidance)

    def unpack(out: torch.Tensor) -> torch.Tensor:
        return out.reshape(1, h, w, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 8, 8)

    with torch.no_grad():
        base_diffusers = unpack(transformer(**inputs).sample)
    state, alphas = FluxPipeline.lora_state_dict(dict(lora), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state, transformer=transformer, network_alphas=alphas)
    with torch.no_grad():
        lora_diffusers = unpack(transformer(**inputs).sample)
    adapted = sum(1 for _, m in transformer.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))
    layers = {k.split(".", 1)[0] for k in lora}
    return {
        "layers": len(layers), "keys": len(lora),
        "block_layers": sum(1 for n in layers if n.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_"))),
        "comfy": {"not_loaded": [line for line in comfy_log if "lora key not loaded" in line],
                  "effect": float((lora_comfy - base_comfy).abs().max())},
        "diffusers": {"convert_missing": list(missing), "convert_unexpected": list(unexpected),
                      "base_vs_comfy": float((base_diffusers - base_comfy).abs().max()),
                      "lora_vs_comfy": float((lora_diffusers - lora_comfy).abs().max()),
                      "adapted_layers": adapted, "log": collect.lines},
    }


if __name__ == "__main__":
    print(json.dumps(main()))
