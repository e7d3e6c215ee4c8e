"""What the in-place guard costs: the engine's step with `training_forward` (saved-tensor
copy-on-write, our checkpoint) against the same step without the guard and with torch's own
non-reentrant checkpoint (the engine before the guard, which cannot train Flux-style blocks).

    python -m comfyui_lora_trainer.bench.guard [--model wide|default|comfyui-sd15] [--repeats N]

`comfyui-sd15` runs on the UNet of the integration tests' tiny SD1.5-detected checkpoint (320
channels, 64 px images → 8×8 latents), built by ComfyUI's own loader in this process: it needs
COMFYUI_DIR and ComfyUI's Python with this package installed (`pip install --no-deps -e .`). fp32, rank 8, batch 1, AdamW; checkpointing off and on. Each
of the four cases has its own model, patched for the whole run as `train()` patches it (so the
guarded one finds after its first step that SD1.x needs no guard); the cases are interleaved step
by step after warm-up, so machine noise hits them alike; medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..lora import inject
from ..lora.patching import swapped_forwards
from ..tiny.host import tiny_fns
from ..tiny.model import TinyDiffusion
from ..tiny.schedules import make_schedule
from ..tiny.text import encode_text
from ..training.checkpointing import model_blocks, training_forward
from .cases import CAPTION, CONTEXT_TOKENS, EngineStep, bench_config, bench_inputs, lora_config
from .comfyui import load_server_module


@contextmanager
def unguarded(blocks: list[nn.Module], checkpointing: bool) -> Iterator[None]:
    """The engine before the guard: torch's checkpoint on each block but the last, nothing else."""
    def wrap(forward):
        return lambda *args, **kwargs: checkpoint(forward, *args, use_reentrant=False, **kwargs)

    with swapped_forwards([(block, wrap) for block in (blocks[:-1] if checkpointing else [])]):
        yield


class _UNetAsTiny(nn.Module):
    """ComfyUI's UNetModel called the way TinyDiffusion calls its net: (x, timestep, context)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timestep, context=context.expand(x.shape[0], -1, -1))


def comfyui_sd15() -> tuple[TinyDiffusion, list[nn.Module], torch.Tensor, torch.Tensor]:
    """The integration tests' tiny SD1.5 UNet, loaded by ComfyUI; eps schedule, 8×8 latents."""
    sys.path.insert(0, os.environ["COMFYUI_DIR"])
    from comfy.cli_args import args
    args.cpu = True
    import comfy.sd

    server = load_server_module()
    path = server.cached_checkpoint(server.comfyui_dir(), sys.executable)
    patcher = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]
    unet = patcher.model.diffusion_model.float().requires_grad_(False)
    blocks = model_blocks(unet)
    model = TinyDiffusion(_UNetAsTiny(unet), make_schedule("eps"))
    context = encode_text(CAPTION, 768, CONTEXT_TOKENS)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return model, blocks, context, latents


def load(name: str) -> tuple[TinyDiffusion, list[nn.Module], torch.Tensor, torch.Tensor]:
    if name == "comfyui-sd15":
        return comfyui_sd15()
    model, context, latents = bench_inputs(name)
    return model, list(model.net.blocks), context, latents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wide", choices=["default", "wide", "comfyui-sd15"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [(guard, ck) for ck in (False, True) for guard in ("guarded", "unguarded")]
    times: dict[tuple[str, bool], list[float]] = {case: [] for case in cases}
    with ExitStack() as stack:
        steps = {}
        for guard, ck in cases:  # one model per case, patched for the whole run as train() does
            model, blocks, context, latents = load(args.model)
            network = stack.enter_context(inject(model.net, lora_config(bench_config(ck)), seed=0))
            stack.enter_context(training_forward(model.net, blocks, ck) if guard == "guarded"
                                else unguarded(blocks, ck))
            steps[(guard, ck)] = EngineStep(network, tiny_fns(model, context), latents, bench_config(ck))
        for repeat in range(args.warmup + args.repeats):
            for case in cases[repeat % 4:] + cases[:repeat % 4]:  # rotate the starting case
                started = time.process_time()  # CPU time: less hurt than wall time by a busy machine
                steps[case]()
                if repeat >= args.warmup:
                    times[case].append(time.process_time() - started)
    print(f"model {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}, {args.repeats} interleaved repeats, median CPU ms/step")
    print("| checkpointing | unguarded (torch checkpoint) | guarded (ours) | guarded/unguarded |")
    print("|---|---:|---:|---:|")
    for ck in (False, True):
        a, b = (statistics.median(times[(g, ck)]) * 1000 for g in ("unguarded", "guarded"))
        print(f"| {'on' if ck else 'off'} | {a:.1f} | {b:.1f} | {b / a:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
