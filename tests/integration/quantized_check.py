"""Run with ComfyUI's Python: our adapters on ComfyUI's own fp8 and quantized op classes, on the CPU.

    python quantized_check.py COMFYUI_DIR PACK_ROOT

Two kinds of layer, each in a small model (Linear → SiLU → Linear; the fp8 one with a Conv2d and a
GroupNorm in front), trained for 40 Adam steps on a fixed regression with each algorithm:
- `comfy.ops.mixed_precision_ops` Linear loaded from a state dict with a `comfy_quant` entry
  (float8_e4m3fn with a tensor scale, int8_tensorwise): an nn.Module (no nn.Linear) whose weight is a
  comfy_kitchen QuantizedTensor, dequantized inside its forward;
- `comfy.ops.manual_cast` layers with fp8 weights (what UNETLoader's weight_dtype fp8 builds):
  plain fp8 tensors cast to the input's dtype inside forward.
Prints one JSON line: {case: {"first", "last" (losses), "adapters", "unchanged" (the layers'
state_dict bytes), "weight_type", "error" (the ValueError's text, or null)}}.
"""
from __future__ import annotations

import importlib.util
import json
import sys

comfy_dir, root = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI's device choice: parse its own flags, CPU only

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import comfy.ops  # noqa: E402

spec = importlib.util.spec_from_file_location("comfyui_lora_trainer", root + "/__init__.py",
                                              submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec)
sys.modules["comfyui_lora_trainer"] = pack
spec.loader.exec_module(pack)
from comfyui_lora_trainer.lora import LoraConfig, inject  # noqa: E402


def quant_entry(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def quantized_linear(fmt: str, inp: int, out: int, gen: torch.Generator) -> nn.Module:
    """mixed_precision_ops' Linear holding a random weight quantized as `fmt` (tensor-wise scale)."""
    layer = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.float32).Linear(inp, out, device="cpu")
    w = torch.randn(out, inp, generator=gen) / inp ** 0.5
    if fmt == "float8_e4m3fn":
        scale = w.abs().max() / 448
        codes = (w / scale).to(torch.float8_e4m3fn)
    else:
        scale = w.abs().max() / 127
        codes = (w / scale).round().to(torch.int8)
    layer.load_state_dict({"weight": codes, "weight_scale": scale.reshape(()), "bias": torch.zeros(out),
                           "comfy_quant": quant_entry(fmt)}, strict=False)
    return layer


def quantized_model(fmt: str) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    return nn.Sequential(quantized_linear(fmt, 8, 32, gen), nn.SiLU(), quantized_linear(fmt, 32, 4, gen))


class Fp8Model(nn.Module):
    """manual_cast layers stored in fp8: Conv2d → GroupNorm → SiLU → flatten → Linear."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        torch.manual_seed(0)
        ops = comfy.ops.manual_cast
        self.conv = ops.Conv2d(2, 8, 3, padding=1, dtype=dtype)
        self.norm = ops.GroupNorm(4, 8, dtype=dtype)
        self.head = ops.Linear(8 * 4 * 4, 4, dtype=dtype)
        for module in (self.conv, self.norm, self.head):  # ComfyUI's disable_weight_init leaves them empty
            for name, param in module.named_parameters():
                values = torch.randn(param.shape) * (0.2 if name == "weight" and module is not self.norm else 0.05)
                if module is self.norm and name == "weight":
                    values = values + 1
                param.data = values.to(dtype)

    def forward(self, x):
        return self.head(F.silu(self.norm(self.conv(x))).flatten(1))


def state_bytes(model: nn.Module) -> dict[str, bytes]:
    """The layers' state_dict as bytes: ComfyUI's quantized Linear writes its QuantizedTensor out as the
    stored codes, scale and comfy_quant entry (plain tensors)."""
    return {k: v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() for k, v in model.state_dict().items()}


def train(model: nn.Module, x: torch.Tensor, target: torch.Tensor, config: LoraConfig) -> dict:
    before = state_bytes(model)
    weight_type = type(next(m for m in model.modules() if "weight" in m._parameters).weight).__name__
    try:
        network = inject(model, config, seed=0, device="cpu")
    except ValueError as err:
        return {"error": str(err), "weight_type": weight_type, "unchanged": state_bytes(model) == before}
    losses = []
    with network:
        opt = torch.optim.Adam(network.parameters(), lr=1e-2)
        for _ in range(40):
            loss = F.mse_loss(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        adapters = len(network.adapters)
    return {"first": losses[0], "last": losses[-1], "adapters": adapters, "unchanged": state_bytes(model) == before,
            "weight_type": weight_type, "error": None}


def main() -> None:
    gen = torch.Generator().manual_seed(1)
    results = {}
    x, target = torch.randn(64, 8, generator=gen), torch.randn(64, 4, generator=gen)
    for fmt in ("float8_e4m3fn", "int8_tensorwise"):
        for algorithm in ("lora", "loha", "lokr", "dora"):
            results[f"quantized-{fmt}-{algorithm}"] = train(quantized_model(fmt), x, target,
                                                            LoraConfig(rank=4, algorithm=algorithm, train_biases=True))
    images = torch.randn(16, 2, 4, 4, generator=gen)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        for algorithm in ("lora", "dora"):
            name = f"manual_cast-{str(dtype).split('.')[-1]}-{algorithm}"
            results[name] = train(Fp8Model(dtype), images, target[:16],
                                  LoraConfig(rank=4, algorithm=algorithm, train_norms=True, train_biases=True))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
