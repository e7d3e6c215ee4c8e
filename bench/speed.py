"""Training-step speed and peak memory of the engine against the floor and a weight-rebuild LoRA.

    python -m comfyui_lora_trainer.bench.speed [--quick] [--json PATH] [--repeats N] [--threads N]

On the bundled tiny model at two sizes (default: 32×32×4 latents; wide: 320 channels,
cross-attention to a 768-wide context, 64×64×4 latents), fp32 on CPU, rank 8, batch 1, each case
of bench/cases.py (floor, ours, rebuild; gradient checkpointing off and on) is timed in ONE process,
interleaved: every repeat runs one step of each case in turn (the starting case rotating), after
warm-up steps, and the median of the repeats is reported, so machine noise hits every case alike.

Peak memory is measured per case in its own subprocess (`--one CASE`), so peaks do not mix: the
peak RSS (`VmHWM`, the counter behind `getrusage(RUSAGE_SELF).ru_maxrss`) after import, model
build, patching and one warm-up step, against the same after the steps; the increase is reported
in MiB (torch's CPU allocations live in RSS). Two details keep that increase honest: the
high-water mark is reset to the current RSS after setup (Linux `/proc/self/clear_refs`, "5"),
else the transient peak of building the model hides the steps; and glibc's mmap threshold is
fixed (`MALLOC_MMAP_THRESHOLD_`), so large tensors are mapped and unmapped rather than recycled
from a heap grown during setup.

Threads: torch's default unless `--threads N`. On a busy machine, several threads per op stall on
each other (OpenMP barriers with a descheduled thread), which taxes many small ops more than a
few large ones; the header records the load average so such a run can be recognised.

Prints a markdown table, the ratios and PASS/MISS per target; writes JSON (default
bench/results/speed.json). `--quick` (few repeats, default model only) is for the smoke test.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from ..lora.files import write_atomically
from . import run_module
from .cases import RANK, SIZES, Case, all_cases, file_kib, prepared
from .report import markdown, ratios, targets

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = __package__.rsplit(".", 1)[0]  # the name the repository root is imported under
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "speed.json"
MEMORY_STEPS = 2  # measured after one warm-up step (memory_worker)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}



def time_cases(cases: list[Case], repeats: int, warmup: int) -> dict[str, list[float]]:
    """case name → `repeats` step times in seconds, measured round-robin over all cases."""
    times: dict[str, list[float]] = {case.name: [] for case in cases}
    with ExitStack() as stack:
        steps = [(case.name, stack.enter_context(prepared(case)).step) for case in cases]
        for _ in range(warmup):
            for _, step in steps:
                step()
        for repeat in range(repeats):
            shift = repeat % len(steps)  # rotate who goes first: no case always follows another
            for name, step in steps[shift:] + steps[:shift]:
                gc.collect()
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return times


def _maxrss_mib() -> float:
    """This process's peak RSS in MiB: Linux's VmHWM, else ru_maxrss.

    ru_maxrss alone is wrong in a subprocess: Linux carries the parent's RSS at fork over exec
    into it (signal_struct.maxrss), and resetting the high-water mark does not clear that part.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    unit = 2.0**20 if sys.platform == "darwin" else 1024.0  # macOS counts bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit


def reset_peak_rss() -> bool:
    """Set the RSS high-water mark (ru_maxrss) to the current RSS; False where Linux can't."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(case: Case, steps: int) -> dict[str, object]:
    """In this process: peak RSS increase (MiB) over `steps` steps of `case`, above its setup.

    One untimed step runs first, so library code paged in on first use, oneDNN's primitive cache
    and the optimizer state are part of the baseline rather than of the steps' peak.
    """
    with prepared(case) as (step, _):
        step()
        gc.collect()
        setup_peak = _maxrss_mib()
        reset = reset_peak_rss()
        base = _maxrss_mib()
        for _ in range(steps):
            step()
        peak = _maxrss_mib()
    return {"base_mib": base, "setup_peak_mib": setup_peak, "peak_reset": reset,
            "peak_increase_mib": peak - base}


def peak_memory(case: Case, steps: int = MEMORY_STEPS) -> dict[str, object]:
    """`memory_worker` for `case` in a fresh subprocess; raises RuntimeError with its stderr."""
    command = run_module.command("bench.speed", "--one", case.name, "--steps", str(steps),
                                 "--threads", str(torch.get_num_threads()))
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"memory subprocess for {case.name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict[str, object]:
    return {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average": _load_average()}


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_benchmark(sizes: tuple[str, ...], repeats: int, warmup: int,
                  memory_steps: int = MEMORY_STEPS) -> dict[str, object]:
    """Time every case of `sizes` interleaved, then measure each one's peak memory alone."""
    cases = all_cases(sizes)
    info = machine()  # the load average before this run adds its own
    times = time_cases(cases, repeats, warmup)
    memory = {case.name: peak_memory(case, memory_steps) for case in cases}
    rows = {case.name: {"seconds": times[case.name], "median_s": statistics.median(times[case.name]),
                        **memory[case.name], "file_kib": file_kib(case)} for case in cases}
    result = {"machine": info, "settings": {"dtype": "fp32", "device": "cpu", "rank": RANK,
                                                 "batch_size": 1, "repeats": repeats, "warmup": warmup,
                                                 "sizes": list(sizes)},
              "cases": rows}
    result["ratios"] = ratios(rows, sizes)
    result["targets"] = targets(result["ratios"], sizes)
    return result


def write_json(result: dict[str, object], path: Path) -> None:
    """Written atomically (lora/files.py), replacing the earlier results."""
    text = json.dumps(result, indent=2)
    write_atomically(path, lambda tmp: Path(tmp).write_text(text), "results", overwrite=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PACKAGE}.bench.speed", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="default model only, 2 repeats (smoke test)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"result file (default {DEFAULT_JSON})")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 7; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case first (default 2; quick 1)")
    parser.add_argument("--sizes", default=None, help=f"comma-separated, from {','.join(SIZES)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's own)")
    parser.add_argument("--one", default=None, help="internal: measure one case's peak memory, print JSON")
    parser.add_argument("--steps", type=int, default=MEMORY_STEPS, help="internal: steps for --one")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: got {args.threads}; give 1 or more")
        torch.set_num_threads(args.threads)
    if args.one is not None:
        print(json.dumps(memory_worker(Case.parse(args.one), args.steps)))
        return 0
    sizes = tuple(args.sizes.split(",")) if args.sizes else (("default",) if args.quick else tuple(SIZES))
    for size in sizes:
        if size not in SIZES:
            parser.error(f"--sizes: got {size!r}; choose from {', '.join(SIZES)}")
    repeats = args.repeats or (2 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    result = run_benchmark(sizes, repeats, warmup)
    print(markdown(result))
    write_json(result, args.json)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
