"""Run with ComfyUI's Python: our training-time forward against ComfyUI core's LoRA loader.

    python core_loader_check.py COMFYUI_DIR PACK_ROOT

For each algorithm and a Linear, a 3×3 conv and a 1×1 conv: inject with non-zero parameters, take
the training-time output on a fixed input, export the file's state dict, load it with
`comfy.lora.load_lora`, merge with `comfy.lora.calculate_weight` and run the layer on the merged
weight. Then the same for the LyCORIS forms we only continue (tests/lycoris_files.py: Tucker LoCon,
LoHa and LoKr, DoRA per output row and per input channel), each injected from its file as continuing
training does; the file given to ComfyUI is our export. Prints one JSON line:
{case: {"max_abs": ..., "base_abs": ..., "not_loaded": [...], "core_error": [...]}}.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import sys
from contextlib import contextmanager

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
from comfyui_lora_trainer.lora import LoraConfig, inject, resolve_state_dict, to_state_dict  # noqa: E402

spec = importlib.util.spec_from_file_location("lycoris_files", root + "/tests/lycoris_files.py")
lycoris_files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lycoris_files)

LAYERS = {
    "linear": (lambda: nn.Linear(12, 8), (3, 12)),
    "conv3x3": (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 6, 6)),
    "conv1x1": (lambda: nn.Conv2d(12, 8, 1), (2, 12, 5, 5)),
}


class Missing(logging.Handler):
    """Collects core's "lora key not loaded" lines and the errors its calculate_weight logs (and skips)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "lora key not loaded" in record.getMessage():
            self.lines.append(record.getMessage())
        elif record.getMessage().startswith("ERROR "):
            self.errors.append(record.getMessage())


# Core's Tucker LoKr (comfy/weight_adapter/lokr.py) hands torch.kron the non-contiguous result of its
# einsum, which this torch refuses ("view size is not compatible ..."): calculate_weight logs the error
# and leaves the weight unpatched. To still compare core's formula with ours, such a case is run again
# with torch.kron given contiguous inputs, and the error is reported as "core_error".
KRON_BUG = "view size is not compatible"


@contextmanager
def contiguous_kron():
    kron = torch.kron
    torch.kron = lambda a, b: kron(a.contiguous(), b.contiguous())
    try:
        yield
    finally:
        torch.kron = kron


def check(algo: str, kind: str, missing: Missing) -> dict:
    """One of our algorithms, created and given non-zero parameters."""
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
    return compare(model, x, ours, base, sd, missing)


def check_lycoris(form: str, kind: str, missing: Missing) -> dict:
    """A LyCORIS-layout file, continued: loaded into the training path, its forward against core's."""
    layer, shape = lycoris_files.make_layer(kind)
    model = nn.Sequential()
    model.add_module("layer", layer)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    base = model(x).detach()
    weights = resolve_state_dict(lycoris_files.state_dict(form, layer), model)
    with inject(model, LoraConfig(train_biases=False, train_norms=False), weights=weights) as net:
        with torch.no_grad():
            ours = model(x)
        sd = to_state_dict(net.weights(), torch.float32)
    return compare(model, x, ours, base, sd, missing)


def compare(model: nn.Module, x: torch.Tensor, ours: torch.Tensor, base: torch.Tensor, sd: dict,
            missing: Missing) -> dict:
    """Core's loader on `sd` (every key must load), the layer run on its merged weight, against `ours`."""
    missing.lines.clear()
    missing.errors.clear()
    core = core_output(model, x, sd)
    core_error = list(missing.errors)
    if any(KRON_BUG in e for e in core_error):
        with contiguous_kron():
            core = core_output(model, x, sd)
    return {"max_abs": float((ours - core).abs().max()), "base_abs": float((ours - base).abs().max()),
            "not_loaded": list(missing.lines), "core_error": core_error}


def core_output(model: nn.Module, x: torch.Tensor, sd: dict) -> torch.Tensor:
    patches = comfy.lora.load_lora(sd, {"lora_unet_layer": "layer.weight"})
    layer = model.layer
    weight = comfy.lora.calculate_weight([(1.0, patches["layer.weight"], 1.0, None, None)],
                                         layer.weight.detach().clone(), "layer.weight")
    bias = layer.bias.detach().clone()
    if "layer.bias" in patches:
        bias = comfy.lora.calculate_weight([(1.0, patches["layer.bias"], 1.0, None, None)], bias, "layer.bias")
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            return nn.functional.linear(x, weight, bias)
        return layer._conv_forward(x, weight, bias)


def main() -> None:
    missing = Missing()
    logging.getLogger().addHandler(missing)
    logging.getLogger().setLevel(logging.INFO)
    results = {f"{a}-{k}": check(a, k, missing) for a in ("lora", "loha", "lokr", "dora") for k in LAYERS}
    results.update({f"{form}-{k}": check_lycoris(form, k, missing) for form, k in lycoris_files.cases()})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
