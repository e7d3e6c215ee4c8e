"""A pure-Python model of how AUTOMATIC1111's built-in Lora extension matches and reads a LoRA file.

A1111's loader is not a pip package, so the tests apply its key rules to our key lists instead of
running it. Everything here is re-expressed from reading the sources below; no code is copied.

Sources read (AUTOMATIC1111/stable-diffusion-webui, extensions-builtin/Lora/):
- `networks.py`, the v1.10 text (SD3 era: `diffusers_weight_map`, `module_types` ending in
  `ModuleTypeOFT`), read from the code index (stored file id 474940204; the index did not name its
  commit): `convert_diffusers_name_to_compvis`, `assign_network_names_to_compvis_modules`,
  `load_network`, `network_apply_weights`.
- `network.py` (`NetworkModule.__init__`, `finalize_updown`, `apply_weight_decompose`),
  `network_lora.py`, `network_hada.py`, `network_ia3.py`, `network_lokr.py`, `network_full.py`,
  `network_norm.py`, `network_glora.py`, `network_oft.py` (each `ModuleType*.create_module` and
  module `__init__`), as Forge vendors them verbatim (AGPL, "Copyright (c) 2023 AUTOMATIC1111") in
  lllyasviel/stable-diffusion-webui-forge `packages_3rdparty/webui_lora_collection/`, commit
  00f1cd36bd25431445eb67425ad39434c68c8665 (2024-08-13). Older A1111 texts in the index (e.g.
  `network_full.py` at 238adeaffb037dedbcefe41e7fd4814a1f17baa2, `networks.py` at
  873edba44bedf0086d52343f282552b3601baeb8) have no Norm type, no DoRA and a Full module that reads
  `diff` only.

The rules, in A1111's order:
1. Layer names (`assign_network_names_to_compvis_modules`): every module of
   `shared.sd_model.model.named_modules()`, dots → underscores. `sd_model.model` is the
   DiffusionWrapper, so UNet layers are `diffusion_model_<LDM path>`; containers are included.
2. Each key is split at its FIRST dot (`key.partition(".")`): layer part, network part.
3. Lookup (`load_network`): the diffusers→compvis conversion; else, for `*_[qkv]_proj` names, the
   name without that tail (the MultiheadAttention of OpenCLIP); else, if the layer part contains
   `lora_unet`, that replaced by `diffusion_model` (how LDM-named kohya keys, ours included, match);
   elif `lora_te1_text_model` → `0_transformer_text_model`, then `transformer_text_model`; elif
   `oft_unet` → `diffusion_model`. Keys that still match nothing are only logged at debug level:
   A1111 drops them silently.
4. The keys of one layer form a group; the first module type whose `create_module` accepts the group
   claims it (lora, hada, ia3, lokr, full, norm, glora, oft). If none does, `load_network` raises
   AssertionError and the whole file fails to load.
5. Every module reads, besides its own keys, `alpha`, `scale`, `bias` and `dora_scale`
   (`NetworkModule.__init__`). Other keys of the group are ignored without a word.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

UNET_PREFIX = "diffusion_model"  # the DiffusionWrapper's child, as A1111 names UNet layers

LINEAR_TYPES = frozenset({"Linear", "NonDynamicallyQuantizableLinear", "MultiheadAttention"})
CONV_TYPES = frozenset({"Conv2d"})
NORM_TYPES = frozenset({"GroupNorm", "GroupNorm32", "LayerNorm"})
# lora_patches.py swaps forward/load_state_dict of exactly these; other modules never change.
PATCHED_TYPES = LINEAR_TYPES | CONV_TYPES | NORM_TYPES

# network.py, NetworkModule.__init__: read for every module type.
BASE_READS = frozenset({"alpha", "scale", "bias", "dora_scale"})


@dataclass(frozen=True)
class Accepts:
    """One way a module type accepts a group: `requires` all present, then it reads `reads`."""
    requires: frozenset[str]
    reads: frozenset[str]


@dataclass(frozen=True)
class ModuleRule:
    """A1111 module type: its `create_module` conditions and, for LoRA, the layer types it can build on."""
    name: str
    accepts: tuple[Accepts, ...]
    layer_types: frozenset[str] | None = None  # None: any layer with a weight


def _rule(name: str, requires: Iterable[Iterable[str]], own: Iterable[str],
          layer_types: frozenset[str] | None = None) -> ModuleRule:
    reads = frozenset(own) | BASE_READS
    return ModuleRule(name, tuple(Accepts(frozenset(r), reads) for r in requires), layer_types)


_LOKR_1 = (("lokr_w1",), ("lokr_w1_a", "lokr_w1_b"))
_LOKR_2 = (("lokr_w2",), ("lokr_w2_a", "lokr_w2_b"))
_LORA_OWN = ("lora_up.weight", "lora_down.weight", "lora_mid.weight")

MODULE_RULES: tuple[ModuleRule, ...] = (
    # network_lora.py: up+down; or PEFT's lora_A+lora_B, after which `weights.w` is cleared and holds
    # only up/down, so alpha, dora_scale and every other key of a PEFT-named group go unread.
    # NetworkModuleLora.create_module raises AssertionError unless the layer is Linear/Conv2d/MHA.
    ModuleRule("lora", (Accepts(frozenset(_LORA_OWN[:2]), frozenset(_LORA_OWN) | BASE_READS),
                        Accepts(frozenset({"lora_A.weight", "lora_B.weight"}),
                                frozenset({"lora_A.weight", "lora_B.weight"}))),
               LINEAR_TYPES | CONV_TYPES),
    _rule("hada", [("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")],
          ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")),
    _rule("ia3", [("weight",)], ("weight", "on_input")),  # on_input is indexed, not .get
    # network_lokr.py: (w1 or w1_a+w1_b) and (w2 or w2_a+w2_b); lokr_t2 optional, no lokr_t1.
    _rule("lokr", [a + b for a in _LOKR_1 for b in _LOKR_2],
          ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")),
    _rule("full", [("diff",)], ("diff", "diff_b")),  # network_full.py: diff_b becomes ex_bias
    _rule("norm", [("w_norm", "b_norm")], ("w_norm", "b_norm")),
    _rule("glora", [("a1.weight", "a2.weight", "alpha", "b1.weight", "b2.weight")],
          ("a1.weight", "a2.weight", "b1.weight", "b2.weight")),
    _rule("oft", [("oft_blocks",), ("oft_diag",)], ("oft_blocks", "oft_diag")),
)

_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                  "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def compvis_module_names(modules: Mapping[str, str]) -> dict[str, str]:
    """A1111 layer name → type name, from LDM UNet paths as ComfyUI's `diffusion_model.named_modules()`
    gives them ("input_blocks.1.1.proj_in" → "diffusion_model_input_blocks_1_1_proj_in"; the root ""
    → "diffusion_model"). A1111 takes them from `sd_model.model.named_modules()`, one level up."""
    return {(f"{UNET_PREFIX}.{path}" if path else UNET_PREFIX).replace(".", "_"): kind
            for path, kind in modules.items()}


def text_encoder_module_names(layers: int, sdxl: bool) -> dict[str, str]:
    """A1111's layer names → types of the CLIP text encoders' trainable layers (`layers` each), as
    `assign_network_names_to_compvis_modules` names them: SD1.x `cond_stage_model.wrapped`'s modules
    (`transformer_text_model_encoder_layers_0_self_attn_q_proj`, HF CLIP); SDXL the conditioner's
    embedders, each under its index: 0 the HF CLIP-L (`0_transformer_text_model_…`), 1 OpenCLIP's bigG
    (`1_model_transformer_resblocks_0_attn`, a MultiheadAttention with its `out_proj`, and `mlp_c_fc`,
    `mlp_c_proj`)."""
    names: dict[str, str] = {}
    hf = "0_transformer_text_model" if sdxl else "transformer_text_model"
    for i in range(layers):
        for module in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                       "mlp_fc1", "mlp_fc2"):
            names[f"{hf}_encoder_layers_{i}_{module}"] = "Linear"
        names[f"{hf}_encoder_layers_{i}_layer_norm1"] = "LayerNorm"
        if sdxl:
            block = f"1_model_transformer_resblocks_{i}"
            names.update({f"{block}_attn": "MultiheadAttention",
                          f"{block}_attn_out_proj": "NonDynamicallyQuantizableLinear", f"{block}_mlp_c_fc": "Linear",
                          f"{block}_mlp_c_proj": "Linear", f"{block}_ln_1": "LayerNorm"})
    return names


def _block_suffix(kind: str, suffix: str) -> str:
    return _RESNET_SUFFIX.get(suffix, suffix) if kind == "resnets" else suffix


def _te_sd2(prefix: str, layer: str, rest: str) -> str:
    """OpenCLIP names: mlp_fc1 → mlp_c_fc, mlp_fc2 → mlp_c_proj, otherwise self_attn → attn."""
    if "mlp_fc1" in rest:
        rest = rest.replace("mlp_fc1", "mlp_c_fc")
    elif "mlp_fc2" in rest:
        rest = rest.replace("mlp_fc2", "mlp_c_proj")
    else:
        rest = rest.replace("self_attn", "attn")
    return f"{prefix}model_transformer_resblocks_{layer}_{rest}"


def convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    """A kohya layer name in diffusers spelling → A1111's compvis layer name; other names unchanged.

    Re-expresses networks.py `convert_diffusers_name_to_compvis`: each rule is a prefix match
    (`re.match`), tried in A1111's order. Diffusers block b, item i: down → input_blocks_{1+3b+i},
    up → output_blocks_{3b+i}; attentions sit at index 1 of the block, resnets at 0; the mid block's
    attention is middle_block_1, its resnets middle_block_{2i}."""
    u = "lora_unet_"
    rules: tuple[tuple[str, Callable[[re.Match[str]], str]], ...] = (
        (u + r"conv_in(.*)", lambda m: f"{UNET_PREFIX}_input_blocks_0_0{m[1]}"),
        (u + r"conv_out(.*)", lambda m: f"{UNET_PREFIX}_out_2{m[1]}"),
        (u + r"time_embedding_linear_(\d+)(.*)", lambda m: f"{UNET_PREFIX}_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (u + r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"{UNET_PREFIX}_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_"
                   f"{1 if m[2] == 'attentions' else 0}_{_block_suffix(m[2], m[4])}"),
        (u + r"mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"{UNET_PREFIX}_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_"
                   f"{_block_suffix(m[1], m[3])}"),
        (u + r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"{UNET_PREFIX}_output_blocks_{int(m[1]) * 3 + int(m[3])}_"
                   f"{1 if m[2] == 'attentions' else 0}_{_block_suffix(m[2], m[4])}"),
        (u + r"down_blocks_(\d+)_downsamplers_0_conv",
         lambda m: f"{UNET_PREFIX}_input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (u + r"up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"{UNET_PREFIX}_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: _te_sd2("", m[1], m[2]) if is_sd2 else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", lambda m: _te_sd2("1_", m[1], m[2])),
    )
    for pattern, build in rules:
        found = re.match(pattern, key)
        if found:
            return build(found)
    return key


def _lookup(layer_part: str, layers: Mapping[str, str], is_sd2: bool) -> tuple[str, str | None]:
    """(A1111's key for the group, the matched layer's type or None), as `load_network` looks it up."""
    key = convert_diffusers_name_to_compvis(layer_part, is_sd2)
    kind = layers.get(key)
    if kind is None:
        x_proj = _X_PROJ.match(key)
        if x_proj:  # grouped under the *_proj name, applied to the MultiheadAttention it names
            kind = layers.get(x_proj[1])
    if kind is None and "lora_unet" in layer_part:
        key = layer_part.replace("lora_unet", UNET_PREFIX)
        kind = layers.get(key)
    elif kind is None and "lora_te1_text_model" in layer_part:
        for target in ("0_transformer_text_model", "transformer_text_model"):
            key = layer_part.replace("lora_te1_text_model", target)
            kind = layers.get(key)
            if kind is not None:
                break
    elif kind is None and "oft_unet" in layer_part:
        key = layer_part.replace("oft_unet", UNET_PREFIX)
        kind = layers.get(key)
    return key, kind


def claim(parts: Iterable[str]) -> tuple[ModuleRule, Accepts] | None:
    """The first module type (in A1111's `module_types` order) accepting a group's network parts."""
    present = set(parts)
    for rule in MODULE_RULES:
        for accepts in rule.accepts:
            if accepts.requires <= present:
                return rule, accepts
    return None


def _build_error(rule: ModuleRule, parts: set[str], kind: str) -> str | None:
    """Why A1111 would raise building this module (failing the whole file), or None."""
    if kind not in PATCHED_TYPES:
        return f"{rule.name} on a {kind}: A1111 reads the layer's weight shape and patches only {sorted(PATCHED_TYPES)}"
    if rule.layer_types is not None and kind not in rule.layer_types:
        return f"{rule.name} on a {kind}: NetworkModuleLora.create_module accepts only Linear, Conv2d, MHA"
    if rule.name == "ia3" and "on_input" not in parts:
        return "ia3 without on_input: NetworkModuleIa3 indexes weights.w['on_input']"
    return None


@dataclass
class Report:
    """What A1111 does with each key of a file.

    matched: key → A1111 layer key. unmatched: keys no layer takes (A1111 drops them silently).
    text_encoder: text-encoder keys whose layer is not in the module list (not a failure here).
    claimed: layer → module type. unclaimed: layer → keys no type accepts (A1111 refuses the file).
    unread: layer → keys of a claimed group the module never reads (ignored silently).
    errors: layer → why building its module raises (A1111 refuses the file)."""
    matched: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    text_encoder: list[str] = field(default_factory=list)
    claimed: dict[str, str] = field(default_factory=dict)
    unclaimed: dict[str, list[str]] = field(default_factory=dict)
    unread: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def loads(self) -> bool:
        """Whether `load_network` returns instead of raising."""
        return not self.unclaimed and not self.errors


def _is_text_encoder(layer_part: str) -> bool:
    return layer_part.startswith(("lora_te", "oft_te", "text_encoder"))


def match(keys: Iterable[str], modules: Mapping[str, str], text_encoders: Mapping[str, str] | None = None) -> Report:
    """Apply A1111's matching and reading rules to a LoRA file's keys.

    `modules`: LDM UNet path (as ComfyUI's `diffusion_model.named_modules()` gives it, e.g.
    "input_blocks.1.1.proj_in") → type name ("Linear", "Conv2d", "GroupNorm", "LayerNorm", ...).
    `text_encoders`: A1111's text-encoder layer names → types (`text_encoder_module_names`), or None."""
    layers = {**compvis_module_names(modules), **(text_encoders or {})}
    is_sd2 = "model_transformer_resblocks" in layers
    report = Report()
    groups: dict[str, dict[str, str]] = {}  # layer → network part → full key
    kinds: dict[str, str] = {}
    for key in keys:
        layer_part, _, part = key.partition(".")
        layer, kind = _lookup(layer_part, layers, is_sd2)
        if kind is None:
            (report.text_encoder if _is_text_encoder(layer_part) else report.unmatched).append(key)
            continue
        report.matched[key] = layer
        groups.setdefault(layer, {})[part] = key
        kinds[layer] = kind
    for layer, parts in groups.items():
        found = claim(parts)
        if found is None:
            report.unclaimed[layer] = sorted(parts.values())
            continue
        rule, accepts = found
        report.claimed[layer] = rule.name
        unread = sorted(full for part, full in parts.items() if part not in accepts.reads)
        if unread:
            report.unread[layer] = unread
        error = _build_error(rule, set(parts), kinds[layer])
        if error:
            report.errors[layer] = error
    return report


def dora_scale_fits(dora_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> bool:
    """Whether A1111 applies a `dora_scale` of this shape as intended.

    network.py `apply_weight_decompose` always divides W + ΔW by its norm per INPUT column, shape
    (1, in, 1, ...), and multiplies by `dora_scale`. A per-output-row magnitude (out, 1, ...) — the
    orientation LyCORIS writes with wd_on_out and ComfyUI/Forge detect by shape — still broadcasts,
    with no error, to a wrong weight."""
    return tuple(dora_shape) == (1, weight_shape[1], *[1] * (len(weight_shape) - 2))
