"""LyCORIS's forms we continue but never create: Tucker LoCon (`lora_mid`), Tucker LoHa (`hada_t1/t2`),
Tucker LoKr (`lokr_t2`) and DoRA with `dora_scale` per output row (LyCORIS's default) or per input channel.

For each form, from a file-style state dict with non-zero tensors (lycoris_files.py): (a) our `delta`
equals a reference formula written here, one kernel position at a time, as ComfyUI's loader defines
it; (b) the training-time forward equals F.linear / torch's conv on W + ΔW, and differs from the base;
(c) continuing: with no step the export is bit-exact to the file (fp32 and bf16), one optimizer step
lowers the loss and moves every tensor, and the keys and shapes stay the file's.
"""
from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comfyui_lora_trainer.lora import (LoraConfig, inject, load_lora_file, merge_lora, resolve_state_dict,
                                       save_lora_file, to_state_dict)
from comfyui_lora_trainer.lora.algos import ALGORITHMS

_spec = importlib.util.spec_from_file_location("lora_trainer_lycoris_files", Path(__file__).with_name("lycoris_files.py"))
files = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = files
_spec.loader.exec_module(files)

CASES = files.cases() + [(form, "conv3x3_strided_reflect") for form, kinds in files.FORMS.items() if "conv3x3" in kinds]
# Continuing keeps exactly the file's keys: no bias or norm differences are added.
CONTINUE = LoraConfig(rank=8, algorithm="lora", train_biases=False, train_norms=False)


class One(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def positions(kernel: tuple[int, ...]):
    """Index tuples (:, :, k, l) over every kernel position; one (:, :) for a Linear."""
    return [(slice(None), slice(None), *p) for p in itertools.product(*(range(k) for k in kernel))]


def reference_delta(t: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """ΔW (W' − W for DoRA) from the file's tensors, the loader's formulas written out per kernel position."""
    alpha, kernel, delta = float(t["alpha"]), tuple(w.shape[2:]), torch.zeros_like(w)
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"].flatten(1), t["lora_down.weight"]
        rank = down.shape[0]
        for p in positions(kernel):
            core = t["lora_mid.weight"][p] @ down.flatten(1) if "lora_mid.weight" in t else down[p]
            delta[p] = alpha / rank * up @ core
    elif "hada_t1" in t:
        rank = t["hada_w1_b"].shape[0]
        for p in positions(kernel):
            m1 = t["hada_w1_a"].T @ t["hada_t1"][p] @ t["hada_w1_b"]
            m2 = t["hada_w2_a"].T @ t["hada_t2"][p] @ t["hada_w2_b"]
            delta[p] = alpha / rank * m1 * m2
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        rank = t["lokr_w2_b"].shape[0]
        for p in positions(kernel):
            delta[p] = alpha / rank * torch.kron(w1, t["lokr_w2_a"].T @ t["lokr_t2"][p] @ t["lokr_w2_b"])
    if "dora_scale" not in t:
        return delta
    m, merged, eps = t["dora_scale"], w + delta, torch.finfo(torch.float32).eps
    if m.shape[0] == w.shape[0]:  # per output row: ComfyUI divides by the base weight's row norm
        norm = torch.stack([w[o].norm() for o in range(w.shape[0])]).reshape(m.shape)
    else:
        norm = torch.stack([merged[:, i].norm() for i in range(w.shape[1])]).reshape(m.shape)
    return merged * m / (norm + eps) - w


def run_on(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return layer._conv_forward(x, weight, layer.bias)  # torch's own conv, padding modes included


def setup(form: str, kind: str) -> tuple[One, torch.Tensor, dict[str, torch.Tensor]]:
    layer, shape = files.make_layer(kind)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    return One(layer), x, files.state_dict(form, layer)


def layer_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.split(".", 1)[1]: v for k, v in sd.items()}


@pytest.mark.parametrize(("form", "kind"), CASES)
def test_delta_equals_the_reference_formula(form, kind):
    model, _, sd = setup(form, kind)
    weights = resolve_state_dict(sd, model)["layer"]
    assert weights.algorithm == files.ALGORITHM[form]
    assert set(weights.tensors) == set(layer_tensors(sd))  # every key read, lora_mid included
    w = model.layer.weight.detach()
    ours = ALGORITHMS[weights.algorithm].delta(weights.tensors, w)
    ref = reference_delta(layer_tensors(sd), w)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ref.abs().max() > 1e-2


@pytest.mark.parametrize(("form", "kind"), CASES)
def test_training_forward_equals_the_layer_on_the_merged_weight(form, kind):
    model, x, sd = setup(form, kind)
    base = model(x)
    w = model.layer.weight.detach()
    ref = run_on(model.layer, x, w + reference_delta(layer_tensors(sd), w))
    with inject(model, CONTINUE, weights=resolve_state_dict(sd, model)):
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, base, atol=1e-2)
    with merge_lora(model, resolve_state_dict(sd, model)):  # the merge (demo, tests) agrees
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("form", "kind"), files.cases())
def test_continuing_trains_and_keeps_the_layout(form, kind, dtype, tmp_path):
    model, x, sd = setup(form, kind)
    sd = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in sd.items()}
    path = save_lora_file(tmp_path / "lycoris_10_steps_.safetensors", sd, {})
    loaded, _ = load_lora_file(path)
    target = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(3))
    with inject(model, CONTINUE, weights=resolve_state_dict(loaded, model)) as net:
        unchanged = to_state_dict(net.weights(), dtype)
        assert unchanged.keys() == sd.keys()
        assert all(torch.equal(unchanged[k], sd[k]) and unchanged[k].dtype == sd[k].dtype for k in sd), form
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-2)
        before = (model(x) - target).square().mean()
        before.backward()
        optimizer.step()
        after = (model(x) - target).square().mean()
        trained = to_state_dict(net.weights(), torch.float32)
    assert after < before, (form, float(before), float(after))
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in sd.items()}
    unmoved = [k for k in sd if not k.endswith(".alpha") and torch.equal(trained[k], sd[k].float())]
    assert not unmoved, unmoved  # the Tucker cores and the magnitude train too
    assert float(trained["lora_unet_layer.alpha"]) == files.ALPHA


def test_dora_keeps_the_files_orientation():
    for form, need in (("dora_output", (8, 1)), ("dora_input", (1, 12))):
        model, _, sd = setup(form, "linear")
        with inject(model, CONTINUE, weights=resolve_state_dict(sd, model)) as net:
            assert net.adapters["lora_unet_layer"].algo.on_output == (form == "dora_output")
            assert net.weights()["layer"].tensors["dora_scale"].shape == need


@pytest.mark.parametrize(("form", "kind", "edit", "match"), [
    ("locon_tucker", "conv3x3", {"lora_mid.weight": torch.zeros(3, 3)},
     r"'lora_unet_layer.lora_mid.weight' does not fit layer 'layer'.*\(3, 3, 3, 3\)"),
    ("locon_tucker", "conv3x3", {"lora_down.weight": torch.zeros(3, 8, 3, 3)},
     r"'lora_unet_layer.lora_down.weight' does not fit.*\(rank, 8, 1, 1\) with lora_mid"),
    ("loha_tucker", "conv3x3", {"hada_t2": None}, r"LoHa tensors hada_t2 missing"),
    ("loha_tucker", "conv3x3", {"hada_w1_a": torch.zeros(12, 3)}, r"'lora_unet_layer.hada_w1_a' does not fit.*\(12, 12\)"),
    ("lokr_tucker", "conv3x3", {"lokr_t2": torch.zeros(3, 3, 1, 1)}, r"'lora_unet_layer.lokr_t2' does not fit.*\(3, 3, 3, 3\)"),
    ("lokr_tucker", "conv3x3", {"lokr_w2": torch.zeros(4, 4)}, r"lokr_t2 with lokr_w2"),
    ("dora_output", "linear", {"dora_scale": torch.ones(8, 12)},
     r"'lora_unet_layer.dora_scale' does not fit.*\(1, 12\) \(per input channel\) or \(8, 1\) \(per output row\)"),
])
def test_broken_lycoris_files_are_refused_naming_the_key(form, kind, edit, match):
    model, _, sd = setup(form, kind)
    for suffix, tensor in edit.items():
        sd.pop(f"lora_unet_layer.{suffix}", None)
        if tensor is not None:
            sd[f"lora_unet_layer.{suffix}"] = tensor
    with pytest.raises(ValueError, match=match):
        resolve_state_dict(sd, model)


@pytest.mark.parametrize("suffix", ["lora_mid.weight", "hada_t1", "lokr_t2"])
def test_tucker_keys_on_a_linear_layer_are_refused(suffix):
    form = {"lora_mid.weight": "locon_tucker", "hada_t1": "loha_tucker", "lokr_t2": "lokr_tucker"}[suffix]
    model, _, _ = setup("dora_output", "linear")
    conv, _ = files.make_layer("conv1x1")  # 12 → 8 as the Linear: only the kernel dims are wrong
    sd = {k: v.flatten(2) if v.dim() == 4 and not k.endswith(suffix) else v
          for k, v in files.state_dict(form, conv).items()}
    with pytest.raises(ValueError, match=rf"'lora_unet_layer.{suffix}' does not fit.*Tucker form is for conv layers"):
        resolve_state_dict(sd, model)
