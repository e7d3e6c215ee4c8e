"""Step time of one training process against N data-parallel gloo processes (torchrun) on the CPU.

    python -m comfyui_lora_trainer.bench.distributed [--processes 2] [--steps 12] [--batch 8] [--json PATH]

The same run (the tiny model at SD1.x width, 32×32 latents, rank 16, fp32, the global batch
`--batch`) trains in 1 process and in N processes launched by `torchrun --standalone`; every process
is limited to one thread, so N processes use N cores where the single one uses one. Seconds per step
are timed after the first step (its first-use cost left out), on rank 0. Each step all-reduces the
LoRA's gradients once (fp32: 4 bytes per parameter) and the loss; the report gives those bytes.
On this 2-core machine the figure says what the shares and the all-reduce cost against the compute
they split, not what N GPUs would give.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import run_module
from .speed import write_json

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "distributed.json"



def one(steps: int, batch: int) -> dict[str, float]:
    """In this process (a torchrun worker, or alone): train and time; the figures from rank 0."""
    import torch.distributed as dist

    from ..tiny.host import tiny_fns
    from ..tiny.model import TinyConfig, build_tiny
    from ..tiny.text import encode_captions
    from ..training.config import TrainConfig
    from ..training.loop import Hooks, train

    torch.set_num_threads(1)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    model = build_tiny("eps", TinyConfig(width=64, context_dim=128, heads=4, groups=8))
    n = max(batch, 8)
    contexts = encode_captions([f"image {i}" for i in range(n)], model.net.config.context_dim)
    latents = torch.randn(n, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    times: list[float] = []
    config = TrainConfig(steps=steps, batch_size=batch, rank=16, training_dtype="fp32", lora_dtype="fp32",
                         gradient_checkpointing=False)
    result = train(model.net, tiny_fns(model, contexts), latents, config,
                   hooks=Hooks(on_step=lambda state: times.append(time.perf_counter())))
    lora_params = sum(t.numel() for k, t in result.lora.items() if not k.endswith(".alpha"))
    world = dist.get_world_size() if dist.is_initialized() else 1
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"processes": world, "seconds_per_step": (times[-1] - times[0]) / (len(times) - 1),
            "lora_parameters": lora_params, "allreduce_bytes_per_step": 4 * lora_params + 8,
            "final_loss": result.losses[-1]}


def measure(processes: int, steps: int, batch: int) -> dict[str, float]:
    out = Path(tempfile.mkdtemp()) / "figures.json"
    command = run_module.command("bench.distributed", "--one", str(out), "--steps", str(steps), "--batch", str(batch))
    if processes > 1:  # torchrun runs the same file in each process
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(processes)] + command[1:]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    shutil.rmtree(out.parent)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", type=Path, help="(internal) run in this process and write the figures here")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.one:
        figures = one(args.steps, args.batch)
        if int(os.environ.get("RANK", 0)) == 0:
            args.one.write_text(json.dumps(figures))
        return
    single, parallel = (measure(n, args.steps, args.batch) for n in (1, args.processes))
    result = {"settings": {"steps": args.steps, "batch": args.batch, "threads_per_process": 1},
              "single": single, "parallel": parallel,
              "speedup": single["seconds_per_step"] / parallel["seconds_per_step"]}
    print(f"1 process: {single['seconds_per_step']:.4f} s/step; {parallel['processes']} gloo processes: "
          f"{parallel['seconds_per_step']:.4f} s/step (speed-up {result['speedup']:.2f}x); all-reduce "
          f"{single['allreduce_bytes_per_step'] / 2 ** 20:.2f} MiB per step; final loss {single['final_loss']:.4f} "
          f"vs {parallel['final_loss']:.4f}")
    write_json(result, args.json)


if __name__ == "__main__":
    main()
