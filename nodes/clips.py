"""Encode Training Clips: a folder of video clips → one video LATENT and one caption per clip for Train
LoRA, each clip's start frame set on its caption for image-to-video models (docs/nodes.md,
docs/data.md#clips-for-image-to-video). The work is in training/clips.py; the ComfyUI glue (video decoder,
VAE, CLIP) in nodes/comfy_clips.py.
"""
from __future__ import annotations

from ..training.clips import CLIP_SUFFIXES
from .common import CATEGORY, input_subfolders
from .dataset import BUCKET_SIDES, LATENT_DTYPE


class EncodeTrainingClips:
    DESCRIPTION = ("Reads a folder of video clips with their .txt captions, takes each clip's first frames, fits "
                   "them to an aspect-ratio bucket and encodes them with the video VAE: Train LoRA's latents and "
                   "positive. For image-to-video models each clip's first frame (or a still image of the same "
                   "name) is set on its caption as WanImageToVideo sets it.")
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = ("LATENT", "CONDITIONING", "STRING")
    RETURN_NAMES = ("latents", "positive", "captions")
    OUTPUT_IS_LIST = (True, True, True)
    OUTPUT_TOOLTIPS = ("One video LATENT per clip, for Train LoRA's latents.",
                       "One CONDITIONING per clip, in the latents' order, for Train LoRA's positive.",
                       "The captions as written, in the same order.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "folder": (input_subfolders(), {"tooltip": "A subfolder of ComfyUI's input folder holding the clips "
                                                f"({', '.join(CLIP_SUFFIXES)}), each with a .txt caption."}),
                "vae": ("VAE", {"tooltip": "The video model's VAE (e.g. Wan 2.1's): encodes the clips."}),
                "resolution": ("INT", {"default": 640, "min": 64, "max": 4096, "step": 16, "tooltip":
                                       "Target area resolution² per frame (640: about 832×480). Smaller clips are "
                                       "never upscaled."}),
                "frames": ("INT", {"default": 33, "min": 1, "max": 1025, "step": 4, "tooltip": "Frames taken from the "
                                   "start of each clip (4k + 1, as the Wan VAE takes; a shorter clip gives its own "
                                   "4k + 1)."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The model's text encoder: encodes each clip's caption."}),
                "conditioning": ("CONDITIONING", {"tooltip": "Instead of the CLIP: one conditioning for every clip; "
                                                  "captions are then not read."}),
                "image_to_video": ("BOOLEAN", {"default": True, "tooltip": "Set each clip's start image on its "
                                               "caption as WanImageToVideo does: its first frame, or a still image "
                                               "of the same name beside it (clip.mp4 + clip.png)."}),
                "bucket_step": ("INT", {"default": 16, "min": 8, "max": 512, "step": 8, "tooltip": "Bucket sides "
                                        "are multiples of this (16 suits Wan: 8× VAE, 2× patch)."}),
                **BUCKET_SIDES,
                "default_caption": ("STRING", {"default": "", "tooltip": "Caption for clips without a .txt file."}),
                **LATENT_DTYPE,
            },
        }

    def execute(self, folder: str, vae, resolution: int = 640, frames: int = 33, clip=None, **options) -> dict:
        from .comfy_clips import encode_training_clips  # ComfyUI glue, imported only when the node runs

        latents, positive, captions, summary = encode_training_clips(folder, vae, clip, resolution,
                                                                     {**options, "frames": frames})
        return {"ui": {"text": [summary]}, "result": (latents, positive, captions)}
