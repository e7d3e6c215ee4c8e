"""Test-only ComfyUI nodes (not part of the pack): video latents and Wan conditioning without a VAE
or a text encoder.

The `comfy_wan` fixture (test_families_video.py) links this file into its server's custom_nodes/.
- ITVideoLatents: one 16-channel video LATENT per entry of `frames` ("3,2" → two LATENTs, shaped
  (1, 16, 3, H/8, W/8) and (1, 16, 2, H/8, W/8)), as a list output, so Train LoRA gets several
  LATENTs of video. Each clip is a smooth seeded pattern that drifts one latent pixel per frame,
  at about a VAE's latent scale: something a model can learn, not white noise. They stand in for
  VAE-encoded frames (Wan's VAE is not built here).
- ITWanConditioning: a seeded umT5-XXL-shaped context (1, tokens, 4096), the CONDITIONING layout
  core's Wan model reads (`c_crossattn`). Plain torch only.
"""
import torch
import torch.nn.functional as F


class ITVideoLatents:
    CATEGORY = "testing"
    FUNCTION = "make"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_IS_LIST = (True,)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "frames": ("STRING", {"default": "3,2"}),
            "width": ("INT", {"default": 64, "min": 16, "max": 1024, "step": 16}),
            "height": ("INT", {"default": 64, "min": 16, "max": 1024, "step": 16}),
        }}

    def make(self, seed, frames, width, height):
        generator = torch.Generator().manual_seed(seed)
        h, w = height // 8, width // 8
        out = []
        for count in (int(f) for f in frames.split(",")):
            coarse = torch.randn((1, 16, max(1, h // 4), max(1, w // 4)), generator=generator)
            image = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * 0.5
            out.append({"samples": torch.stack([image.roll(t, dims=-1) for t in range(count)], dim=2)})
        return (out,)


class ITWanConditioning:
    CATEGORY = "testing"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "tokens": ("INT", {"default": 16, "min": 1, "max": 512}),
        }}

    def encode(self, seed, tokens):
        generator = torch.Generator().manual_seed(seed)
        return ([[torch.randn((1, tokens, 4096), generator=generator), {}]],)


NODE_CLASS_MAPPINGS = {"ITVideoLatents": ITVideoLatents, "ITWanConditioning": ITWanConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"ITVideoLatents": "IT Video Latents (test only)",
                              "ITWanConditioning": "IT Wan Conditioning (test only)"}
