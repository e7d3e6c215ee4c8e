"""Run with ComfyUI's Python (diffusers and peft installed): one LoRA file in ComfyUI, diffusers and
A1111's key rules, on the tiny SD1.x checkpoint.

    python loader_check.py COMFYUI_DIR PACK_ROOT CHECKPOINT LORA

- ComfyUI: `comfy.sd.load_checkpoint_guess_config` loads the checkpoint, `load_lora_for_models`
  the LoRA (its "lora key not loaded" lines are collected); the UNet runs on a fixed input.
- diffusers: a UNet2DConditionModel built from the same checkpoint by diffusers' own single-file
  conversion (`convert_ldm_unet_checkpoint`, what `from_single_file` runs, with the config read
  from ComfyUI's detected unet_config); its base output must equal ComfyUI's. The LoRA goes in
  through `StableDiffusionPipeline.lora_state_dict` + `load_lora_into_unet`, the two steps of
  `load_lora_weights` for the UNet; every warning or error it logs is collected, and the layers
  that got an adapter are counted.
- A1111: tests/a1111_rules.py's model of its key rules on the file's keys and the UNet's modules.
Prints one JSON line.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from check_env import Collect, start_comfyui

comfy_dir, root, checkpoint, lora_path = sys.argv[1:5]
start_comfyui(comfy_dir)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import comfy.sd  # noqa: E402


def diffusers_config(unet_config: dict) -> dict:
    """UNet2DConditionModel's config for ComfyUI's detected SD1.x unet_config."""
    levels = len(unet_config["channel_mult"])
    depth = unet_config["transformer_depth"]
    per_level = [depth[i * unet_config["num_res_blocks"][i]] for i in range(levels)]
    heads = unet_config["num_heads"] if unet_config["num_heads"] != -1 else None
    return dict(
        sample_size=unet_config.get("image_size", 32), in_channels=unet_config["in_channels"],
        out_channels=unet_config["out_channels"], layers_per_block=unet_config["num_res_blocks"][0],
        block_out_channels=tuple(unet_config["model_channels"] * m for m in unet_config["channel_mult"]),
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in per_level),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(per_level)),
        cross_attention_dim=unet_config["context_dim"], attention_head_dim=heads,
        use_linear_projection=unet_config["use_linear_in_transformer"])


def main() -> dict:
    collect = Collect().install()
    torch.manual_seed(0)
    lora = load_file(lora_path)
    model, *_ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=False)
    unet_config = model.model.model_config.unet_config
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 7, 768)
    with torch.no_grad():
        net = model.model.diffusion_model.float()
        base_comfy = net(x, timesteps=t, context=ctx)
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
        patched.patch_model()
        lora_comfy = patched.model.diffusion_model(x, timesteps=t, context=ctx)
        patched.unpatch_model()
    comfy_log, collect.lines = collect.lines, []
    # comfy.ops classes subclass torch's; A1111's model has the torch.nn types
    ldm_modules = {name: next((c.__name__ for c in type(m).__mro__ if c.__module__.startswith("torch.nn")),
                              type(m).__name__) for name, m in net.named_modules()}

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = diffusers_config(unet_config)
    full = load_file(checkpoint)
    ldm = {k: v.float() for k, v in full.items() if k.startswith("model.diffusion_model.")}
    unet = UNet2DConditionModel(**config)
    missing, unexpected = unet.load_state_dict(convert_ldm_unet_checkpoint(ldm, config), strict=False)
    with torch.no_grad():
        base_diffusers = unet(x, t, encoder_hidden_states=ctx).sample
    state, alphas = StableDiffusionPipeline.lora_state_dict(dict(lora))
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet)
    with torch.no_grad():
        lora_diffusers = unet(x, t, encoder_hidden_states=ctx).sample
    adapted = sum(1 for _, m in unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))
    diffusers_log = collect.lines

    spec = importlib.util.spec_from_file_location("a1111_rules", Path(root) / "tests" / "a1111_rules.py")
    rules = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = rules  # its dataclasses look their module up
    spec.loader.exec_module(rules)
    report = rules.match(lora.keys(), ldm_modules)

    layers = {k.split(".", 1)[0] for k in lora}
    return {
        "layers": len(layers), "keys": len(lora),
        "comfy": {"not_loaded": [line for line in comfy_log if "lora key not loaded" in line],
                  "effect": float((lora_comfy - base_comfy).abs().max())},
        "diffusers": {"convert_missing": list(missing), "convert_unexpected": list(unexpected),
                      "base_vs_comfy": float((base_diffusers - base_comfy).abs().max()),
                      "lora_vs_comfy": float((lora_diffusers - lora_comfy).abs().max()),
                      "adapted_layers": adapted, "log": diffusers_log},
        "a1111": {"unmatched": report.unmatched, "unclaimed": report.unclaimed, "unread": report.unread,
                  "errors": report.errors, "claimed": len(report.claimed), "loads": report.loads},
    }


if __name__ == "__main__":
    print(json.dumps(main()))
