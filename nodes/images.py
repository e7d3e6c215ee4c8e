"""Load Image Set, Load Image Set From Folder, Load Captioned Image Set (docs/nodes.md, docs/data.md#dataset-folders).

The file work (EXIF, modes, resizing, captions, kohya repeat folders) is in training/images.py;
these classes only find ComfyUI's input folder and shape outputs.
"""
from __future__ import annotations

from .common import CATEGORY, FOLDER_TIP, input_files, input_subfolders

_RESIZE = (["None", "Stretch", "Crop", "Pad"], {"default": "None", "tooltip": "For images of different sizes: None (sizes must match), Stretch, Crop (cover, centre crop), Pad (fit inside, pad)."})
_WIDTH = ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8, "tooltip": "Target width when resizing; 0 = the first image's width."})
_HEIGHT = ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8, "tooltip": "Target height when resizing; 0 = the first image's height."})


class LoadImageSet:
    DESCRIPTION = "Loads a chosen set of images from ComfyUI's input folder as one IMAGE batch."
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The images, as one batch.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "image": (input_files(), {"image_upload": True, "tooltip": "An image from the input folder (upload adds one)."}),
            },
            "optional": {
                "more_images": ("STRING", {"default": "", "multiline": True, "tooltip": "More input-folder files, one name per line."}),
                "resize_method": _RESIZE,
                "width": _WIDTH,
                "height": _HEIGHT,
            },
        }

    def execute(self, image: str, more_images: str = "", resize_method: str = "None", width: int = 0, height: int = 0) -> tuple:
        from .comfy_io import load_input_images

        names = [image] + [n.strip() for n in more_images.splitlines() if n.strip()]
        return (load_input_images(names, resize_method, width, height),)


class LoadImageSetFromFolder:
    DESCRIPTION = "Loads every image in a subfolder of ComfyUI's input folder as one IMAGE batch."
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The images, as one batch.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {"folder": (input_subfolders(), {"tooltip": FOLDER_TIP})},
            "optional": {"resize_method": _RESIZE, "width": _WIDTH, "height": _HEIGHT},
        }

    def execute(self, folder: str, resize_method: str = "None", width: int = 0, height: int = 0) -> tuple:
        from .comfy_io import load_input_folder

        return (load_input_folder(folder, resize_method, width, height).images,)


class LoadCaptionedImageSet:
    DESCRIPTION = ("Loads a subfolder's images with their <image>.txt captions and encodes each caption with "
                   "CLIP: one CONDITIONING per image, for Train LoRA.")
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = ("IMAGE", "CONDITIONING", "STRING")
    RETURN_NAMES = ("images", "positive", "captions")
    OUTPUT_IS_LIST = (False, True, True)
    OUTPUT_TOOLTIPS = ("The images, as one batch.", "One CONDITIONING per image, in order.", "The captions, in order.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "folder": (input_subfolders(), {"tooltip": FOLDER_TIP}),
                "clip": ("CLIP", {"tooltip": "The text encoder for the captions."}),
            },
            "optional": {
                "default_caption": ("STRING", {"default": "", "tooltip": "Caption for images without a .txt file."}),
                "resize_method": _RESIZE,
                "width": _WIDTH,
                "height": _HEIGHT,
            },
        }

    def execute(self, folder: str, clip, default_caption: str = "", resize_method: str = "None",
                width: int = 0, height: int = 0) -> tuple:
        from ..training.images import fill_captions
        from .comfy_io import encode_captions, load_input_folder

        image_set = load_input_folder(folder, resize_method, width, height)
        captions = fill_captions(image_set.paths, image_set.captions, default_caption)
        return image_set.images, encode_captions(clip, captions), captions
