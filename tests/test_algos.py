"""The adapter algorithms (lora/algos/): one registry, the same checks for each.

For every algorithm and a Linear, a 3×3 conv and a 1×1 conv: ΔW = 0 at step 0; with non-zero
parameters the training-time forward equals the layer run on W + ΔW (the merged weight, as ComfyUI's
loader builds it) and differs from the base; the file has the key layout ComfyUI's loader reads
(comfy/weight_adapter/); continuing from a file (ours or LyCORIS's layout) resumes it.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comfyui_lora_trainer.lora import (LoraConfig, inject, load_lora_file, merge_lora, resolve_state_dict,
                                       save_lora_file, to_state_dict)
from comfyui_lora_trainer.lora.algos import ALGORITHMS, Dora, detect
from comfyui_lora_trainer.lora.algos.functional import factorization, lokr_delta, lokr_linear

_spec = importlib.util.spec_from_file_location("lora_trainer_lycoris_files", Path(__file__).with_name("lycoris_files.py"))
_files = sys.modules.get(_spec.name) or importlib.util.module_from_spec(_spec)
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = _files
    _spec.loader.exec_module(_files)

ALGOS = ("lora", "loha", "lokr", "dora")

# The keys ComfyUI's loaders read for each algorithm (comfy/weight_adapter/lora.py, loha.py, lokr.py;
# dora_scale in comfy/weight_adapter/base.py weight_decompose), and which must be present.
COMFY_LAYOUTS = {
    "lora": ({"lora_down.weight", "lora_up.weight"}, {"alpha", "lora_mid.weight"}),
    "dora": ({"lora_down.weight", "lora_up.weight", "dora_scale"}, {"alpha"}),
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"alpha", "hada_t1", "hada_t2"}),
    "lokr": (set(), {"alpha", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
}


class One(nn.Module):
    """A single layer under the name `layer`."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


LAYERS = _files.LAYERS  # the same layers as the LyCORIS-form tests


def randomize(net: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("dora_scale"):
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def merged_output(layer: nn.Module, tensors: dict, algo: str, x: torch.Tensor) -> torch.Tensor:
    w = layer.weight.detach()
    delta = ALGORITHMS[algo].delta(tensors, w)
    bias = layer.bias.detach() + tensors["diff_b"] if "diff_b" in tensors else layer.bias
    if isinstance(layer, nn.Linear):
        return F.linear(x, w + delta, bias)
    return layer._conv_forward(x, w + delta, bias)  # the reference: torch's own conv, padding modes included


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("algo", ALGOS)
def test_forward_equals_merged_weight(algo, kind):
    make, shape = LAYERS[kind]
    model = One(make())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    base = model(x)
    with inject(model, LoraConfig(rank=4, alpha=2, algorithm=algo)) as net:
        fresh = model(x)
        torch.testing.assert_close(fresh, base, rtol=1e-5, atol=1e-6)  # ΔW = 0 at step 0
        if algo != "dora":
            assert torch.equal(fresh, base)
        randomize(net)
        out = model(x)
        w = net.weights()["layer"]
        assert w.algorithm == algo
        ref = merged_output(model.layer, dict(w.tensors), algo, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, base, atol=1e-3)


@pytest.mark.parametrize("algo", ALGOS)
def test_every_parameter_gets_a_gradient(algo):
    model = One(nn.Conv2d(8, 12, 3, padding=1))
    with inject(model, LoraConfig(rank=4, algorithm=algo)) as net:
        model(torch.randn(2, 8, 6, 6)).square().mean().backward()
        grads = {n: p.grad for n, p in net.named_parameters()}
    missing = [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    # The factor that starts at zero gets a gradient; its partner does only once it moved (as in LoRA).
    assert len(missing) < len(grads), missing


@pytest.mark.parametrize("algo", ALGOS)
def test_file_layout_is_what_comfyui_reads(algo):
    model = One(nn.Conv2d(8, 12, 3, padding=1))
    with inject(model, LoraConfig(rank=4, algorithm=algo)) as net:
        sd = to_state_dict(net.weights(), torch.bfloat16)
    suffixes = {k.split(".", 1)[1] for k in sd if k.startswith("lora_unet_layer.")}
    required, optional = COMFY_LAYOUTS[algo]
    assert required <= suffixes and suffixes - {"diff_b"} <= required | optional, suffixes
    assert detect(frozenset(suffixes)).NAME == algo
    if algo == "dora":
        assert sd["lora_unet_layer.dora_scale"].shape == (1, 8, 1, 1)  # ComfyUI: not the output axis
    if algo == "lokr":
        assert "lokr_w1" in suffixes and ({"lokr_w2"} <= suffixes or {"lokr_w2_a", "lokr_w2_b"} <= suffixes)


@pytest.mark.parametrize("algo", ALGOS)
def test_continuing_from_a_file_resumes_it(algo, tmp_path):
    model = One(nn.Linear(12, 8))
    x = torch.randn(3, 12)
    with inject(model, LoraConfig(rank=4, alpha=2, algorithm=algo)) as net:
        randomize(net)
        trained = model(x).detach()
        sd = to_state_dict(net.weights(), torch.float32)
    path = save_lora_file(tmp_path / "a_5_steps_.safetensors", sd, {})
    loaded, _ = load_lora_file(path)
    weights = resolve_state_dict(loaded, model)
    assert weights["layer"].algorithm == algo
    # The file's algorithm wins over the config's: a LoRA config continues a LoHa as a LoHa.
    with inject(model, LoraConfig(rank=8, algorithm="lora"), weights=weights) as again:
        assert all(torch.equal(v, sd[k]) for k, v in to_state_dict(again.weights(), torch.float32).items())
        torch.testing.assert_close(model(x), trained)
        params = list(again.parameters())
        optimizer = torch.optim.SGD(params, lr=0.1)
        model(x).square().mean().backward()
        optimizer.step()
        after = to_state_dict(again.weights(), torch.float32)
    changed = [k for k in sd if not torch.equal(after[k], sd[k])]
    assert changed and all(k in sd for k in after)


def test_merge_equals_forward_for_every_algorithm():
    for algo in ALGOS:
        model = One(nn.Conv2d(8, 12, 3, padding=1))
        x = torch.randn(2, 8, 6, 6)
        with inject(model, LoraConfig(rank=4, algorithm=algo)) as net:
            randomize(net)
            out = model(x)
            weights = resolve_state_dict(to_state_dict(net.weights(), torch.float32), model)
        with merge_lora(model, weights):
            torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


def test_lycoris_lokr_layout_with_both_factors_decomposed_resumes():
    """LyCORIS may store w1 as lokr_w1_a @ lokr_w1_b and w2 whole; the scale is then alpha / w1's rank."""
    model = One(nn.Linear(12, 8))
    g = torch.Generator().manual_seed(0)
    sd = {"lora_unet_layer.lokr_w1_a": torch.randn(2, 3, generator=g), "lora_unet_layer.lokr_w1_b": torch.randn(3, 3, generator=g),
          "lora_unet_layer.lokr_w2": torch.randn(4, 4, generator=g), "lora_unet_layer.alpha": torch.tensor(6.0)}
    weights = resolve_state_dict(sd, model)
    delta = ALGORITHMS["lokr"].delta(weights["layer"].tensors, model.layer.weight)
    expected = 2.0 * torch.kron(sd["lora_unet_layer.lokr_w1_a"] @ sd["lora_unet_layer.lokr_w1_b"], sd["lora_unet_layer.lokr_w2"])
    torch.testing.assert_close(delta, expected)
    x = torch.randn(3, 12)
    with inject(model, LoraConfig(algorithm="loha"), weights=weights) as net:
        assert net.weights()["layer"].algorithm == "lokr"
        torch.testing.assert_close(model(x), F.linear(x, model.layer.weight + delta, model.layer.bias))


def test_lokr_linear_matches_kron():
    g = torch.Generator().manual_seed(0)
    w1, w2, x = torch.randn(2, 3, generator=g), torch.randn(4, 5, generator=g), torch.randn(7, 15, generator=g)
    torch.testing.assert_close(lokr_linear(x, w1, w2, 0.5), x @ lokr_delta(w1, w2, 0.5, (8, 15)).T)


@pytest.mark.parametrize(("dim", "factor", "expected"), [(320, -1, (16, 20)), (12, -1, (3, 4)), (320, 8, (8, 40)),
                                                        (7, -1, (1, 7)), (64, 16, (4, 16))])
def test_factorization(dim, factor, expected):
    assert factorization(dim, factor) == expected


def test_dora_magnitude_starts_at_the_weight_norm_and_the_norm_has_no_grad():
    model = One(nn.Linear(12, 8))
    with inject(model, LoraConfig(rank=4, algorithm="dora")) as net:
        algo: Dora = net.adapters["lora_unet_layer"].algo
        torch.testing.assert_close(algo.dora_scale.flatten(), model.layer.weight.norm(dim=0))
        randomize(net)
        algo.input_scale().sum().backward()  # m / ‖W + ΔW‖: the norm is a constant to autograd
        assert algo.dora_scale.grad is not None and algo.lora_up.grad is None and algo.lora_down.grad is None
        model(torch.randn(3, 12)).sum().backward()
        assert algo.lora_up.grad is not None and algo.lora_down.grad is not None


def test_conv_rank_and_alpha():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Linear(8, 8))
    with inject(model, LoraConfig(rank=4, alpha=2, conv_rank=2)) as net:
        conv, linear = (net.adapters[f"lora_unet_{i}"].algo for i in (0, 1))
        assert (conv.rank, conv.alpha, linear.rank, linear.alpha) == (2, 2.0, 4, 2.0)
    with inject(model, LoraConfig(rank=4, alpha=2, conv_rank=2, conv_alpha=1)) as net:
        assert net.adapters["lora_unet_0"].algo.scale == 0.5
    with inject(model, LoraConfig(rank=4, alpha=2)) as net:  # default: as the Linear layers
        assert net.adapters["lora_unet_0"].algo.rank == 4 and net.adapters["lora_unet_0"].algo.alpha == 2.0


@pytest.mark.parametrize(("field", "value", "match"), [
    ("algorithm", "oft", r"algorithm: got 'oft'; choose one of lora, loha, lokr, dora"),
    ("conv_rank", 0, r"conv_rank: got 0"),
    ("conv_alpha", -1.0, r"conv_alpha: got -1.0"),
    ("factor", 0, r"factor: got 0; give -1"),
    ("include", "(", r"include: '\(' is not a valid regular expression"),
])
def test_bad_options(field, value, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**{field: value})


def test_mixed_algorithm_keys_are_refused():
    model = One(nn.Linear(12, 8))
    sd = {"lora_unet_layer.hada_w1_a": torch.zeros(8, 2), "lora_unet_layer.hada_w1_b": torch.zeros(2, 12),
          "lora_unet_layer.hada_w2_a": torch.zeros(8, 2), "lora_unet_layer.hada_w2_b": torch.zeros(2, 12),
          "lora_unet_layer.lokr_w1": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"layer 'layer' mixes two algorithms in one layer: loha "
                                         r"\('lora_unet_layer.hada_w1_a'\) and lokr \('lora_unet_layer.lokr_w1'\)"):
        resolve_state_dict(sd, model)
    lora_and_loha = {**sd, "lora_unet_layer.lora_down.weight": torch.zeros(2, 12),
                     "lora_unet_layer.lora_up.weight": torch.zeros(8, 2)}
    del lora_and_loha["lora_unet_layer.lokr_w1"]
    with pytest.raises(ValueError, match=r"existing_lora 'x': layer 'layer' mixes two algorithms in one layer: loha "
                                         r".* and lora \('lora_unet_layer.lora_down.weight'\).*damaged or two LoRAs"):
        resolve_state_dict(lora_and_loha, model, label="existing_lora 'x'")
    with pytest.raises(ValueError, match=r"'lora_unet_layer.hada_w1_b' does not fit layer 'layer'.*\(2, 11\)"):
        resolve_state_dict({**{k: v for k, v in sd.items() if "lokr" not in k},
                            "lora_unet_layer.hada_w1_b": torch.zeros(2, 11)}, model)
