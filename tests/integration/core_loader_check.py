"""Run with ComfyUI's Python: our training-time forward against ComfyUI core's LoRA loader.

    python core_loader_check.py COMFYUI_DIR PACK_ROOT

For each algorithm and a Linear, a 3×3 conv and a 1×1 conv: inject with non-zero parameters, take
the training-time output on a fixed input, export the file's state dict, load it with
`comfy.lora.load_lora`, merge with `comfy.lora.calculate_weight` and run the layer on the merged
weight. Prints one JSON line: {case: {"max_abs": ..., "base_abs": ..., "not_loaded": [...]}}.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import sys

comfy_dir, root = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI's device choice: parse its own flags, CPU only

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import torch  # noqa: E402
from torch import nn  # noqa: E402

import comfy.lora  # noqa: E402

spec = importlib.util.spec_from_file_location("comfyui_lora_trainer", root + "/__init__.py",
                                              submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec)
sys.modules["comfyui_lora_trainer"] = pack
spec.loader.exec_module(pack)
from comfyui_lora_trainer.lora import LoraConfig, inject, to_state_dict  # noqa: E402

LAYERS = {
    "linear": (lambda: nn.Linear(12, 8), (3, 12)),
    "conv3x3": (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 6, 6)),
    "conv1x1": (lambda: nn.Conv2d(12, 8, 1), (2, 12, 5, 5)),
}


class Missing(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "lora key not loaded" in record.getMessage():
            self.lines.append(record.getMessage())


def check(algo: str, kind: str, missing: Missing) -> dict:
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("layer", make())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    base = model(x).detach()
    g = torch.Generator().manual_seed(1)
    with inject(model, LoraConfig(rank=4, alpha=2, algorithm=algo)) as net:
        with torch.no_grad():
            for name, p in net.named_parameters():
                scale = 1 + 0.2 * torch.rand(p.shape, generator=g)
                p.copy_(p * scale if name.endswith("dora_scale") else torch.randn(p.shape, generator=g) * 0.3)
            ours = model(x)
        sd = to_state_dict(net.weights(), torch.float32)
    missing.lines.clear()
    patches = comfy.lora.load_lora(sd, {"lora_unet_layer": "layer.weight"})
    layer = model.layer
    weight = comfy.lora.calculate_weight([(1.0, patches["layer.weight"], 1.0, None, None)],
                                         layer.weight.detach().clone(), "layer.weight")
    bias = layer.bias.detach().clone()
    if "layer.bias" in patches:
        bias = comfy.lora.calculate_weight([(1.0, patches["layer.bias"], 1.0, None, None)], bias, "layer.bias")
    with torch.no_grad():
        core = nn.functional.linear(x, weight, bias) if kind == "linear" else layer._conv_forward(x, weight, bias)
    return {"max_abs": float((ours - core).abs().max()), "base_abs": float((ours - base).abs().max()),
            "not_loaded": list(missing.lines)}


def main() -> None:
    missing = Missing()
    logging.getLogger().addHandler(missing)
    logging.getLogger().setLevel(logging.INFO)
    results = {f"{a}-{k}": check(a, k, missing) for a in ("lora", "loha", "lokr", "dora") for k in LAYERS}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
