"""Where one training step's time goes: torch.profiler ops and the engine's Python calls.

    python -m comfyui_lora_trainer.bench.profile [--case wide/ours/plain] [--dtype fp32|bf16] [--top 12]

Prepares the case (bench/cases.py: fresh model, adapters, optimizer), runs warm-up steps, then
profiles ONE step: the top ops by self CPU time (so the costs can be named); the ops whose self
time grows most against another method (default: the floor); the copies and casts made in the
step, marking those of frozen-weight shape, which repeat identical work every step (e.g. autocast
casting fp32 frozen weights to bf16: its cache keeps only casts of leaves that require grad); and
`cProfile` of the package's own functions with their call counts, which shows per-step Python work
(conditioning, schedule tables, parameter lists) whose inputs do not change between steps.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .cases import Case, prepared

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = __package__.rsplit(".", 1)[0]
COPY_OPS = ("aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous")


def profiled_step(case: Case, dtype: str = "fp32", warmup: int = 2,
                  shapes: bool = False) -> tuple[profile, set[tuple[int, ...]]]:
    """(torch.profiler of one step after `warmup`, the shapes of the model's frozen weights)."""
    with prepared(case, dtype=dtype) as (step, model):
        for _ in range(warmup):
            step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
            step()
        frozen = {tuple(p.shape) for p in model.net.parameters() if p.dim() >= 2}
    return prof, frozen


def op_table(case: Case, top: int = 12, warmup: int = 2, dtype: str = "fp32") -> str:
    """torch.profiler's table of one step's top `top` ops by self CPU time."""
    prof, _ = profiled_step(case, dtype, warmup)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def op_self_times(case: Case, warmup: int = 2, dtype: str = "fp32") -> dict[str, tuple[float, int]]:
    """op name → (self CPU milliseconds, calls) in one step."""
    prof, _ = profiled_step(case, dtype, warmup)
    return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}


def compare_ops(case: Case, against: Case, top: int = 12, warmup: int = 2, dtype: str = "fp32") -> str:
    """Markdown: the ops whose self time grows most from `against` to `case` (ms and calls per step)."""
    ours, base = op_self_times(case, warmup, dtype), op_self_times(against, warmup, dtype)
    none = (0.0, 0)
    rows = sorted(((ours.get(k, none)[0] - base.get(k, none)[0], k) for k in set(ours) | set(base)), reverse=True)
    lines = [f"| op | {case.name} ms (calls) | {against.name} ms (calls) | extra ms |", "|---|---:|---:|---:|"]
    for extra, key in rows[:top]:
        (a, na), (b, nb) = ours.get(key, none), base.get(key, none)
        lines.append(f"| {key} | {a:.1f} ({na}) | {b:.1f} ({nb}) | {extra:+.1f} |")
    total = [sum(v[i] for v in d.values()) for d in (ours, base) for i in (0, 1)]
    lines.append(f"| **all ops** | {total[0]:.1f} ({total[1]}) | {total[2]:.1f} ({total[3]}) | "
                 f"{total[0] - total[2]:+.1f} |")
    return "\n".join(lines)


def copies_table(case: Case, top: int = 12, warmup: int = 2, dtype: str = "fp32") -> str:
    """Markdown: one step's copies/casts by op and input shape; `frozen` marks frozen-weight shapes."""
    prof, frozen = profiled_step(case, dtype, warmup, shapes=True)
    found: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in COPY_OPS:
            shape = tuple(e.input_shapes[0]) if e.input_shapes else ()
            entry = found[(e.key, str(list(shape)) + (" frozen" if shape in frozen else ""))]
            entry[0] += e.self_cpu_time_total / 1e3
            entry[1] += e.count
    frozen_ms = sum(v[0] for (_, s), v in found.items() if s.endswith("frozen"))
    lines = ["| op | first input shape | ms | calls |", "|---|---|---:|---:|"]
    for (key, shape), (ms, calls) in sorted(found.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| {key} | {shape} | {ms:.2f} | {calls} |")
    lines.append(f"| **frozen-weight-shaped, all** | | {frozen_ms:.2f} | |")
    return "\n".join(lines)


def python_calls(case: Case, top: int = 12, warmup: int = 2, dtype: str = "fp32") -> str:
    """cProfile of one step: the package's own functions, by cumulative time, with call counts."""
    with prepared(case, dtype=dtype) as (step, _):
        for _ in range(warmup):
            step()
        profiler = cProfile.Profile()
        profiler.enable()
        step()
        profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(str(ROOT).replace("\\", "/") + r"/(?!bench/|\.venv/)", top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PACKAGE}.bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="wide/ours/plain", help="size/method/plain|ckpt (default wide/ours/plain)")
    parser.add_argument("--against", default="floor", help="method to compare op by op (default floor; '' skips)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="training_dtype (default fp32)")
    parser.add_argument("--top", type=int, default=12, help="rows per table (default 12)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    case = Case.parse(args.case)
    where = f"one step, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"## {case.name}: top {args.top} ops by self CPU time ({where})\n")
    print(op_table(case, args.top, dtype=args.dtype))
    if args.against:
        print(f"\n## extra self CPU time per op against {args.against}\n")
        print(compare_ops(case, Case(case.size, args.against, case.checkpointing), args.top, dtype=args.dtype))
    print(f"\n## copies and casts in one step ({args.dtype})\n")
    print(copies_table(case, args.top, dtype=args.dtype))
    print(f"\n## {case.name}: the package's Python calls in one step (cumulative)\n")
    print(python_calls(case, args.top * 3, dtype=args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
