"""Files every loader reads (docs/files.md): layer naming, portable/full, kohya/ModelSpec metadata, families.

The real loaders (diffusers, A1111's rules, ComfyUI) run in tests/integration/test_loaders.py on an
SD1.x checkpoint; here the mechanism runs on the tiny model.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

from comfyui_lora_trainer.lora import (BaseModel, LoraStateDict, Naming, file_metadata, load_lora_file,
                                       network_metadata, portable, resolve_state_dict, save_lora_file,
                                       to_state_dict)
from comfyui_lora_trainer.lora.metadata import PREFIX, rank_and_alpha
from comfyui_lora_trainer.nodes.families import base_model
from comfyui_lora_trainer.nodes.lora_file import file_contents
from comfyui_lora_trainer.tiny.host import TINY_BASE
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import train

_spec = importlib.util.spec_from_file_location("lora_trainer_test_targets", Path(__file__).with_name("test_targets.py"))
_targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_targets)
FAST, setup = _targets.FAST, _targets.setup  # the tiny eps model and four ramp images

# A stand-in for a shared naming on the tiny model: two layers renamed, the rest keep their paths.
RENAMES = {"blocks.1.layers.2.attn2.to_k": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
           "conv_in": "conv_in_renamed"}


def test_naming_writes_shared_names_and_reads_them_back_bit_exactly(tmp_path):
    model, _, fns, latents = setup()
    base = BaseModel("x", "x", "x", "16x16", naming=Naming("kohya-diffusers", RENAMES))
    result = train(model.net, fns, latents, TrainConfig(steps=2, **FAST), base=base)
    keys = set(result.lora)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert "lora_unet_conv_in_renamed.lora_up.weight" in keys
    assert not any(k.startswith("lora_unet_blocks_1_layers_2_attn2_to_k.") for k in keys)
    assert "lora_unet_blocks_0_layers_0_conv1.lora_down.weight" in keys  # not renamed: its own path
    path = save_lora_file(tmp_path / "x.safetensors", result.lora, file_metadata(result.lora, 2, "full", result.metadata))
    sd, _ = load_lora_file(path)
    weights = resolve_state_dict(sd, model.net, base.naming.aliases())
    again = to_state_dict(weights, torch.float32, base.naming)
    assert set(again) == keys and all(torch.equal(again[k], result.lora[k].float()) for k in keys)


def test_files_in_module_path_naming_still_load():
    """A file written before shared naming (kohya_name of the module path) reads into the same layers."""
    model, _, fns, latents = setup()
    old = train(model.net, fns, latents, TrainConfig(steps=1, **FAST))
    renamed = Naming("kohya-diffusers", RENAMES)
    assert resolve_state_dict(old.lora, model.net, renamed.aliases()).keys() == resolve_state_dict(old.lora, model.net).keys()


def test_training_metadata_as_kohya_and_modelspec_write_it():
    model, _, fns, latents = setup()
    config = TrainConfig(steps=2, rank=4, network_alpha=2.0, learning_rate=1e-3, optimizer="AdamW", seed=5, train_norms=True,
                         train_biases=True, **FAST)
    result = train(model.net, fns, latents, config, base=TINY_BASE)
    meta = file_metadata(result.lora, result.total_steps, "full", result.metadata)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2" and meta["ss_steps"] == "2" and meta["ss_max_train_steps"] == "2"
    assert meta["ss_learning_rate"] == "0.001" and meta["ss_optimizer"] == "torch.optim.AdamW"
    assert meta["ss_seed"] == "5" and meta["ss_mixed_precision"] == "no" and meta["ss_num_train_images"] == "4"
    assert meta["ss_base_model_version"] == TINY_BASE.version and meta["ss_v2"] == "False"
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.architecture"].endswith("/lora")
    assert meta[PREFIX + "naming"] == "module-paths" and meta[PREFIX + "format"] == "full"
    assert json.loads(meta[PREFIX + "settings"]) == config.as_metadata()
    assert 0.0 < float(meta[PREFIX + "difference_share"]) < 1.0


def test_conv_rank_and_lokr_factor_go_into_network_args():
    model, _, fns, latents = setup()
    config = TrainConfig(steps=1, algorithm="lokr", lokr_factor=4, conv_rank=2, conv_alpha=1.0, **FAST)
    meta = train(model.net, fns, latents, config).metadata
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "conv_dim": "2", "conv_alpha": "1", "factor": "4"}


def test_tucker_locon_is_named_as_lycoris_writes_it():
    """kohya's networks.lora cannot read lora_mid; LyCORIS names such a file locon with use_tucker."""
    sd = {"lora_unet_conv.lora_down.weight": torch.ones(2, 4, 1, 1), "lora_unet_conv.lora_up.weight": torch.ones(4, 2, 1, 1),
          "lora_unet_conv.lora_mid.weight": torch.ones(2, 2, 3, 3), "lora_unet_conv.alpha": torch.tensor(2.0)}
    meta = network_metadata(sd)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "locon", "use_tucker": "True"}
    plain = {k: v for k, v in sd.items() if "lora_mid" not in k}
    assert network_metadata(plain) == {"ss_network_module": "networks.lora"}


def test_metadata_from_the_tensors_alone():
    """A plain dict (ComfyUI core's trainer, an old file) still gets network, rank and alpha."""
    model, _, fns, latents = setup()
    sd = dict(train(model.net, fns, latents, TrainConfig(steps=1, rank=4, network_alpha=8.0, **FAST)).lora)
    assert rank_and_alpha(sd) == (4, 8.0)
    meta = file_metadata(sd, None, "portable")
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8" and "ss_steps" not in meta
    with pytest.raises(ValueError, match="format: got 'pt'; choose one of portable, full"):
        file_metadata(sd, None, "pt")


def test_portable_leaves_out_differences_with_their_share(caplog):
    model, _, fns, latents = setup()
    config = TrainConfig(steps=3, learning_rate=5e-3, train_norms=True, train_biases=True, **FAST)
    lora = train(model.net, fns, latents, config).lora
    assert isinstance(lora, LoraStateDict)
    differences = [k for k in lora if k.endswith((".diff", ".diff_b"))]
    assert differences
    with caplog.at_level(logging.WARNING):
        sd, meta = file_contents(lora, 3, "portable")
    assert set(sd) == set(lora) - set(differences)
    share = float(lora.metadata[PREFIX + "difference_share"])
    line = next(r.getMessage() for r in caplog.records if "portable" in r.getMessage())
    assert f"leaves out {len(differences)} weight/bias differences" in line and f"{share:.1%}" in line
    assert meta[PREFIX + "format"] == "portable" and meta[PREFIX + "left_out"] == f"{len(differences)} diff/diff_b tensors"
    caplog.clear()
    full, meta = file_contents(lora, 3, "full")
    assert full.keys() == lora.keys() and meta[PREFIX + "format"] == "full" and not caplog.records


def test_portable_with_nothing_to_leave_out_is_silent(caplog):
    model, _, fns, latents = setup()
    lora = train(model.net, fns, latents, TrainConfig(steps=1, **FAST)).lora  # the defaults train no differences
    assert float(lora.metadata[PREFIX + "difference_share"]) == 0.0
    with caplog.at_level(logging.WARNING):
        sd, meta = file_contents(lora, 1, "portable")
    assert sd.keys() == lora.keys() and not caplog.records and PREFIX + "left_out" not in meta


def test_portable_refuses_a_lora_of_differences_only():
    lora = {"lora_unet_norm.diff": torch.ones(4), "lora_unet_norm.diff_b": torch.ones(4)}
    with pytest.raises(ValueError, match="format: this LoRA holds only weight/bias differences"):
        file_contents(lora, None, "portable")
    assert portable(lora) == ({}, list(lora))


@pytest.mark.parametrize("config_class, model_type, version, architecture, scheme, prediction", [
    ("SD15", "EPS", "sd_v1", "stable-diffusion-v1/lora", "kohya-diffusers", "epsilon"),
    ("SD20", "V_PREDICTION", "sd_v2", "stable-diffusion-v2-768-v/lora", "kohya-diffusers", "v"),
    ("SDXL", "EPS", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "kohya-original", "epsilon"),
    ("Flux", "FLUX", "flux1", "flux-1-dev/lora", "kohya-original", None),
    ("Flux2", "FLUX", "flux2", "Flux2/lora", "module-paths", None),
])
def test_families(config_class, model_type, version, architecture, scheme, prediction):
    diffusers = {"input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in"}
    base = base_model(config_class, model_type, diffusers)
    meta = base.metadata()
    assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == architecture
    assert meta[PREFIX + "naming"] == scheme and meta.get("modelspec.prediction_type") == prediction
    expected = "lora_unet_down_blocks_0_attentions_0_proj_in" if scheme == "kohya-diffusers" \
        else "lora_unet_input_blocks_1_1_proj_in"
    assert base.naming.name("input_blocks.1.1.proj_in") == expected
