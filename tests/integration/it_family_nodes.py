"""Test-only ComfyUI nodes (not part of the pack) for test_families.py: SDXL and SD3 without real
weights or text encoders.

The fixture in test_families.py links this file into its server's custom_nodes/.
- ITTinySDXLLoader: builds make_sdxl.py's tiny SDXL in-process (ComfyUI's detection only loads
  full-size SDXL files) and returns it as a MODEL, like UNETLoader would.
- ITSDXLConditioning: stands in for CLIPTextEncodeSDXL: a seeded CLIP-L+G-shaped context
  (1, tokens, 2048), a CLIP-G-shaped `pooled_output` (1, 1280) from its own seed, and the size
  values SDXL's `encode_adm` reads (width, height, crop_w, crop_h, target_width, target_height).
- ITSD3Conditioning: stands in for SD3's triple text encoder: a T5-XXL-shaped context
  (1, tokens, 4096) and a CLIP-L+G-shaped `pooled_output` (1, 2048).
"""
import importlib.util
from pathlib import Path

import torch

_SEED = ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})
_SIZE = ("INT", {"default": 1024, "min": 0, "max": 16384})


def _make_sdxl():
    spec = importlib.util.spec_from_file_location(
        "lora_trainer_it_make_sdxl", Path(__file__).resolve().with_name("make_sdxl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ITTinySDXLLoader:
    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": _SEED}}

    def load(self, seed):
        make_sdxl = _make_sdxl()
        patcher = make_sdxl.build_sdxl(seed)
        if make_sdxl.detection_accepts(patcher):  # the reason this node exists would be gone
            raise RuntimeError("ComfyUI's detection now accepts the toy SDXL: load it from a file instead")
        return (patcher,)


def _tensors(seed, pooled_seed, tokens, context_width, pooled_width):
    context = torch.randn((1, tokens, context_width), generator=torch.Generator().manual_seed(seed))
    pooled = torch.randn((1, pooled_width), generator=torch.Generator().manual_seed(pooled_seed))
    return context, pooled


class ITSDXLConditioning:
    CATEGORY = "testing"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": _SEED, "pooled_seed": _SEED, "tokens": ("INT", {"default": 77, "min": 1, "max": 512}),
            "width": _SIZE, "height": _SIZE, "crop_w": _SIZE, "crop_h": _SIZE,
            "target_width": _SIZE, "target_height": _SIZE,
        }}

    def encode(self, seed, pooled_seed, tokens, width, height, crop_w, crop_h, target_width, target_height):
        context, pooled = _tensors(seed, pooled_seed, tokens, 2048, 1280)
        return ([[context, {"pooled_output": pooled, "width": width, "height": height, "crop_w": crop_w,
                            "crop_h": crop_h, "target_width": target_width, "target_height": target_height}]],)


class ITSD3Conditioning:
    CATEGORY = "testing"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": _SEED, "pooled_seed": _SEED,
                             "tokens": ("INT", {"default": 77, "min": 1, "max": 512})}}

    def encode(self, seed, pooled_seed, tokens):
        context, pooled = _tensors(seed, pooled_seed, tokens, 4096, 2048)
        return ([[context, {"pooled_output": pooled}]],)


NODE_CLASS_MAPPINGS = {"ITTinySDXLLoader": ITTinySDXLLoader, "ITSDXLConditioning": ITSDXLConditioning,
                       "ITSD3Conditioning": ITSD3Conditioning}
NODE_DISPLAY_NAME_MAPPINGS = {k: f"{k} (test only)" for k in NODE_CLASS_MAPPINGS}
