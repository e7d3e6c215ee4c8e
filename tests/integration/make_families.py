"""Tiny models of the families in the family matrix (test_family_matrix.py), built from ComfyUI's own classes.

Run with ComfyUI's Python from the ComfyUI folder (or with COMFYUI_DIR set):

    cd $COMFYUI_DIR && venv/bin/python /path/to/make_families.py OUT_DIR

writes OUT_DIR/tiny_<family>.safetensors for each family whose toy-width file ComfyUI's detection
reads back as built (`FILE_FAMILIES`: core's UNETLoader loads them from models/diffusion_models).
The others are built in-process by it_matrix_nodes.ITMatrixModel (`build`), because detection
cannot load them at toy width; each spec's `why` says what stops it. Both ways go through the
family's `comfy.supported_models` class (its `get_model`: the model_base class, its noise schedule
and latent format), so a file and an in-process model are the same kind of object.

Every spec also says what the family's latents and conditioning look like (`latent`: channels and
frames, None for image latents; `context`: the text encoder's width; `extra`: the conditioning keys
the model reads besides the context), which it_matrix_nodes.py gives the model in place of a VAE and
a text encoder. Widths are the smallest each model class accepts (mostly one head of 128 or a few
heads of 32, one block of each kind), so a training step takes a few hundredths of a second on a CPU.

Weights: N(0, 0.02) for every parameter under a fixed seed (ComfyUI's ops leave them uninitialised),
norm scales 1.
"""
from __future__ import annotations

import json
import os
import sys
from typing import NamedTuple

import torch

SEED = 0


class RANDN(tuple):
    """A conditioning tensor of this shape (after its batch axis), seeded normal values."""

    def __new__(cls, *shape: int) -> "RANDN":
        return super().__new__(cls, shape)


class ONES(RANDN):
    """A conditioning tensor of this shape (after its batch axis), integer ones: an attention mask as text
    encoders give it (LTX-Video turns an integer mask into an additive one; a float mask it takes as additive)."""


class Spec(NamedTuple):
    config: str  # comfy.supported_models class
    unet: dict  # its unet_config at toy width (what detection returns for the file, where there is one)
    channels: int  # latent channels
    frames: int | None  # frames of a training clip; None: image latents (B, C, H, W)
    context: int  # the text encoder's width (the conditioning's last axis)
    tokens: int  # text tokens of the conditioning
    extra: dict  # conditioning keys besides the context: name → RANDN/ONES (a tensor of that shape
    # with a batch axis of 1 in front), or a plain value (a number, None)
    file: bool  # True: a file UNETLoader detects; False: built in-process
    why: str  # how it is built, and why that way


LUMINA_COMMON = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": 1,
                 "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "qk_norm": True, "multiple_of": 32,
                 "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512]}
# Z-Image's modulation reads a 256-wide time embedding at min(dim, 256): its width is at least 256
ZIMAGE_WIDTH = {"dim": 256, "n_heads": 8, "n_kv_heads": 8}

SPECS: dict[str, Spec] = {
    "zimage": Spec(
        "ZImage", {**LUMINA_COMMON, **ZIMAGE_WIDTH, "cap_feat_dim": 2560, "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
                   "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32},
        16, None, 2560, 16, {}, False,
        "in-process: supported_models.ZImage matches only dim 3840 (and detection sets Z-Image's heads only "
        "there), so a toy-width file is read as plain Lumina2 or not at all; context 2560 is Qwen3-4B's"),
    "lumina2": Spec(
        "Lumina2", {**LUMINA_COMMON, "cap_feat_dim": 2304, "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0},
        16, None, 2304, 16, {}, False,
        "in-process: detection leaves a non-2304 width at NextDiT's 32 heads and (16, 56, 56) rope axes, "
        "and NextDiT asserts head dim = sum(axes), so only dim 4096 loads from a file; context 2304 is "
        "Gemma-2-2B's"),
    "flux2": Spec(
        "Flux2", {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "hidden_size": 128,
                  "num_heads": 1, "depth": 1, "depth_single_blocks": 1, "context_in_dim": 7680,
                  "vec_in_dim": None, "guidance_embed": True, "patch_size": 1, "axes_dim": [32, 32, 32, 32],
                  "mlp_ratio": 3.0, "theta": 2000, "qkv_bias": False, "txt_ids_dims": [3],
                  "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
                  "default_ref_method": "index", "ref_index_scale": 10.0},
        128, None, 7680, 16, {"guidance": 4.0}, True,
        "a file: detection reads Flux.2's width from img_in (hidden 128 = one head of 128) and its block "
        "counts; 128-channel latents, context 7680 (Qwen3-4B's three layers, as Klein's), guidance input"),
    "chroma": Spec(
        "Chroma", {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "hidden_size": 128,
                   "num_heads": 1, "depth": 1, "depth_single_blocks": 1, "context_in_dim": 4096,
                   "vec_in_dim": None, "patch_size": 2, "axes_dim": [16, 56, 56], "mlp_ratio": 4.0,
                   "theta": 10000, "qkv_bias": True, "txt_ids_dims": [], "in_dim": 64, "out_dim": 128,
                   "hidden_dim": 64, "n_layers": 1},
        16, None, 4096, 16, {}, False,
        "in-process: detection fixes the guidance approximator at hidden_dim 5120, out_dim 3072 and 5 "
        "layers whatever the file says, so a toy-width file would not load; context 4096 is T5-XXL's"),
    "hidream": Spec(
        "HiDream", {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16,
                    "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 32, "num_attention_heads": 2,
                    "caption_channels": [4096, 4096], "text_emb_dim": 2048, "num_routed_experts": 2,
                    "num_activated_experts": 1, "axes_dims_rope": [16, 8, 8], "max_resolution": [128, 128],
                    "llama_layers": [0, 0]},
        16, None, 4096, 16, {"pooled_output": RANDN(2048), "conditioning_llama3": RANDN(1, 16, 4096)}, False,
        "in-process: detection returns HiDream's full configuration (16 + 32 blocks of 20 heads of 128) "
        "whatever the file holds; T5-XXL context 4096, CLIP-L+G pooled 2048, one Llama-3.1 layer (4096)"),
    "ltxv": Spec(
        "LTXV", {"image_model": "ltxv", "num_layers": 1, "attention_head_dim": 4, "cross_attention_dim": 128,
                 "use_keyframes_abs_pos_embedding": False},
        128, 2, 4096, 16, {"attention_mask": ONES(16), "frame_rate": 25}, True,
        "a file: detection reads LTX-Video's head width (attention_head_dim = to_k rows / 32: 32 heads of 4) "
        "and its block count; 128-channel video latents, T5-XXL context 4096"),
    "ltxav": Spec(
        "LTXAV", {"image_model": "ltxav", "num_layers": 1, "attention_head_dim": 4, "cross_attention_dim": 128,
                  "num_attention_heads": 32, "audio_attention_head_dim": 4, "audio_num_attention_heads": 32,
                  "audio_cross_attention_dim": 128, "caption_channels": 128, "connector_attention_head_dim": 4,
                  "connector_num_attention_heads": 32, "connector_num_layers": 1,
                  "use_keyframes_abs_pos_embedding": False},
        128, 2, 128, 16, {"frame_rate": 25}, True,
        "a file with LTX's `config` metadata: from the weights detection reads only the video stream's head "
        "width and block count (the audio stream, 32 heads of 64, and the text connectors, 30 heads of 128, "
        "would be built full size: 711M parameters), but it takes the rest from the file's "
        "{\"config\": {\"transformer\": …}} metadata, as LTX's own checkpoints carry it. Video latents only "
        "(no audio stream: ComfyUI's sampler hands the model one latent shape); a 128-wide text-encoder "
        "output stands in for Gemma-3's, which LTX-2's connectors turn into the model's context inside "
        "ComfyUI's conditioning step (extra_conds), outside the training forward"),
    "hunyuan_video": Spec(
        "HunyuanVideo", {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16,
                         "patch_size": [1, 2, 2], "vec_in_dim": 768, "axes_dim": [16, 56, 56], "meanflow": False,
                         "context_in_dim": 4096, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": 1,
                         "depth_single_blocks": 1, "theta": 256, "qkv_bias": True, "byt5": False,
                         "guidance_embed": True, "use_cond_type_embedding": False, "vision_in_dim": None,
                         "meanflow_sum": False},
        16, 3, 4096, 16, {"pooled_output": RANDN(768), "guidance": 6.0}, True,
        "a file: detection reads the width from img_in (128: one head of 128) and the block counts; "
        "16-channel video latents, LLaVA-Llama-3 context 4096, CLIP-L pooled 768, guidance input"),
    "hunyuan_video15": Spec(
        "HunyuanVideo15", {"image_model": "hunyuan_video", "in_channels": 65, "out_channels": 32,
                           "patch_size": [1, 1, 1], "vec_in_dim": None, "axes_dim": [16, 56, 56], "meanflow": False,
                           "context_in_dim": 3584, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": 1,
                           "depth_single_blocks": 0, "theta": 256, "qkv_bias": True, "byt5": False,
                           "guidance_embed": False, "use_cond_type_embedding": True, "vision_in_dim": 1152,
                           "meanflow_sum": True},
        32, 3, 3584, 16, {"pooled_output": None}, True,
        "a file: detection reads the width from img_in and SigLIP's 1152 from vision_in; 32-channel video "
        "latents, 65 input channels (32 + 32 image + 1 mask, blank for text-to-video by design), "
        "Qwen2.5-VL context 3584"),
    "wan22_ti2v": Spec(
        "WAN22_T2V", {"image_model": "wan2.1", "model_type": "t2v", "dim": 128, "ffn_dim": 256, "num_heads": 1,
                      "num_layers": 1, "in_dim": 48, "out_dim": 48, "patch_size": (1, 2, 2)},
        48, 3, 4096, 16, {}, True,
        "a file: detection reads Wan's width from head.modulation (128: one head of 128) and out_dim 48 → "
        "WAN22_T2V (TI2V-5B); 48-channel video latents, umT5-XXL context 4096"),
}
FILE_FAMILIES = tuple(name for name, spec in SPECS.items() if spec.file)


def file_name(family: str) -> str:
    return f"tiny_{family}.safetensors"


def init_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter N(0, 0.02) (ComfyUI's ops skip init), norm scales 1."""
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)
    for m in module.modules():
        name = type(m).__name__
        if ("Norm" in name or name == "RMS_norm") and isinstance(getattr(m, "weight", None), torch.Tensor):
            torch.nn.init.ones_(m.weight)
    return module


def config_of(family: str):
    """The family's `comfy.supported_models` config at its toy unet_config, computing in fp32."""
    import comfy.supported_models

    spec = SPECS[family]
    config = getattr(comfy.supported_models, spec.config)(dict(spec.unet))
    config.set_inference_dtype(torch.float32, None)
    return config


def build_model(family: str, seed: int = SEED):
    """A fresh `comfy.model_base` model of the family (fp32, seeded weights)."""
    model = config_of(family).get_model({})
    torch.manual_seed(seed)
    init_weights(model.diffusion_model)
    return model


def build(family: str, seed: int = SEED):
    """A ModelPatcher of `build_model`, on ComfyUI's load/offload devices, as UNETLoader returns one."""
    import comfy.model_management as mm
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(build_model(family, seed), load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


# Families whose files carry their configuration in the safetensors metadata, as LTX's checkpoints do
CONFIG_METADATA = ("ltxav",)


def metadata(family: str) -> dict[str, str]:
    """The file's safetensors metadata: LTX's {"config": {"transformer": unet_config}} where the family's
    files carry it, else a note only."""
    out = {"format": "pt", "note": "random weights, for tests only"}
    if family in CONFIG_METADATA:
        out["config"] = json.dumps({"transformer": {k: v for k, v in SPECS[family].unet.items() if k != "image_model"}})
    return out


def detected(sd: dict[str, torch.Tensor], meta: dict | None = None) -> tuple[dict | None, str | None]:
    """ComfyUI's reading of a diffusion model's weights (and file metadata): (detected unet config,
    supported_models class)."""
    import comfy.model_detection

    config = comfy.model_detection.detect_unet_config(sd, "", metadata=meta)
    model_config = comfy.model_detection.model_config_from_unet(sd, "", metadata=meta)
    return config, None if model_config is None else type(model_config).__name__


def detection_reads_back(family: str, sd: dict[str, torch.Tensor], meta: dict | None = None) -> bool:
    """Whether ComfyUI's detection would load `sd` (with file metadata `meta`) as the toy model it is: the
    family's class, every unet_config value as built."""
    config, found = detected(sd, meta)
    spec = SPECS[family]
    if config is None or found != spec.config:
        return False
    return all(_same(config.get(k), v) for k, v in spec.unet.items())


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def state_dict(family: str) -> dict[str, torch.Tensor]:
    return {k: v.float().contiguous() for k, v in build_model(family).diffusion_model.state_dict().items()}


def main(out_dir: str) -> None:
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: it picks the device on import
    os.makedirs(out_dir, exist_ok=True)
    for family in FILE_FAMILIES:
        path = os.path.join(out_dir, file_name(family))
        if os.path.exists(path):
            print(f"exists, skipping: {path}")
            continue
        sd = state_dict(family)
        if not detection_reads_back(family, sd, metadata(family)):
            config, found = detected(sd, metadata(family))
            wrong = {k: ((config or {}).get(k), v) for k, v in SPECS[family].unet.items()
                     if not _same((config or {}).get(k), v)}
            raise SystemExit(f"{family}: ComfyUI detects {found}, {{key: (detected, built)}} = {wrong}")
        _save(sd, path, metadata(family))


def _save(sd: dict[str, torch.Tensor], path: str, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = f"{path}.tmp{os.getpid()}"
    save_file(sd, tmp, metadata=meta)
    os.replace(tmp, path)  # never leave a half-written file under the final name
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, {len(sd)} tensors)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    for p in (os.environ.get("COMFYUI_DIR"), os.getcwd()):
        if p and p not in sys.path:
            sys.path.insert(0, p)
    main(sys.argv[1])
