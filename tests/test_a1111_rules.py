"""Unit tests of the A1111 key-rule model (tests/a1111_rules.py) on hand-written SD1.x names.

The module list is a few LDM paths of the SD1.x UNet with their torch types, written by hand, not
taken from ComfyUI; the integration tests run the same rules on a real file and the real UNet.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from comfyui_lora_trainer.lora.naming import Naming

_NAME = "lora_trainer_a1111_rules"
_spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).with_name("a1111_rules.py"))
rules = importlib.util.module_from_spec(_spec)
sys.modules[_NAME] = rules  # dataclasses look their module up while the file executes
_spec.loader.exec_module(rules)

SD1_MODULES = {
    "": "UNetModel",
    "time_embed.0": "Linear",
    "input_blocks.0.0": "Conv2d",
    "input_blocks.1.0.in_layers.0": "GroupNorm",
    "input_blocks.1.0.in_layers.2": "Conv2d",
    "input_blocks.1.0.emb_layers.1": "Linear",
    "input_blocks.1.1": "SpatialTransformer",
    "input_blocks.1.1.norm": "GroupNorm",
    "input_blocks.1.1.proj_in": "Conv2d",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "Linear",
    "input_blocks.1.1.transformer_blocks.0.norm1": "LayerNorm",
    "input_blocks.3.0.op": "Conv2d",
    "middle_block.1.proj_out": "Conv2d",
    "middle_block.2.out_layers.3": "Conv2d",
    "output_blocks.2.1.conv": "Conv2d",
    "output_blocks.5.2.conv": "Conv2d",
    "out.2": "Conv2d",
}
LORA = ("lora_down.weight", "lora_up.weight", "alpha")


def keys(layer: str, *parts: str) -> list[str]:
    return [f"{layer}.{part}" for part in parts]


def test_module_names_carry_the_diffusion_model_prefix_and_types():
    names = rules.compvis_module_names(SD1_MODULES)
    assert names["diffusion_model_input_blocks_1_1_proj_in"] == "Conv2d"
    assert names["diffusion_model"] == "UNetModel"


@pytest.mark.parametrize("diffusers, compvis", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "input_blocks_1_1_proj_in"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "input_blocks_1_1_transformer_blocks_0_attn1_to_q"),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "input_blocks_1_0_in_layers_2"),
    ("lora_unet_down_blocks_0_resnets_0_norm1", "input_blocks_1_0_in_layers_0"),
    ("lora_unet_down_blocks_0_resnets_0_time_emb_proj", "input_blocks_1_0_emb_layers_1"),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", "input_blocks_3_0_op"),
    ("lora_unet_mid_block_attentions_0_proj_out", "middle_block_1_proj_out"),
    ("lora_unet_mid_block_resnets_1_conv2", "middle_block_2_out_layers_3"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "output_blocks_2_1_conv"),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", "output_blocks_5_2_conv"),
    ("lora_unet_conv_in", "input_blocks_0_0"),
    ("lora_unet_conv_out", "out_2"),
    ("lora_unet_time_embedding_linear_1", "time_embed_0"),
])
def test_diffusers_names_convert_to_compvis(diffusers, compvis):
    assert rules.convert_diffusers_name_to_compvis(diffusers, False) == "diffusion_model_" + compvis


def test_text_encoder_names_convert_per_model():
    te = "lora_te_text_model_encoder_layers_3_mlp_fc1"
    assert rules.convert_diffusers_name_to_compvis(te, False) == "transformer_text_model_encoder_layers_3_mlp_fc1"
    assert rules.convert_diffusers_name_to_compvis(te, True) == "model_transformer_resblocks_3_mlp_c_fc"


def test_unknown_names_are_returned_unchanged():
    assert rules.convert_diffusers_name_to_compvis("lora_unet_input_blocks_1_1_proj_in", False) == \
        "lora_unet_input_blocks_1_1_proj_in"


def test_diffusers_named_kohya_key_matches_its_ldm_layer():
    report = rules.match(keys("lora_unet_down_blocks_0_attentions_0_proj_in", *LORA), SD1_MODULES)
    layer = "diffusion_model_input_blocks_1_1_proj_in"
    assert set(report.matched.values()) == {layer}
    assert report.claimed == {layer: "lora"}
    assert not report.unmatched and not report.unread and report.loads


def test_ldm_named_key_matches_through_the_lora_unet_fallback():
    report = rules.match(keys("lora_unet_input_blocks_1_1_proj_in", *LORA), SD1_MODULES)
    assert report.claimed == {"diffusion_model_input_blocks_1_1_proj_in": "lora"}
    assert not report.unmatched and report.loads


def test_diff_b_on_a_lora_layer_is_matched_but_not_read():
    layer_keys = keys("lora_unet_input_blocks_1_1_proj_in", *LORA, "diff_b")
    report = rules.match(layer_keys, SD1_MODULES)
    assert report.unread == {"diffusion_model_input_blocks_1_1_proj_in": [layer_keys[-1]]}
    assert report.loads


def test_norm_layer_with_diff_and_diff_b_is_read_by_full():
    report = rules.match(keys("lora_unet_input_blocks_1_1_norm", "diff", "diff_b"), SD1_MODULES)
    assert report.claimed == {"diffusion_model_input_blocks_1_1_norm": "full"}
    assert not report.unread and report.loads


def test_w_norm_and_b_norm_are_claimed_by_norm():
    report = rules.match(keys("lora_unet_input_blocks_1_1_transformer_blocks_0_norm1", "w_norm", "b_norm"),
                         SD1_MODULES)
    assert report.claimed == {"diffusion_model_input_blocks_1_1_transformer_blocks_0_norm1": "norm"}


def test_lora_on_a_norm_layer_makes_a1111_refuse_the_file():
    report = rules.match(keys("lora_unet_input_blocks_1_0_in_layers_0", *LORA), SD1_MODULES)
    assert report.claimed == {"diffusion_model_input_blocks_1_0_in_layers_0": "lora"}
    assert "GroupNorm" in report.errors["diffusion_model_input_blocks_1_0_in_layers_0"]
    assert not report.loads


@pytest.mark.parametrize("parts, kind", [
    (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"), "hada"),
    (("lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"), "lokr"),
    (("lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_t2"), "lokr"),
    (("lokr_w1", "lokr_w2"), "lokr"),
])
def test_loha_and_lokr_keys_are_claimed_and_read(parts, kind):
    report = rules.match(keys("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", *parts), SD1_MODULES)
    assert report.claimed == {"diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q": kind}
    assert not report.unread and report.loads


def test_dora_scale_is_read_by_every_module_type():
    for parts in (LORA, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), ("lokr_w1", "lokr_w2")):
        report = rules.match(keys("lora_unet_input_blocks_1_1_proj_in", *parts, "dora_scale"), SD1_MODULES)
        assert not report.unread, parts


def test_peft_named_groups_lose_alpha_and_dora_scale():
    layer_keys = keys("lora_unet_input_blocks_1_1_proj_in", "lora_A.weight", "lora_B.weight", "alpha", "dora_scale")
    report = rules.match(layer_keys, SD1_MODULES)
    assert report.claimed == {"diffusion_model_input_blocks_1_1_proj_in": "lora"}
    assert report.unread == {"diffusion_model_input_blocks_1_1_proj_in": sorted(layer_keys[2:])}


def test_lora_takes_a_group_before_full_so_its_diff_is_unread():
    layer_keys = keys("lora_unet_input_blocks_1_1_proj_in", *LORA, "diff")
    report = rules.match(layer_keys, SD1_MODULES)
    assert report.claimed == {"diffusion_model_input_blocks_1_1_proj_in": "lora"}
    assert report.unread == {"diffusion_model_input_blocks_1_1_proj_in": [layer_keys[-1]]}


def test_a_key_of_an_unknown_module_fails_to_match():
    unknown = keys("lora_unet_input_blocks_9_9_proj_in", *LORA)
    report = rules.match(unknown + keys("lora_unet_input_blocks_1_1_proj_in", *LORA), SD1_MODULES)
    assert report.unmatched == unknown
    assert list(report.claimed) == ["diffusion_model_input_blocks_1_1_proj_in"]


def test_a_group_no_module_type_accepts_is_unclaimed():
    layer_keys = keys("lora_unet_input_blocks_1_1_proj_in", "lora_down.weight", "alpha")
    report = rules.match(layer_keys, SD1_MODULES)
    assert report.unclaimed == {"diffusion_model_input_blocks_1_1_proj_in": sorted(layer_keys)}
    assert not report.loads


def test_dotted_keys_split_at_the_first_dot_land_on_the_whole_unet():
    layer_keys = ["diffusion_model.input_blocks.1.1.proj_in.lora_up.weight",
                  "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight"]
    report = rules.match(layer_keys, SD1_MODULES)
    assert report.unclaimed == {"diffusion_model": sorted(layer_keys)}


def test_text_encoder_keys_are_set_aside_when_no_text_encoder_is_listed():
    te = keys("lora_te_text_model_encoder_layers_0_self_attn_q_proj", *LORA)
    report = rules.match(te, SD1_MODULES)
    assert report.text_encoder == te
    assert not report.unmatched and report.loads


def test_dora_scale_fits_only_per_input_column():
    assert rules.dora_scale_fits((1, 320), (640, 320))
    assert rules.dora_scale_fits((1, 320, 1, 1), (640, 320, 3, 3))
    assert not rules.dora_scale_fits((640, 1), (640, 320))


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1", "sdxl"])
def test_our_text_encoder_keys_match_and_are_read(sdxl):
    """Every text-encoder key our naming writes (lora/naming.py, on CLIP's module paths) lands on its A1111
    layer and is read: SD1.x's `lora_te_` on the HF CLIP, SDXL's `lora_te1_` on CLIP-L and `lora_te2_` on
    OpenCLIP's bigG (q/k/v on its MultiheadAttention, out_proj and the MLP as c_fc / c_proj)."""
    naming = Naming().with_text_encoders(2 if sdxl else 1)
    modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    parts = ("text_encoder.", "text_encoder_2.") if sdxl else ("text_encoder.",)
    layer_keys = [f"{naming.name(f'{part}text_model.encoder.layers.{i}.{m}')}.{suffix}"
                  for part in parts for i in range(2) for m in modules for suffix in LORA]
    report = rules.match(layer_keys, SD1_MODULES, rules.text_encoder_module_names(2, sdxl))
    assert report.loads and not report.unmatched and not report.text_encoder and not report.unread, report
    assert set(report.matched) == set(layer_keys) and set(report.claimed.values()) == {"lora"}
    if sdxl:
        assert report.matched["lora_te2_text_model_encoder_layers_1_mlp_fc2.alpha"] == \
            "1_model_transformer_resblocks_1_mlp_c_proj"
