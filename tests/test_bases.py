"""The bases users have, offline: offloaded (weights not where the layer computes), fp8, bf16/fp16 and
quantized-like layers, on the tiny model.

ComfyUI's layers (comfy/ops.py) cast their weight inside forward (`cast_bias_weight`): under low-VRAM
loading the weight rests on the offload device, in its storage dtype (fp8, bf16), and is cast onto the
input's device and dtype per call. `cast_layers` (bench/bases.py) turns the tiny model's Linear/Conv2d/
GroupNorm/LayerNorm into such layers. With `offload=True` the Linear/Conv weights rest on the "meta" device (their
values kept aside, as on an offload device this machine does not have): any code that read
`module.weight` for a device, a dtype or values would put adapters on meta or fail, so training that
runs, and equals training on the plain model, shows that nothing does.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comfyui_lora_trainer.bench.bases import OFFLOADED, cast_layers
from comfyui_lora_trainer.lora import inject
from comfyui_lora_trainer.lora.injection import LoraConfig, adapter_device, is_injected
from comfyui_lora_trainer.lora.layers import base_weight, layer_shape
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny, encode_images
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import train

FAST = dict(lora_dtype="fp32", gradient_checkpointing=False)


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every stored base tensor's bytes (fp8 has no torch.equal on the CPU), the aside values too;
    meta tensors as their dtype and shape."""
    out = {}
    for name, module in net.named_modules():
        tensors = {**{k: v for k, v in module._parameters.items() if v is not None},
                   **{f"aside.{k}": v for k, v in getattr(module, "aside", {}).items()}}
        for k, v in tensors.items():
            out[f"{name}.{k}"] = (v.dtype, v.shape) if v.device.type == "meta" else v.detach().view(torch.uint8).clone()
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (x == y) if isinstance(x, tuple) else torch.equal(x, y) for x, y in ((a[k], b[k]) for k in a))


def setup(n: int = 4, size: int = 8):
    model = build_tiny("eps")
    contexts = encode_captions(["a ramp, lrtstyle"], model.net.config.context_dim)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = torch.stack([torch.stack([xx, yy * (i + 1) / n, 1 - xx], -1) for i in range(n)])
    return model, tiny_fns(model, contexts), encode_images(images)


def falls(losses: list[float]) -> bool:
    return sum(losses[-4:]) < sum(losses[:4])


def run(model, fns, latents, steps=24, **settings):
    config = TrainConfig(steps=steps, batch_size=4, learning_rate=3e-3, **{"training_dtype": "fp32", **FAST, **settings})
    return train(model.net, fns, latents, config)


# --- the device choice ------------------------------------------------------------------------------

def test_adapter_device_is_the_given_compute_device_never_the_weights():
    model, _, _ = setup()
    cast_layers(model.net, torch.float8_e4m3fn, offload=True)
    assert adapter_device(model.net, "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device: not given.*cpu, meta.*give the device the layers compute on"):
        adapter_device(model.net, None)
    with inject(model.net, LoraConfig(rank=4, algorithm="loha"), device="cpu") as network:
        assert {p.device for p in network.parameters()} == {torch.device("cpu")}
        assert {p.dtype for p in network.parameters()} == {torch.float32}  # fp32 masters, not the weight's fp8
        assert len(network.adapters) > 0


def test_device_defaults_to_the_one_device_a_plain_model_rests_on():
    model, _, _ = setup()
    assert adapter_device(model.net, None) == torch.device("cpu")


def test_offloaded_weights_train_exactly_as_resident_ones():
    """Linear/Conv weights on meta (values aside), cast in forward: the LoRA equals the plain model's
    bit for bit, the loss falls, and the base (meta and aside values) is unchanged."""
    plain, fns, latents = setup()
    expected = run(plain, fns, latents, train_biases=True)
    model, fns, latents = setup()
    cast_layers(model.net, torch.float32, offload=True)
    before = snapshot(model.net)
    result = run(model, fns, latents, train_biases=True)
    assert result.lora.keys() == expected.lora.keys()
    assert all(torch.equal(result.lora[k], expected.lora[k]) for k in expected.lora)
    assert falls(result.losses) and same(snapshot(model.net), before)
    assert any(k.endswith(".diff_b") for k in result.lora)  # bias differences ride in the adapter, no weight read


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr"])
def test_offloaded_fp8_weights_train_each_forward_path_algorithm(algorithm):
    model, fns, latents = setup()
    cast_layers(model.net, torch.float8_e4m3fn, offload=True)
    before = snapshot(model.net)
    result = run(model, fns, latents, algorithm=algorithm, train_norms=True)  # norms are resident: diffs read them
    assert falls(result.losses), result.losses
    assert same(snapshot(model.net), before)
    assert any(k.endswith(".diff") for k in result.lora)


def test_dora_on_an_offloaded_weight_names_the_layer():
    model, _, _ = setup()
    cast_layers(model.net, torch.float32, offload=True)
    first = next(n for n, m in model.net.named_modules() if isinstance(m, OFFLOADED))
    with pytest.raises(ValueError, match=rf"layer {first}: its weight is on the meta device.*DoRA"):
        inject(model.net, LoraConfig(rank=4, algorithm="dora"), device="cpu")
    assert not any(is_injected(m) for m in model.net.modules())  # refused before anything was patched


def test_a_weight_difference_on_an_offloaded_norm_names_the_layer():
    model, _, _ = setup()
    cast_layers(model.net, torch.float32, offload=True)
    norm = next(n for n, m in model.net.named_modules() if isinstance(m, nn.GroupNorm))
    model.net.get_submodule(norm).__dict__["aside"] = {}
    for part in ("weight", "bias"):  # this norm offloaded too
        param = getattr(model.net.get_submodule(norm), part)
        model.net.get_submodule(norm).aside[part] = param.detach()
        model.net.get_submodule(norm)._parameters[part] = nn.Parameter(param.to("meta"), requires_grad=False)
    with pytest.raises(ValueError, match=rf"layer {norm}: its weight is on the meta device.*load the model's weights"):
        inject(model.net, LoraConfig(rank=4, train_norms=True), device="cpu")
    with inject(model.net, LoraConfig(rank=4, train_norms=False, train_biases=False), device="cpu") as network:
        assert network.adapters  # without the difference the layer needs nothing


# --- fp8, bf16 and fp16 bases (stored so, cast in forward as ComfyUI's manual_cast ops do) --------

@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("algorithm", ["lora", "dora"])
def test_fp8_base_trains_and_stays_bit_identical(dtype, algorithm):
    """DoRA reads the fp8 weight's values for its norm, cast to fp32 as the layer's cast does; norms are
    fp8 too and train weight differences (fp8 + fp32 difference, in the compute dtype)."""
    model, fns, latents = setup()
    cast_layers(model.net, dtype)
    before = snapshot(model.net)
    result = run(model, fns, latents, algorithm=algorithm, train_norms=True, train_biases=True)
    assert falls(result.losses), result.losses
    assert same(snapshot(model.net), before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training_dtype", ["bf16", "fp32"])
def test_half_precision_base_trains_with_either_training_dtype(dtype, training_dtype):
    model, fns, latents = setup()
    cast_layers(model.net, dtype)
    before = snapshot(model.net)
    result = run(model, fns, latents, training_dtype=training_dtype, algorithm="dora", train_norms=True)
    assert falls(result.losses), result.losses
    assert same(snapshot(model.net), before)


def test_plain_bf16_model_trains_under_bf16_autocast():
    """A model whose layers are plain torch ones, converted to bf16 (no cast in forward)."""
    model, fns, latents = setup()
    model.net.to(torch.bfloat16)
    before = snapshot(model.net)
    result = run(model, fns, latents, training_dtype="bf16", train_norms=True)
    assert falls(result.losses), result.losses
    assert same(snapshot(model.net), before)


# --- quantized-like layers: not an nn.Linear, the weight a tensor subclass --------------------------

class Packed(torch.Tensor):
    """A weight whose storage is not its values (as ComfyUI's QuantizedTensor or GGUF's GGMLTensor)."""


class PackedLinear(nn.Module):
    """ComfyUI's mixed_precision_ops Linear in miniature: an nn.Module with in/out_features and a weight
    it dequantizes itself (values = int8 storage · scale)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().max() / 127
        codes = (linear.weight.detach() / scale).round().to(torch.int8)
        self.weight = nn.Parameter(codes.as_subclass(Packed), requires_grad=False)
        self.scale = scale
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight.as_subclass(torch.Tensor).to(x.dtype) * self.scale.to(x.dtype),
                        self.bias.to(x.dtype))


def packed_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(PackedLinear(nn.Linear(6, 16)), nn.SiLU(), PackedLinear(nn.Linear(16, 3)))


def test_quantized_like_linear_gets_an_adapter_and_trains_without_its_weight_read():
    model = packed_model()
    assert layer_shape(model[0]) is not None and layer_shape(model[0]).weight_shape == (16, 6)
    before = {k: v.as_subclass(torch.Tensor).clone() for k, v in model.state_dict().items()}
    x, target = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), torch.randn(32, 3)
    with inject(model, LoraConfig(rank=2, algorithm="lokr", train_biases=True), device="cpu") as network:
        assert set(network.paths.values()) == {"0", "2"} and all(a.algo is not None for a in network.adapters.values())
        opt = torch.optim.Adam(network.parameters(), lr=1e-2)
        losses = []
        for _ in range(30):
            loss = F.mse_loss(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(v.as_subclass(torch.Tensor), before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("algorithm,train_norms", [("dora", False), ("lora", True)])
def test_reading_a_quantized_weight_is_refused_naming_the_layer(algorithm, train_norms):
    model = nn.Sequential(packed_model(), nn.LayerNorm(3))
    model[1].weight = nn.Parameter(model[1].weight.detach().as_subclass(Packed), requires_grad=False)
    layer = "0.0" if algorithm == "dora" else "1"
    with pytest.raises(ValueError, match=rf"layer {layer}: its weight is a Packed \(quantized\).*turn train_norms off"):
        inject(model, LoraConfig(rank=2, algorithm=algorithm, train_norms=train_norms, train_biases=False),
               device="cpu")


def test_base_weight_casts_fp8_to_the_compute_device_and_dtype():
    layer = nn.Linear(4, 3)
    values = layer.weight.detach().clone()
    layer.weight = nn.Parameter(values.to(torch.float8_e4m3fn), requires_grad=False)
    got = base_weight("x", layer, torch.device("cpu"), torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, values.to(torch.float8_e4m3fn).float())
