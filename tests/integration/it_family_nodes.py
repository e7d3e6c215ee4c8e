"""Test-only ComfyUI nodes (not part of the pack) for test_families.py and test_text_encoder_sdxl.py:
SDXL and SD3 without real weights (nor, but for ITTinySDXLClip, real text encoders).

The fixtures in those tests link this file into their servers' custom_nodes/.
- ITTinySDXLLoader: builds make_sdxl.py's tiny SDXL in-process (ComfyUI's detection only loads
  full-size SDXL files) and returns it as a MODEL, like UNETLoader would.
- ITSDXLConditioning: stands in for CLIPTextEncodeSDXL: a seeded CLIP-L+G-shaped context
  (1, tokens, 2048), a CLIP-G-shaped `pooled_output` (1, 1280) from its own seed, and the size
  values SDXL's `encode_adm` reads (width, height, crop_w, crop_h, target_width, target_height).
- ITSD3Conditioning: stands in for SD3's triple text encoder: a T5-XXL-shaped context
  (1, tokens, 4096) and a CLIP-L+G-shaped `pooled_output` (1, 2048).
- ITTinySDXLClip (test_text_encoder_sdxl.py): a real SDXL text encoder at toy depth, built in-process
  like ITTinySDXLLoader: a `comfy.sd.CLIP` of ComfyUI's own `sdxl_clip.SDXLClipModel` and
  `SDXLTokenizer` (what `supported_models.SDXL.clip_target` names), at the widths the toy UNet reads
  (context 768 + 1280 = 2048, CLIP-G's projected pooled output 1280 of its 2816 ADM inputs): CLIP-L
  hidden 768, 12 heads, MLP 3072; CLIP-G hidden 1280, 20 heads, MLP 5120, projection 1280; 3 layers
  each (`CLIP_LAYERS`) through SDClipModel's per-encoder `<model_name>_model_config` overrides. Three,
  not two: SDXL encodes from the penultimate layer (layer_idx -2) and SDClipModel asserts
  |layer_idx| < its layer count. Weights: make_checkpoint.py's init under the seed (ComfyUI's ops leave
  them uninitialised), in the dtype ComfyUI picks for text encoders. Logs `CLIP_BUILT` once per build.
- ITClipDigest (output node): sha256 of a CLIP's `cond_stage_model` state dict (names, dtypes, shapes,
  bytes) and of `encode_from_tokens(tokenize(text), return_pooled=True)` (cond and pooled); the digest
  is its STRING output and its UI result (`text`, with `weights` and `encoding` apart). It encodes first
  (loading this CLIP's patcher puts back the weights of any LoRA'd clone loaded before), and it runs
  every time (IS_CHANGED is NaN), so a later digest of a cached CLIP is computed anew.
"""
import hashlib
import importlib.util
import logging
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


CLIP_LAYERS = 3  # SDXL's layer_idx -2 needs more than two (SDClipModel asserts |layer_idx| < layers)
CLIP_CONFIGS = {  # SDClipModel's per-encoder overrides of sd1_clip_config.json / clip_config_bigg.json
    "clip_l": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072, "projection_dim": 768,
               "num_hidden_layers": CLIP_LAYERS},
    "clip_g": {"hidden_size": 1280, "num_attention_heads": 20, "intermediate_size": 5120, "projection_dim": 1280,
               "num_hidden_layers": CLIP_LAYERS},
}
CLIP_BUILT = "ITTinySDXLClip: built a toy SDXL CLIP"


def build_sdxl_clip(seed):
    """A `comfy.sd.CLIP` of ComfyUI's SDXLClipModel and SDXLTokenizer at CLIP_CONFIGS, seeded random weights."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    options = {f"{name}_model_config": dict(config) for name, config in CLIP_CONFIGS.items()}
    clip = comfy.sd.CLIP(target, model_options=options)
    torch.manual_seed(seed)
    _make_sdxl()._init_weights()(clip.cond_stage_model)
    return clip


class ITTinySDXLClip:
    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": _SEED}}

    def load(self, seed):
        clip = build_sdxl_clip(seed)
        model = clip.cond_stage_model
        logging.info("%s (seed %d, %s, %d parameters, %s)", CLIP_BUILT, seed, type(model).__name__,
                     sum(p.numel() for p in model.parameters()), ", ".join(sorted(map(str, model.dtypes))))
        return (clip,)


def _hash_tensor(digest, name, tensor):
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


class ITClipDigest:
    CATEGORY = "testing"
    FUNCTION = "digest"
    RETURN_TYPES = ("STRING",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"default": "a photo"})}}

    @classmethod
    def IS_CHANGED(cls, clip, text):
        return float("nan")  # never equal to itself: ComfyUI runs the node every time

    def digest(self, clip, text):
        with torch.no_grad():
            cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
            encoding = hashlib.sha256()
            _hash_tensor(encoding, "cond", cond)
            _hash_tensor(encoding, "pooled", pooled)
            weights = hashlib.sha256()
            for name, tensor in sorted(clip.cond_stage_model.state_dict().items()):
                _hash_tensor(weights, name, tensor)
        both = hashlib.sha256(f"{weights.hexdigest()} {encoding.hexdigest()}".encode()).hexdigest()
        return {"ui": {"text": [both], "weights": [weights.hexdigest()], "encoding": [encoding.hexdigest()]},
                "result": (both,)}


NODE_CLASS_MAPPINGS = {"ITTinySDXLLoader": ITTinySDXLLoader, "ITSDXLConditioning": ITSDXLConditioning,
                       "ITSD3Conditioning": ITSD3Conditioning, "ITTinySDXLClip": ITTinySDXLClip,
                       "ITClipDigest": ITClipDigest}
NODE_DISPLAY_NAME_MAPPINGS = {k: f"{k} (test only)" for k in NODE_CLASS_MAPPINGS}
