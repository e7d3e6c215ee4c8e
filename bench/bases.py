"""Extra peak memory of training on fp8 against bf16 bases, and the design target for it.

    python -m comfyui_lora_trainer.bench.bases [--json PATH] [--steps N] [--width W] [--size S]

ComfyUI stores a model's weights in fp8 or bf16 and casts each layer's weight to the compute dtype
inside the layer's forward (comfy/ops.py `manual_cast`, `cast_bias_weight`). `cast_layers` gives the
bundled tiny model such layers (the tests use them too: tests/test_bases.py). For each storage dtype,
three cases run, each in its own subprocess:
- floor: forward + backward of the frozen base with respect to its input (the activations and the
  per-layer weight casts training cannot avoid), no adapters;
- ours: LoRA (rank 8, Adam) injected, the same steps plus the optimizer step, no checkpointing;
- ours_checkpointing: the same through the engine's `training_forward` with gradient checkpointing,
  Train LoRA's default (training/checkpointing.py: each block keeps only its inputs and is run again
  in the backward).
Memory is counted as torch's own allocations: a dispatch mode sums the bytes of every live tensor
storage an op creates (a storage counts until it is freed), so the peak is the most the steps held
at once above the loaded base (the weights, made before), exact on any device and free of the
allocator's slack. The JSON also has each case's peak RSS increase (`VmHWM`, reset after setup as
bench/speed.py does), which holds the allocator's, the libraries' and the count's own memory too.

The design target (docs/families.md#memory-on-fp8-and-bf16-bases): fp8 base + adapters + optimizer state ≤ fp8 weights + activations +
4 × LoRA parameter bytes (fp32 master, gradient, Adam's two moments). The weights are resident before
the count starts, so the check is: a case's peak ≤ activations + 4 × LoRA bytes, where "activations"
are what autograd saves in ours' first step without checkpointing (unique storages, through
saved_tensors_hooks): the layers' inputs, which the adapters' gradients need, and the
nonlinearities'. Tensors of a layer weight's shape are counted apart, as weights: the weight cast to
the compute dtype inside the layer's forward, which F.linear/F.conv keep for the input gradient
(for an fp8 base they cost the weights again in the compute dtype). Compute is fp32 on the CPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import weakref
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import run_module
from .speed import MALLOC_ENV, _maxrss_mib, reset_peak_rss, write_json

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "bases.json"
DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "bf16": torch.bfloat16}
CASES = ("floor", "ours", "ours_checkpointing")
MIB = 2 ** 20



# --- layers that cast in forward, as ComfyUI's do ----------------------------------------------------

class _Cast:
    """Casts its weight/bias to the input's device and dtype in forward (ComfyUI's cast_bias_weight).
    A parameter resting on "meta" reads its values from `self.aside` (an offload device stand-in)."""

    def cast(self, part: str, x: torch.Tensor) -> torch.Tensor | None:
        rest = getattr(self, part)
        if rest is None:
            return None
        return (self.aside[part] if rest.device.type == "meta" else rest).to(x.device, x.dtype)


class CastLinear(nn.Linear, _Cast):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.cast("weight", x), self.cast("bias", x))


class CastConv2d(nn.Conv2d, _Cast):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.cast("weight", x), self.cast("bias", x))


class CastGroupNorm(nn.GroupNorm, _Cast):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.cast("weight", x), self.cast("bias", x), self.eps)


class CastLayerNorm(nn.LayerNorm, _Cast):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.cast("weight", x), self.cast("bias", x), self.eps)


CASTS = {nn.Linear: CastLinear, nn.Conv2d: CastConv2d, nn.GroupNorm: CastGroupNorm, nn.LayerNorm: CastLayerNorm}
OFFLOADED = (nn.Linear, nn.Conv2d)  # the layers whose weights rest on meta with offload=True


def cast_layers(net: nn.Module, dtype: torch.dtype, offload: bool = False) -> None:
    """Every Linear/Conv2d/GroupNorm/LayerNorm of `net` stores its parameters in `dtype` and casts them
    in forward; with `offload`, Linear/Conv2d parameters rest on "meta", their values in `module.aside`."""
    for module in net.modules():
        kind = type(module)
        if kind not in CASTS:
            continue
        module.__class__ = CASTS[kind]
        module.aside = {}
        for part in ("weight", "bias"):
            param = module._parameters.get(part)
            if param is None:
                continue
            values = param.detach().to(dtype)
            if offload and kind in OFFLOADED:
                module.aside[part] = values
                values = torch.empty(param.shape, dtype=dtype, device="meta")
            module._parameters[part] = nn.Parameter(values, requires_grad=False)


# --- one case -------------------------------------------------------------------------------------

class LiveBytes(TorchDispatchMode):
    """Sums the bytes of the live tensor storages that ops create while it is active, and their peak.
    A storage counts once, from the op that made it until it is freed (a finalizer on the storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


def one(dtype_name: str, case: str, steps: int, width: int, size: int) -> dict[str, object]:
    """In this process: the extra peak memory (MiB) of `steps` steps above the loaded base model, as
    torch's live tensor bytes and as RSS (both counted from once the base is built and cast)."""
    from ..lora import LoraConfig, inject
    from ..tiny.model import TinyConfig, build_tiny
    from ..training.checkpointing import training_forward

    model = build_tiny("eps", TinyConfig(width=width, context_dim=2 * width))
    cast_layers(model.net, DTYPES[dtype_name])
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, size, size, generator=gen)
    context = torch.randn(2, 8, 2 * width, generator=gen)
    sigma = torch.tensor([0.5, 1.5])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.net.parameters())
    weight_shapes = {tuple(p.shape) for p in model.net.parameters() if p.dim() >= 2}
    saved: dict[int, tuple[int, bool]] = {}  # storage → (bytes, a weight's shape: the layer's cast weight)

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), tuple(t.shape) in weight_shapes)
        return t

    gc.collect()
    reset = reset_peak_rss()
    base = _maxrss_mib()
    with LiveBytes() as live:
        network = inject(model.net, LoraConfig(rank=8), device="cpu") if case != "floor" else None
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-4) if network is not None else None
        blocks = list(model.net.blocks) if case == "ours_checkpointing" else []
        for i in range(steps):
            noisy = (x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)).requires_grad_(network is None)
            # plain autograd (what it saves is counted at the first step), or the engine's checkpointing
            forward = (training_forward(model.net, blocks, True) if blocks else
                       torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if i == 0 else nullcontext())
            with forward:
                loss = F.mse_loss(model.denoise(noisy, sigma, context), x0)
                loss.backward()
            del loss, noisy
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    peak = _maxrss_mib()
    lora_bytes = sum(p.numel() * p.element_size() for p in network.parameters()) if network is not None else 0
    if network is not None:
        network.remove()
    return {"peak_tensor_mib": live.peak / MIB, "peak_rss_increase_mib": peak - base, "weight_mib": weight_bytes / MIB,
            "lora_mib": lora_bytes / MIB,
            "saved_activations_mib": sum(n for n, w in saved.values() if not w) / MIB if saved else None,
            "saved_weight_casts_mib": sum(n for n, w in saved.values() if w) / MIB if saved else None,
            "peak_reset": reset}


def measure(dtype_name: str, case: str, steps: int, width: int, size: int) -> dict[str, object]:
    command = run_module.command("bench.bases", "--one", f"{dtype_name}:{case}",
                                 "--steps", str(steps), "--width", str(width), "--size", str(size))
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"memory subprocess for {dtype_name}:{case} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(steps: int, width: int, size: int) -> dict[str, object]:
    """Every dtype × case; per dtype the target check (see the module docstring)."""
    rows = {f"{d}:{c}": measure(d, c, steps, width, size) for d in DTYPES for c in CASES}
    report = {}
    for d in DTYPES:
        floor, ours, checkpointed = (rows[f"{d}:{c}"] for c in CASES)
        budget = ours["saved_activations_mib"] + 4 * ours["lora_mib"]
        report[d] = {"weights_mib": ours["weight_mib"], "lora_mib": ours["lora_mib"],
                     "saved_activations_mib": ours["saved_activations_mib"],
                     "saved_weight_casts_mib": ours["saved_weight_casts_mib"], "budget_mib": budget,
                     **{f"{c}_peak_mib": rows[f"{d}:{c}"]["peak_tensor_mib"] for c in CASES},
                     **{f"{c}_rss_mib": rows[f"{d}:{c}"]["peak_rss_increase_mib"] for c in CASES},
                     "meets_target": {c: rows[f"{d}:{c}"]["peak_tensor_mib"] <= budget for c in CASES[1:]}}
    return {"settings": {"steps": steps, "width": width, "latent": [2, 4, size, size], "rank": 8,
                         "compute": "fp32 cpu"}, "cases": rows, "report": report}


def markdown(result: dict[str, object]) -> str:
    lines = ["| base | weights | LoRA params | saved activations | saved weight casts | budget (activations + 4×LoRA) "
             "| base fwd+bwd alone | training | training, checkpointing (default) |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(r: dict, case: str) -> str:
        verdict = "" if case == "floor" else (" PASS" if r["meets_target"][case] else " MISS")
        return f"+{r[f'{case}_peak_mib']:.1f} MiB{verdict}"

    for d, r in result["report"].items():
        lines.append(f"| {d} | {r['weights_mib']:.1f} MiB | {r['lora_mib']:.2f} MiB | {r['saved_activations_mib']:.1f} MiB | "
                     f"{r['saved_weight_casts_mib']:.1f} MiB | {r['budget_mib']:.1f} MiB | "
                     + " | ".join(cell(r, c) for c in CASES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="dtype:case, measured in this process (internal)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.one:
        dtype_name, case = args.one.split(":")
        print(json.dumps(one(dtype_name, case, args.steps, args.width, args.size)))
        return
    result = run(args.steps, args.width, args.size)
    print(markdown(result))
    write_json(result, args.json)


if __name__ == "__main__":
    main()
