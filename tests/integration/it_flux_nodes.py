"""A test-only ComfyUI node (not part of the pack): Flux conditioning without a text encoder.

The `comfy_flux` fixture (conftest.py) links this file into its server's custom_nodes/. It stands in
for CLIPTextEncode with Flux's T5-XXL + CLIP-L: a seeded random T5-shaped context (1, tokens, 4096)
and a CLIP-L-shaped pooled vector (1, 768), the CONDITIONING layout core's Flux model reads
(`pooled_output` feeds the vector embedder; FluxGuidance adds `guidance`). Plain torch only.
"""
import torch


class ITFluxConditioning:
    CATEGORY = "testing"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "tokens": ("INT", {"default": 64, "min": 1, "max": 512}),
            "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}),
        }}

    def encode(self, seed, tokens, scale):
        generator = torch.Generator().manual_seed(seed)
        context = torch.randn((1, tokens, 4096), generator=generator) * scale
        pooled = torch.randn((1, 768), generator=generator) * scale
        return ([[context, {"pooled_output": pooled}]],)


NODE_CLASS_MAPPINGS = {"ITFluxConditioning": ITFluxConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"ITFluxConditioning": "IT Flux Conditioning (test only)"}
