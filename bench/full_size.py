"""The memory of one LoRA training step on FULL-SIZE ComfyUI models, counted without the memory.

    COMFYUI_DIR=/path/to/ComfyUI python -m comfyui_lora_trainer.bench.full_size [--json PATH]
        [--models sdxl flux1-dev ...] [--full-grid] [--quick]

Each model is ComfyUI's own: its `comfy.supported_models` class (checked: the one ComfyUI's
`model_config_from_unet_config` picks for the full unet_config written here, the one its
model_detection reads from the real checkpoint) builds `BaseModel` and the diffusion model with
ComfyUI's operations, inside `torch._subclasses.fake_tensor.FakeTensorMode`: every weight has its
shape, dtype and device and no memory, so a 20B model is built in a second on a laptop. The weights
are stored in bf16 (ComfyUI's `disable_weight_init` layers, computing in bf16) or fp8_e4m3fn
(`set_inference_dtype(fp8, bf16)`: `pick_operations` gives the `manual_cast` layers, which cast each
weight to bf16 in forward, as ComfyUI does where the device has no fp8 matmul). The step is the
engine's own (training/memory.py `estimate`: adapters injected, the optimizer's state made, then one
step: noise draw, forward under the run's checkpointing (`model_blocks`), backward, optimizer step),
driven through `BaseModel.apply_model` with the conditioning each family's `extra_conds` builds from
fake text-encoder outputs of the right shapes (see `FAMILIES`), as nodes/comfy_train.py drives it
through the guider (`ModelFns` from `model_sampling`). The count is on the CPU device; as Train LoRA
does, the latent and the conditioning are added (`latents and captions`).

Attention: the count takes attention to be PyTorch's fused `scaled_dot_product_attention`
(memory.py: the output and the log-sum-exp, never the L×L scores; flash on the CPU, flash or
memory-efficient on CUDA), which is what ComfyUI runs on NVIDIA GPUs. On the CPU ComfyUI would pick
sub-quadratic attention (which builds score chunks), so this module starts ComfyUI with
`--cpu --use-pytorch-cross-attention` and, in case comfy was imported before, also rebinds every
`optimized_attention` / `optimized_attention_masked` name in the loaded `comfy.ldm` modules to
`comfy.ldm.modules.attention.attention_pytorch`. Each row records how many
`torch.nn.functional.scaled_dot_product_attention` calls it made (`sdpa_calls`), so a family that
bypassed SDPA would show it.

Offloading (`offload` rows) is ComfyUI's low-VRAM path: every `comfy.ops` layer gets
`comfy_cast_weights = True` and its weight and bias rest on another device ("meta" here, standing for
the CPU RAM behind a GPU), so `cast_bias_weight` copies them onto the compute device and to bf16 in
each forward (`cast_to`, then `.to(bf16)`): those copies are what the step holds of the weights (in
the transient column, and in the activations where autograd saves a cast weight for the input
gradient). Parameters of modules that are not comfy.ops layers (a few embeddings, norms and
modulation tensors) stay resident, as ComfyUI loads them. `cast_check` in the JSON compares, per
model, size and base, the offloaded step's bytes above the resident one's with the bf16 casts of the
largest checkpointed block (`largest_block_cast_mib`) and of all layers (`all_casts_mib`): on a bf16
base with checkpointing about one block's casts (the block recomputed in the backward pass), without
it about all of them (every layer's cast saved for backward). An fp8 base casts every layer already
when resident (manual_cast), so offloading it adds only the fp8 staging copy of one layer.

Settings: batch 1, LoRA rank 16, TrainConfig's other defaults (target "all", AdamW, bf16 training
dtype); 512 and 1024 px (Wan 2.1: 832×480, 33 frames = 9 latent frames); bf16 against fp8 weights,
gradient checkpointing on and off, offloading on and off; the levers step_in_backward and AdamW8bit
(bitsandbytes), alone and together, on the Flux 1024 px fp8 checkpointed case (optimizer_on_cpu is
left out: with the CPU as the compute device there is no other memory to move the state to). A full-size fake step
costs tens of CPU seconds (every op goes through FakeTensorMode and memory.py's counting dispatch
mode in Python), so only Flux.1-dev runs the whole grid by default; the others run a trimmed one
(`grid`; `--full-grid` runs the whole grid for every model). `--quick` runs toy-width configs of two
families (Flux and Wan 2.1; `--models sdxl-tiny` adds a UNet) built the same way, in about a minute
(tests/integration/test_full_size.py runs it).

The weights column is checked against each model's published parameter count (`weights_check`).
Limits: the count is the tensors torch allocates (no allocator slack, no CUDA context or kernel
workspace); the frozen text encoders and VAE are not counted (the trainer works from cached latents
and conditioning); text lengths are ComfyUI's padded lengths for T5/umt5 and a 256-token caption for
the LLM encoders (Qwen-Image, Z-Image).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "full_size.json"
GIB, MIB = 2 ** 30, 2 ** 20
COMFY_ARGS = ["--cpu", "--use-pytorch-cross-attention"]


# --- ComfyUI --------------------------------------------------------------------------------------

def start_comfyui() -> Path:
    """Put $COMFYUI_DIR on sys.path and let ComfyUI parse COMFY_ARGS (before comfy.* is imported)."""
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir or not (Path(comfy_dir) / "comfy").is_dir():
        raise SystemExit("COMFYUI_DIR must name a ComfyUI checkout (a folder with comfy/ in it)")
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    if "comfy.options" not in sys.modules:
        argv, sys.argv = sys.argv, [sys.argv[0], *COMFY_ARGS]
        try:
            import comfy.options
            comfy.options.enable_args_parsing()
            import comfy.model_management  # noqa: F401  (parses the arguments now)
        finally:
            sys.argv = argv
    return Path(comfy_dir)


def use_sdpa() -> int:
    """Rebind ComfyUI's attention names in every loaded comfy.ldm module to attention_pytorch (PyTorch's
    scaled_dot_product_attention); how many names were changed (0 when ComfyUI picked it already)."""
    import importlib

    import comfy.ldm.modules.attention as attention

    importlib.import_module("comfy.model_base")  # imports every model family's comfy.ldm modules

    pytorch = attention.attention_pytorch
    changed = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("comfy.ldm") or module is None:
            continue
        for attr in ("optimized_attention", "optimized_attention_masked"):
            if callable(getattr(module, attr, None)) and getattr(module, attr) is not pytorch:
                setattr(module, attr, pytorch)
                changed += 1
    return changed


@contextmanager
def counting_sdpa() -> Iterator[list[int]]:
    """Counts torch.nn.functional.scaled_dot_product_attention calls (ComfyUI looks it up at each call)."""
    import torch.nn.functional as F

    original, count = F.scaled_dot_product_attention, [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = counted
    try:
        yield count
    finally:
        F.scaled_dot_product_attention = original


# --- the models -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """One model: its ComfyUI config class and full unet_config, its latents and fake conditioning."""

    name: str
    label: str
    config_class: str  # comfy.supported_models class name
    unet_config: dict
    latent: Callable[[int], tuple[int, ...]]  # px → one latent's shape (C, [T,] H, W)
    conds: dict[str, tuple[int, ...]]  # extra_conds keyword → fake tensor shape (text encoder outputs)
    params: float  # published parameter count of the diffusion model (billions); 0 for toys
    sizes: tuple[int, ...] = (512, 1024)
    size_label: Callable[[int], str] = str
    extra: Callable[[int], dict] = field(default=lambda px: {})  # plain extra_conds keywords
    tiny: bool = False


def _image(channels: int, frames: int | None = None) -> Callable[[int], tuple[int, ...]]:
    return lambda px: (channels, *(() if frames is None else (frames,)), px // 8, px // 8)


_WAN_480P = lambda px: (16, 9, 480 // 8, 832 // 8)  # noqa: E731  (832×480, 33 frames: 1 + 32/4 latent frames)

FAMILIES: dict[str, Family] = {f.name: f for f in [
    # model_detection.py's SDXL (unet_config_from_diffusers_unet), CLIP-L+G: 77 tokens × 2048, pooled 1280
    Family("sdxl", "SDXL", "SDXL", dict(
        use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
        num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
        transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
        use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False,
        use_temporal_resblock=False), _image(4), {"cross_attn": (1, 77, 2048), "pooled_output": (1, 1280)}, 2.6,
        extra=lambda px: {"width": px, "height": px}),
    # model_detection.py's Flux branch for flux1-dev; T5-XXL padded to 256 tokens (comfy/text_encoders/flux.py)
    Family("flux1-dev", "Flux.1-dev", "Flux", dict(
        image_model="flux", axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000, out_channels=16,
        qkv_bias=True, txt_ids_dims=[], in_channels=16, hidden_size=3072, context_in_dim=4096, patch_size=2,
        vec_in_dim=768, depth=19, depth_single_blocks=38, guidance_embed=True), _image(16),
        {"cross_attn": (1, 256, 4096), "pooled_output": (1, 768)}, 11.9),
    # mmdit branch for sd3.5_large: 38 blocks of 2432, RMS q/k norm; CLIP-L+G 77 + T5 77 tokens (sd3_clip.py)
    Family("sd3.5-large", "SD3.5-large", "SD3", dict(
        in_channels=16, patch_size=2, out_channels=16, depth=38, input_size=None, adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 2432}},
        num_patches=36864, pos_embed_max_size=192, qk_norm="rms", pos_embed_scaling_factor=None,
        x_block_self_attn_layers=[]), _image(16), {"cross_attn": (1, 154, 4096), "pooled_output": (1, 2048)}, 8.1),
    # qwen_image: 60 blocks of 3072; Qwen2.5-VL-7B hidden states, 3584 wide (a 256-token caption)
    Family("qwen-image", "Qwen-Image", "QwenImage", dict(image_model="qwen_image", in_channels=64, num_layers=60),
           _image(16, frames=1), {"cross_attn": (1, 256, 3584)}, 20.0),
    # wan2.1 t2v 14B: 40 blocks of 5120; umt5-xxl padded to 512 tokens × 4096 (comfy/text_encoders/wan.py)
    Family("wan2.1-t2v-14b", "Wan 2.1 T2V 14B", "WAN21_T2V", dict(
        image_model="wan2.1", model_type="t2v", dim=5120, out_dim=16, num_heads=40, ffn_dim=13824, num_layers=40,
        patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
        in_dim=16), _WAN_480P, {"cross_attn": (1, 512, 4096)}, 14.0, sizes=(480,),
        size_label=lambda px: "832×480×33"),
    # lumina2 (NextDiT) at dim 3840 = Z-Image; Qwen3-4B hidden states, 2560 wide (a 256-token caption)
    Family("z-image", "Z-Image", "ZImage", dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560, n_layers=30, qk_norm=True,
        n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
        ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32),
        _image(16), {"cross_attn": (1, 256, 2560)}, 6.0),
]}

# toy widths of two families, built the same way (--quick); the config class is taken as named. The
# latents are large for the width (fake tensors cost the same at any size), so that, as at full size, the
# step's peak is in the backward pass and activations outweigh the adapters.
TINY: dict[str, Family] = {f.name: f for f in [
    Family("flux-tiny", "Flux (toy)", "Flux", dict(
        FAMILIES["flux1-dev"].unet_config, axes_dim=[16, 24, 24], num_heads=4, hidden_size=256, context_in_dim=32,
        vec_in_dim=16, depth=2, depth_single_blocks=2), _image(16),
        {"cross_attn": (1, 16, 32), "pooled_output": (1, 16)}, 0, sizes=(512,), tiny=True),
    Family("sdxl-tiny", "SDXL (toy)", "SDXL", dict(
        FAMILIES["sdxl"].unet_config, model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1],
        transformer_depth=[0, 1], transformer_depth_middle=1, transformer_depth_output=[0, 0, 1, 1], context_dim=32,
        num_head_channels=16, adm_in_channels=64 + 6 * 256), _image(4),
        {"cross_attn": (1, 16, 32), "pooled_output": (1, 64)}, 0, sizes=(512,),
        extra=lambda px: {"width": px, "height": px}, tiny=True),
    Family("wan-tiny", "Wan 2.1 (toy)", "WAN21_T2V", dict(
        FAMILIES["wan2.1-t2v-14b"].unet_config, dim=512, num_heads=4, ffn_dim=1024, num_layers=2, text_dim=32),
        lambda px: (16, 5, px // 8, px // 8), {"cross_attn": (1, 16, 32)}, 0, sizes=(256,),
        size_label=lambda px: f"{px}×{px}×17", tiny=True),
]}
QUICK_DEFAULT = ("flux-tiny", "wan-tiny")


def build(family: Family, weights: str):
    """ComfyUI's BaseModel of `family` with weights stored in `weights` ("bf16" or "fp8"), built under
    the current (fake) mode."""
    import torch
    import comfy.model_detection
    import comfy.supported_models

    if family.tiny:
        config = getattr(comfy.supported_models, family.config_class)(dict(family.unet_config))
    else:
        config = comfy.model_detection.model_config_from_unet_config(dict(family.unet_config))
        if type(config).__name__ != family.config_class:
            raise RuntimeError(f"{family.name}: ComfyUI picks {type(config).__name__} for this unet_config, "
                               f"not {family.config_class}")
    if weights == "fp8":
        config.set_inference_dtype(torch.float8_e4m3fn, torch.bfloat16)  # manual_cast layers: fp8 → bf16 in forward
    else:
        config.set_inference_dtype(torch.bfloat16, None)
    return config.get_model({}, device=torch.device("cpu"))


def cast_layers(net) -> list:
    """The comfy.ops layers (the ones cast_bias_weight serves) of `net`."""
    import comfy.ops

    return [m for m in net.modules() if isinstance(m, comfy.ops.CastWeightBiasOp)]


@contextmanager
def offloaded(net, on: bool):
    """With `on`: every comfy.ops layer casts in forward and its weight/bias rest on "meta" (not resident)."""
    import torch
    from torch import nn

    if not on:
        yield
        return
    kept = []
    for module in cast_layers(net):
        params = {k: module._parameters.get(k) for k in ("weight", "bias")}
        kept.append((module, params, module.__dict__.get("comfy_cast_weights")))
        module.comfy_cast_weights = True
        for k, p in params.items():
            if p is not None:
                module._parameters[k] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                     requires_grad=False)
    try:
        yield
    finally:
        for module, params, flag in kept:
            for k, p in params.items():
                if p is not None:
                    module._parameters[k] = p
            if flag is None:
                del module.comfy_cast_weights
            else:
                module.comfy_cast_weights = flag


def model_fns(base, conds: dict):
    """The engine's ModelFns for a ComfyUI BaseModel, as nodes/comfy_train.py builds them from the
    model's `model_sampling`, with `denoise` through `apply_model` on the given extra_conds."""
    import torch
    import comfy.model_sampling
    from ..training.objective import ModelFns

    sampling = base.model_sampling

    def percent_to_sigma(percent):
        return torch.tensor([float(sampling.percent_to_sigma(p)) for p in percent.clamp(1e-4, 1 - 1e-4).tolist()])

    def denoise(noisy, sigma, images):
        kwargs = {k: c.process_cond(batch_size=noisy.shape[0], device=noisy.device).cond for k, c in conds.items()}
        return base.apply_model(noisy, sigma, **kwargs)

    return ModelFns(
        percent_to_sigma=percent_to_sigma,
        noise_scaling=lambda s, n, x: sampling.noise_scaling(s.to(x), n, x, False),
        calculate_denoised=lambda s, out, x: sampling.calculate_denoised(s.to(x), out, x),
        denoise=denoise,
        flow=isinstance(sampling, comfy.model_sampling.CONST),
    )


# --- the grid -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    model: str
    px: int
    base: str  # bf16 | fp8
    checkpointing: bool
    offload: bool
    lever: str = ""  # "", step_in_backward, AdamW8bit, both


LEVERS = {"step_in_backward": dict(step_in_backward=True), "AdamW8bit": dict(optimizer="AdamW8bit"),
          "both": dict(step_in_backward=True, optimizer="AdamW8bit")}
BASES, SWITCH = ("bf16", "fp8"), (True, False)


def full_grid(f: Family) -> list[Row]:
    """Each size × base × checkpointing × offloading."""
    return [Row(f.name, px, base, ckpt, off)
            for px in f.sizes for base in BASES for ckpt in SWITCH for off in (False, True)]


def grid(families: list[Family], full: bool = False) -> list[Row]:
    """The rows run for `families`. Flux.1-dev (or with `full`, every model): the full grid (`full_grid`) and
    the three levers (step_in_backward, AdamW8bit, both) at its largest size, fp8, checkpointed. The other
    models, trimmed (a full-size fake step costs tens of CPU seconds): at the largest size bf16 and fp8 with
    checkpointing on and off, and bf16 offloaded with checkpointing on and off; at the smaller size fp8
    checkpointed; Wan 2.1 also gets both levers together. Toys (--quick): bf16 with checkpointing on and off, fp8 with
    checkpointing, offloaded and not, and both levers on the first toy."""
    rows: list[Row] = []
    for i, f in enumerate(families):
        big = max(f.sizes)
        if f.tiny:
            rows += [Row(f.name, big, "bf16", ckpt, False) for ckpt in SWITCH]
            rows += [Row(f.name, big, "fp8", True, off) for off in (False, True)]
            rows += [Row(f.name, big, "fp8", True, False, "both")] if i == 0 else []
        elif full or f.name == "flux1-dev":
            rows += full_grid(f) + [Row(f.name, big, "fp8", True, False, lever) for lever in LEVERS]
        else:
            rows += [Row(f.name, big, base, ckpt, False) for base in BASES for ckpt in SWITCH]
            rows += [Row(f.name, big, "bf16", ckpt, True) for ckpt in SWITCH]
            rows += [Row(f.name, px, "fp8", True, False) for px in f.sizes if px != big]
            rows += [Row(f.name, big, "fp8", True, False, "both")] if f.name.startswith("wan") else []
    return rows


def config_of(row: Row):
    from ..training.config import TrainConfig

    return TrainConfig(batch_size=1, rank=16, gradient_checkpointing=row.checkpointing, **LEVERS.get(row.lever, {}))


def run(families: list[Family], full: bool = False, log: Callable[[str], None] = print,
        progress: Callable[[dict], None] | None = None) -> dict:
    """Every row of `grid(families, full)`: its settings, the estimate's as_dict(), the wall and CPU seconds
    it took, and its SDPA calls; also the weights check and the cast check. `progress` gets the result so
    far after each row. Each model is built once per base and shared by its rows."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    import comfy.model_management
    from ..training import memory
    from ..training.checkpointing import model_blocks

    rebound = use_sdpa()
    comfy.model_management.in_training = True  # as nodes/comfy_train.py sets it while training
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    order = grid(families, full)
    done: dict[Row, dict] = {}
    checks: list[dict] = []
    started, cpu_started = time.monotonic(), time.process_time()

    def result() -> dict:
        rows = [done[r] for r in order if r in done]
        return {"rows": rows, "weights_check": checks, "cast_check": _cast_check(rows, checks),
                "attention_names_rebound": rebound, "complete": len(rows) == len(order),
                "seconds_total": round(time.monotonic() - started, 1),
                "cpu_seconds_total": round(time.process_time() - cpu_started, 1)}

    for family in families:
        for base in BASES:
            todo = [r for r in order if r.model == family.name and r.base == base]
            if not todo:
                continue
            with mode:
                model = build(family, base)
            net = model.diffusion_model
            blocks = model_blocks(net)
            checks.append(_weights_info(net, blocks, family, base))
            for row in todo:
                config = config_of(row)
                with mode:
                    shape = family.latent(row.px)
                    latents = [torch.zeros(1, *shape)]
                    conds = model.extra_conds(noise=latents[0], device=torch.device("cpu"),
                                              **{k: torch.zeros(s) for k, s in family.conds.items()},
                                              **family.extra(row.px))
                fns = model_fns(model, conds)
                wall, cpu = time.monotonic(), time.process_time()
                with offloaded(net, row.offload), counting_sdpa() as sdpa, mode:
                    est = memory.estimate(net, fns, latents, config, checkpoint_blocks=blocks, device="cpu")
                    est.extra["latents and captions"] = memory.tensor_bytes([latents, conds], "cpu")
                wall, cpu = time.monotonic() - wall, time.process_time() - cpu
                done[row] = {"model": family.name, "label": family.label, "size": family.size_label(row.px),
                             "px": row.px, "latent": list(shape), "base": row.base,
                             "checkpointing": row.checkpointing, "offload": row.offload, "lever": row.lever,
                             "rank": config.rank, "target": config.target, "batch_size": config.batch_size,
                             "optimizer": config.optimizer, "step_in_backward": config.step_in_backward,
                             **est.as_dict(), "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                             "sdpa_calls": sdpa[0]}
                log(f"{family.name} {family.size_label(row.px)} {base} checkpointing={row.checkpointing} "
                    f"offload={row.offload}{' ' + row.lever if row.lever else ''}: {est.describe()} "
                    f"[{wall:.1f} s, {cpu:.1f} s CPU, {sdpa[0]} SDPA calls]")
                if progress is not None:
                    progress(result())
            del model, net, blocks
    return result()


def _weights_info(net, blocks, family: Family, base: str) -> dict:
    """Parameter count and bytes of the diffusion model against its published count; the bf16 bytes of
    the comfy.ops layers' casts: all of them, and the largest checkpointed block's."""
    from ..training.memory import resident_bytes

    params = sum(p.numel() for p in net.parameters())
    casts = cast_layers(net)

    def cast_bytes(modules) -> int:
        return sum(p.numel() * 2 for m in modules for p in (m._parameters.get("weight"), m._parameters.get("bias"))
                   if p is not None)

    cast_ids = {id(m) for m in casts}
    in_blocks = [cast_bytes([m for m in b.modules() if id(m) in cast_ids]) for b in blocks]
    kept = sum(p.numel() * p.element_size() for m in net.modules() if id(m) not in cast_ids
               for p in m._parameters.values() if p is not None)
    return {"model": family.name, "base": base, "params": params, "params_b": round(params / 1e9, 3),
            "published_b": family.params or None,
            "ratio": round(params / (family.params * 1e9), 3) if family.params else None,
            "weights_mib": resident_bytes(net, "cpu") / MIB, "bytes_per_param": resident_bytes(net, "cpu") / params,
            "all_casts_mib": cast_bytes(casts) / MIB, "largest_block_cast_mib": max(in_blocks, default=0) / MIB,
            "not_offloaded_mib": kept / MIB}


def _cast_check(rows: list[dict], checks: list[dict]) -> list[dict]:
    """Per model/size/base: how much the offloaded step holds above the resident one (its casts), with and
    without checkpointing, beside the largest block's casts and all casts (bf16)."""
    out = []
    by = {(r["model"], r["px"], r["base"], r["checkpointing"], r["offload"]): r for r in rows if not r["lever"]}
    for (model, px, base, ckpt, off), r in by.items():
        plain = by.get((model, px, base, ckpt, False))
        if not off or plain is None:
            continue
        info = next(c for c in checks if c["model"] == model and c["base"] == base)
        out.append({"model": model, "px": px, "base": base, "checkpointing": ckpt,
                    "extra_step_mib": r["step_mib"] - plain["step_mib"],
                    "largest_block_cast_mib": info["largest_block_cast_mib"], "all_casts_mib": info["all_casts_mib"]})
    return out


# --- output ---------------------------------------------------------------------------------------

def table(rows: list[dict], unit: int = GIB) -> str:
    """The markdown table of `rows`, in GiB (or MiB)."""
    name = "GiB" if unit == GIB else "MiB"
    show = lambda mib: f"{mib * MIB / unit:.2f}"  # noqa: E731
    lines = [f"| model | size | base | ckpt | offload | lever | total {name} | weights | adapters+grads+optim "
             "| activations | transient |", "|---|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        adapters = r["adapters_mib"] + r["gradients_mib"] + r["optimizer_mib"]
        lines.append(f"| {r['label']} | {r['size']} | {r['base']} | {'on' if r['checkpointing'] else 'off'} "
                     f"| {'on' if r['offload'] else 'off'} | {r['lever'] or '-'} | {show(r['total_mib'])} "
                     f"| {show(r['weights_mib'])} | {show(adapters)} | {show(r['activations_mib'])} "
                     f"| {show(r['transient_mib'])} |")
    return "\n".join(lines)


def weights_table(checks: list[dict]) -> str:
    lines = ["| model | base | params (B) | published (B) | ratio | weights GiB | bytes/param |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for c in checks:
        lines.append(f"| {c['model']} | {c['base']} | {c['params_b']:.3f} | {c['published_b'] or '-'} "
                     f"| {c['ratio'] or '-'} | {c['weights_mib'] / 1024:.2f} | {c['bytes_per_param']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--models", nargs="+", help=f"of {', '.join(FAMILIES)} (default: all); with --quick, "
                                                    f"of {', '.join(TINY)} (default: {', '.join(QUICK_DEFAULT)})")
    parser.add_argument("--quick", action="store_true", help="toy widths of two families, in under a minute")
    parser.add_argument("--full-grid", action="store_true",
                        help="every size × base × checkpointing × offloading for every model, not only Flux")
    args = parser.parse_args(argv)
    table_of = TINY if args.quick else FAMILIES
    names = args.models or list(QUICK_DEFAULT if args.quick else FAMILIES)
    unknown = [n for n in names if n not in table_of]
    if unknown:
        parser.error(f"unknown models {unknown}; choose of {', '.join(table_of)}")
    comfy_dir = start_comfyui()
    import torch

    head = {"quick": args.quick, "full_grid": args.full_grid, "torch": torch.__version__,
            "comfyui": _comfyui_version(comfy_dir), "device": "cpu (fake tensors)",
            "attention": "torch.nn.functional.scaled_dot_product_attention (ComfyUI's attention_pytorch)"}
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def write(result: dict) -> None:
        args.json.write_text(json.dumps({**head, **result}, indent=1) + "\n")

    result = run([table_of[n] for n in names], args.full_grid, log=lambda line: print(line, flush=True),
                 progress=write)
    write(result)
    unit = MIB if args.quick else GIB
    print(table(result["rows"], unit))
    print()
    print(weights_table(result["weights_check"]))
    print(f"\n{len(result['rows'])} rows in {result['seconds_total']:.0f} s "
          f"({result['cpu_seconds_total']:.0f} s CPU); JSON: {args.json}")
    return result


def _comfyui_version(comfy_dir: Path) -> str | None:
    """ComfyUI's `__version__` (comfyui_version.py), read without running the file; None without one."""
    try:
        text = (comfy_dir / "comfyui_version.py").read_text()
    except OSError:
        return None
    found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    return found[1] if found else None


if __name__ == "__main__":
    main()
