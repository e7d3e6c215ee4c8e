"""Which layers train (target presets, patterns, switches), the adapter options of TrainConfig and the
node, the metadata naming the algorithm, and every algorithm training the tiny model end to end."""
from __future__ import annotations

import json

import pytest
import torch

from comfyui_lora_trainer.lora import LoraConfig, inject, merge_lora, network_metadata, resolve_state_dict
from comfyui_lora_trainer.lora.targets import TARGETS
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny, encode_images
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.evaluate import heldout_loss
from comfyui_lora_trainer.training.loop import train

FAST = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)


def setup():
    """The tiny eps model, its callables and four 16×16 ramp images (as tests/test_engine.py)."""
    model = build_tiny("eps")
    contexts = encode_captions(["a ramp, lrtstyle"], model.net.config.context_dim)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    images = torch.stack([torch.stack([xx, yy * (i + 1) / 4, 1 - xx], -1) for i in range(4)])
    return model, contexts, tiny_fns(model, contexts), encode_images(images)


def trained(model, **fields) -> dict[str, tuple[str | None, set[str]]]:
    """module path → (algorithm, suffixes) of what a LoraConfig trains on the tiny model (norm and bias
    differences on unless `fields` turn them off)."""
    with inject(model.net, LoraConfig(**{"rank": 4, "train_norms": True, "train_biases": True, **fields})) as net:
        return {p: (w.algorithm, set(w.tensors)) for p, w in net.weights().items()}


def test_presets_on_the_tiny_model():
    model = setup()[0]
    every = trained(model)
    attention = trained(model, target="attention")
    locon = trained(model, target="attention+conv")
    assert "conv_in" in every and "time_embed.0" in every and "blocks.1.layers.2.norm1" in every
    assert set(attention) and all(any(s in p for s in ("attn", "ff.", "proj_in", "proj_out")) for p in attention)
    assert "blocks.1.layers.2.attn2.to_k" in attention and "blocks.1.layers.2.proj_in" in attention
    assert "blocks.0.layers.0.conv1" not in attention and "time_embed.0" not in attention
    assert set(attention) < set(locon) < set(every)
    assert "blocks.0.layers.0.conv1" in locon and "blocks.0.layers.0.emb_proj" not in locon


def test_norm_and_bias_switches():
    model = setup()[0]
    no_norms = trained(model, train_norms=False)
    no_biases = trained(model, train_biases=False)
    assert "blocks.1.layers.2.norm1" in no_norms and no_norms["blocks.1.layers.2.norm1"][1] == {"diff_b"}
    assert no_biases["blocks.1.layers.2.norm1"][1] == {"diff"}
    assert all("diff_b" not in s for _, s in no_biases.values())
    neither = trained(model, train_norms=False, train_biases=False)
    assert all(algo is not None and not s & {"diff", "diff_b"} for algo, s in neither.values())


def test_include_exclude_patterns():
    model = setup()[0]
    only = trained(model, target="attention", include=r"attn2", exclude=r"to_k")
    assert only and all("attn2" in p and "to_k" not in p for p in only)


@pytest.mark.parametrize(("fields", "match"), [
    ({"algorithm": "glora"}, r"algorithm: got 'glora'; choose one of lora, loha, lokr, dora"),
    ({"target": "attn"}, r"target: got 'attn'; choose one of all, attention, attention\+conv"),
    ({"conv_rank": 200}, r"conv_rank: got 200; give a value from 0 to 128"),
    ({"lokr_factor": 0}, r"lokr_factor: got 0; give -1 \(automatic\) or a positive integer"),
    ({"include_layers": "attn("}, r"include_layers: 'attn\(' is not a valid regular expression"),
])
def test_bad_adapter_options(fields, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**fields)


def test_node_has_the_adapter_inputs():
    from comfyui_lora_trainer.nodes.train import TrainLoRA

    opt = TrainLoRA.INPUT_TYPES()["optional"]
    assert opt["algorithm"][0] == ["lora", "loha", "lokr", "dora"] and opt["algorithm"][1]["default"] == "lora"
    assert opt["target"][0] == list(TARGETS) and opt["target"][1]["default"] == "all"
    for name in ("conv_rank", "conv_alpha", "lokr_factor", "include_layers", "exclude_layers", "train_norms",
                 "train_biases"):
        assert opt[name][1]["tooltip"], name


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr", "dora"])
def test_every_algorithm_trains_the_tiny_model(algorithm):
    """Loss falls on held-out noise, the file names the algorithm as kohya/LyCORIS do, and it resumes."""
    model, ctx, fns, latents = setup()
    heldout_before = heldout_loss(fns, latents)
    config = TrainConfig(steps=40, learning_rate=2e-3, batch_size=4, algorithm=algorithm, **FAST)
    result = train(model.net, fns, latents, config)
    weights = resolve_state_dict(result.lora, model.net)
    assert {w.algorithm for w in weights.values()} - {None} == {algorithm}
    with merge_lora(model.net, weights):
        assert heldout_loss(fns, latents) < heldout_before
    meta = network_metadata(result.lora)
    assert result.metadata["ss_network_module"] == meta["ss_network_module"]
    if algorithm == "lora":
        assert meta == {"ss_network_module": "networks.lora"}
    else:
        args = json.loads(meta["ss_network_args"])
        assert meta["ss_network_module"] == "lycoris.kohya"
        assert args["algo"] == {"loha": "loha", "lokr": "lokr", "dora": "locon"}[algorithm]
    # Continuing (with the default algorithm in the config) keeps training the same tensors.
    again = train(model.net, fns, latents, TrainConfig(steps=1, learning_rate=1e-4, **FAST), existing=weights,
                  existing_steps=40)
    assert again.lora.keys() == result.lora.keys() and again.total_steps == 41
    moved = [k for k in result.lora if not torch.equal(again.lora[k], result.lora[k])]
    close = all(torch.allclose(again.lora[k], result.lora[k], atol=1e-2) for k in result.lora)
    assert moved and close  # one small step on, not a restart


def test_conv_rank_in_the_file():
    model, _, fns, latents = setup()
    result = train(model.net, fns, latents, TrainConfig(steps=1, rank=4, conv_rank=2, conv_alpha=1, **FAST))
    assert result.lora["lora_unet_conv_in.lora_down.weight"].shape[0] == 2
    assert result.lora["lora_unet_conv_in.alpha"].item() == 1.0
    assert result.lora["lora_unet_time_embed_0.lora_down.weight"].shape[0] == 4


def test_bench_has_a_row_per_algorithm():
    from comfyui_lora_trainer.bench.cases import Case, all_cases, file_kib, prepared
    from comfyui_lora_trainer.bench.report import ratios

    names = [c.name for c in all_cases(("wide",))]
    assert {"wide/loha/plain", "wide/lokr/plain", "wide/dora/plain"} <= set(names)
    assert not any(n.startswith("default/loha") for n in [c.name for c in all_cases(("default",))])
    for algo in ("loha", "lokr", "dora"):
        with prepared(Case("default", algo, False)) as case:
            assert torch.isfinite(torch.tensor(case.step()))
    assert file_kib(Case("default", "lokr", False)) < file_kib(Case("default", "ours", False))
    row = {"median_s": 1.0, "peak_increase_mib": 1.0}
    rows = {c.name: dict(row) for c in all_cases(("wide",))}
    rows["wide/dora/plain"]["median_s"] = 1.5
    assert ratios(rows, ("wide",))["wide"]["time dora/lora plain"] == 1.5
