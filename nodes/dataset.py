"""Encode Training Folder: a folder of any sizes and shapes → aspect-ratio buckets of latents and one
caption per image, in bounded memory, for Train LoRA; with a control folder, pairs for edit models (docs/nodes.md, docs/data.md#encode-training-folder).

The work is in training/dataset.py (plan, streaming encode), training/latent_cache.py and
training/tags.py; the ComfyUI glue (VAE, CLIP, folders, progress) in nodes/comfy_dataset.py.
"""
from __future__ import annotations

from ..training.config import MAX_SEED
from ..training.dataset import MASK_SOURCES
from .common import CATEGORY, FOLDER_TIP, input_subfolders

LATENT_DTYPES = ("bf16", "fp32", "fp16")
# inputs Encode Training Folder and Encode Training Clips share
BUCKET_SIDES = {
    "min_side": ("INT", {"default": 256, "min": 8, "max": 8192, "step": 8, "tooltip": "Shortest bucket side."}),
    "max_side": ("INT", {"default": 2048, "min": 8, "max": 16384, "step": 8, "tooltip": "Longest bucket side."}),
}
LATENT_DTYPE = {"latent_dtype": (list(LATENT_DTYPES), {"default": "bf16", "tooltip": "How the latents are kept in "
                                                       "memory (training computes in fp32 or bf16 either way)."})}


class EncodeTrainingFolder:
    DESCRIPTION = ("Reads a folder of images of any sizes and shapes with their .txt captions, sorts them into "
                   "aspect-ratio buckets, and encodes them a few at a time with the VAE (keeping only the latents) "
                   "and their captions with CLIP: Train LoRA's latents and positive. Masks, flipped copies and "
                   "caption variants ride along; a control folder pairs each image with an edit model's reference "
                   "image; a disk cache skips the VAE on the next run.")
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = ("LATENT", "CONDITIONING", "STRING")
    RETURN_NAMES = ("latents", "positive", "captions")
    OUTPUT_IS_LIST = (True, True, True)
    OUTPUT_TOOLTIPS = ("One LATENT per bucket (same-size images batched), for Train LoRA's latents.",
                       "One CONDITIONING per image, in the latents' order, for Train LoRA's positive.",
                       "The captions as written, in the same order.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "folder": (input_subfolders(), {"tooltip": FOLDER_TIP}),
                "vae": ("VAE", {"tooltip": "The model's VAE: encodes the images."}),
                "resolution": ("INT", {"default": 1024, "min": 64, "max": 8192, "step": 64, "tooltip":
                                       "Target area resolution² (1024: about a megapixel). Smaller images are never "
                                       "upscaled."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The model's text encoder: encodes each image's caption."}),
                "conditioning": ("CONDITIONING", {"tooltip": "Instead of the CLIP: one conditioning for every image "
                                                  "(e.g. an edit model's instruction); captions are then not read."}),
                **_options(),
            },
        }

    @classmethod
    def IS_CHANGED(cls, folder: str = "", masks: str = "none", mask_folder: str = "", control_folder: str = "",
                   **_) -> str:
        """Run again when the folder's (or the mask or control folder's) files change, not only the inputs."""
        from ..training.dataset import folder_fingerprint
        from .comfy_io import input_path

        try:
            return folder_fingerprint(input_path(folder), input_path(mask_folder) if masks == "mask folder" and
                                      mask_folder.strip() else None,
                                      input_path(control_folder) if control_folder.strip() else None)
        except ValueError:  # a folder outside the input folder: execute says so
            return ""

    def execute(self, folder: str, vae, resolution: int = 1024, clip=None, **options) -> dict:
        from .comfy_dataset import encode_training_folder  # ComfyUI glue, imported only when the node runs

        latents, positive, captions, summary = encode_training_folder(folder, vae, clip, resolution, options)
        return {"ui": {"text": [summary]}, "result": (latents, positive, captions)}


def _options() -> dict:
    return {
        "bucket_step": ("INT", {"default": 64, "min": 8, "max": 512, "step": 8, "tooltip": "Bucket sides are "
                                "multiples of this: the VAE's downscale × the model's patch size (64 suits every "
                                "family)."}),
        **BUCKET_SIDES,
        "default_caption": ("STRING", {"default": "", "tooltip": "Caption for images without a .txt file."}),
        "masks": (list(MASK_SOURCES), {"default": "none", "tooltip": "Loss masks (white = train): none, the "
                                       "images' alpha channel, or same-named files in mask_folder. Train LoRA "
                                       "weighs the loss outside by the options node's unmasked_weight."}),
        "mask_folder": ("STRING", {"default": "", "tooltip": "With masks = mask folder: the input subfolder of "
                                   "masks, same relative names as the images (any image type)."}),
        "flip": ("BOOLEAN", {"default": False, "tooltip": "Also encode each image mirrored; each use draws one "
                             "of the two."}),
        "caption_variants": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": "Encode each caption this "
                                     "many times (the caption, then shuffled/dropped tags); each use draws one."}),
        "shuffle_tags": ("BOOLEAN", {"default": False, "tooltip": "Variants shuffle the comma-separated tags."}),
        "tag_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.95, "step": 0.05, "tooltip": "Variants "
                                  "drop each tag with this probability."}),
        "keep_tokens": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "The first this many tags stay "
                                "in place (kohya's keep_tokens)."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "tooltip": "Seeds the caption variants."}),
        **LATENT_DTYPE,
        "cache": ("BOOLEAN", {"default": True, "tooltip": "Keep each image's latent under the output folder's "
                              "lora_trainer_cache/, keyed by the file's content, the VAE and the bucket: the next "
                              "run skips the VAE."}),
        "chunk": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "Images read and encoded at a time "
                          "(memory holds one chunk of pixels)."}),
        "inpaint": ("BOOLEAN", {"default": False, "tooltip": "Inpainting models (SD inpainting, Flux Fill): each "
                                "image's conditioning gets the image with its masked region grey and the mask, as "
                                "InpaintModelConditioning sets them (needs masks; white = the region to paint)."}),
        "control_folder": ("STRING", {"default": "", "tooltip": "Edit models (Flux Kontext, Flux.2, Qwen-Image-Edit): "
                                      "the input subfolder of each image's control, same relative names (any image "
                                      "type); encoded at the image's bucket and set as its reference latent, as "
                                      "ReferenceLatent does. Every image needs one."}),
    }
