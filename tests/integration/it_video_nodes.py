"""Test-only ComfyUI nodes (not part of the pack): video latents and Wan conditioning without a VAE
or a text encoder.

The `comfy_wan` fixture (test_families_video.py) links this file into its server's custom_nodes/.
- ITVideoLatents: one 16-channel video LATENT per entry of `frames` ("3,2" → two LATENTs, shaped
  (1, 16, 3, H/8, W/8) and (1, 16, 2, H/8, W/8)), as a list output, so Train LoRA gets several
  LATENTs of video. Each clip is a smooth seeded pattern that drifts one latent pixel per frame,
  at about a VAE's latent scale: something a model can learn, not white noise. They stand in for
  VAE-encoded frames (Wan's VAE is not built here). An entry "i" gives a 4-D image LATENT instead.
- ITWanConditioning: a seeded umT5-XXL-shaped context (1, tokens, 4096), the CONDITIONING layout
  core's Wan model reads (`c_crossattn`); `width` 3584 gives Qwen2.5-VL's, for Qwen-Image.
- ITConcatImage: WanImageToVideo's conditioning values (`concat_latent_image`, `concat_mask`) from a
  video LATENT's first frame, without Wan's VAE.
- ITTinyQwenImageLoader: make_qwen_image.py's toy-width Qwen-Image built in-process (ComfyUI's
  detection would rebuild a file at full width) and returned as a MODEL, as UNETLoader would.
"""
import importlib.util
from pathlib import Path

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
        for entry in frames.split(","):
            coarse = torch.randn((1, 16, max(1, h // 4), max(1, w // 4)), generator=generator)
            image = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * 0.5
            if entry.strip() == "i":  # an image LATENT (1, 16, H/8, W/8), as an image VAE gives it
                out.append({"samples": image})
                continue
            out.append({"samples": torch.stack([image.roll(t, dims=-1) for t in range(int(entry))], dim=2)})
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
            "width": ("INT", {"default": 4096, "min": 1, "max": 8192}),
        }}

    def encode(self, seed, tokens, width):
        generator = torch.Generator().manual_seed(seed)
        return ([[torch.randn((1, tokens, width), generator=generator), {}]],)


class ITTinyQwenImageLoader:
    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    def load(self, seed):
        spec = importlib.util.spec_from_file_location(
            "lora_trainer_it_make_qwen_image", Path(__file__).resolve().with_name("make_qwen_image.py"))
        make = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(make)
        patcher = make.build_qwen_image(seed)
        if make.detection_reads_it_back(patcher):  # the reason this node exists would be gone
            raise RuntimeError("ComfyUI's detection now reads the toy Qwen-Image's widths: load it from a file instead")
        return (patcher,)


class ITConcatImage:
    """What WanImageToVideo sets on a caption without its VAE encode: the start frame's latent (here the
    first frame of a given video LATENT, the rest zero) as `concat_latent_image`, and `concat_mask` (1 on
    the frames to generate, 0 on the given first frame), set on every entry as node_helpers does."""
    CATEGORY = "testing"
    FUNCTION = "set"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "start": ("LATENT",)}}

    def set(self, conditioning, start):
        video = start["samples"]  # (1, 16, T, h, w)
        image = torch.zeros_like(video)
        image[:, :, :1] = video[:, :, :1]
        mask = torch.ones((1, 1, video.shape[2], video.shape[-2], video.shape[-1]))
        mask[:, :, :1] = 0.0
        return ([[t, {**o, "concat_latent_image": image, "concat_mask": mask}] for t, o in conditioning],)


NODE_CLASS_MAPPINGS = {"ITVideoLatents": ITVideoLatents, "ITWanConditioning": ITWanConditioning,
                       "ITTinyQwenImageLoader": ITTinyQwenImageLoader, "ITConcatImage": ITConcatImage}
NODE_DISPLAY_NAME_MAPPINGS = {"ITVideoLatents": "IT Video Latents (test only)",
                              "ITWanConditioning": "IT Wan Conditioning (test only)",
                              "ITConcatImage": "IT Concat Image (test only)",
                              "ITTinyQwenImageLoader": "IT Tiny Qwen-Image Loader (test only)"}
