"""The speed benchmark's ratios, its targets (PASS/MISS) and its markdown report.

Rows come from bench/speed.py: case name (`size/method/plain|ckpt`) → `median_s` (step time),
`seconds` (every repeat), `peak_increase_mib` (peak RSS above setup, from its own process) and
`file_kib` (the adapter's file in bf16). Methods loha/lokr/dora (wide model, checkpointing off) are
reported against LoRA ("ours") at the same rank.

Targets (docs/benchmarks.md#speed-and-memory-of-a-training-step), on the wide model in fp32 at rank 8:
- ours/floor step time ≤ 1.15 with checkpointing off;
- ours faster than the weight-rebuild reference, and with a lower peak;
- checkpointing on: ours' peak at least 30% below off, for at most 40% more step time.
"""
from __future__ import annotations

from typing import NamedTuple

from .cases import ALGORITHM_METHODS

OURS_OVER_FLOOR = 1.15
CKPT_MEMORY = 0.70
CKPT_TIME = 1.40
MODES = ("plain", "ckpt")


class Target(NamedTuple):
    name: str
    value: float
    limit: float
    passed: bool


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def ratios(rows: dict[str, dict[str, object]], sizes: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """size → named ratios of median step time (`time …`) and of peak increase (`peak …`)."""
    out: dict[str, dict[str, float]] = {}
    for size in sizes:
        def get(method: str, mode: str, key: str) -> float:
            return float(rows[f"{size}/{method}/{mode}"][key])

        found: dict[str, float] = {}
        for label, key in (("time", "median_s"), ("peak", "peak_increase_mib")):
            for mode in MODES:
                found[f"{label} ours/floor {mode}"] = _ratio(get("ours", mode, key), get("floor", mode, key))
                found[f"{label} ours/rebuild {mode}"] = _ratio(get("ours", mode, key), get("rebuild", mode, key))
            for method in ("floor", "ours", "rebuild"):
                found[f"{label} {method} ckpt/plain"] = _ratio(get(method, "ckpt", key), get(method, "plain", key))
            for algo in ALGORITHM_METHODS:  # each algorithm against LoRA ("ours") at the same rank
                if f"{size}/{algo}/plain" in rows:
                    found[f"{label} {algo}/lora plain"] = _ratio(get(algo, "plain", key), get("ours", "plain", key))
        out[size] = found
    return out


def target_size(sizes: tuple[str, ...]) -> str:
    """The targets are set on the wide model; a quick run checks them on what it measured."""
    return "wide" if "wide" in sizes else sizes[0]


def targets(found: dict[str, dict[str, float]], sizes: tuple[str, ...]) -> list[dict[str, object]]:
    size = target_size(sizes)
    r = found[size]
    checks = [
        Target(f"{size}: ours/floor time, checkpointing off", r["time ours/floor plain"], OURS_OVER_FLOOR,
               r["time ours/floor plain"] <= OURS_OVER_FLOOR),
    ]
    for mode in MODES:
        for label, what in (("time", "faster than"), ("peak", "lower peak than")):
            value = r[f"{label} ours/rebuild {mode}"]
            checks.append(Target(f"{size}: ours {what} weight-rebuild, {mode}", value, 1.0, value < 1.0))
    checks.append(Target(f"{size}: checkpointing on/off peak (ours)", r["peak ours ckpt/plain"], CKPT_MEMORY,
                         r["peak ours ckpt/plain"] <= CKPT_MEMORY))
    checks.append(Target(f"{size}: checkpointing on/off time (ours)", r["time ours ckpt/plain"], CKPT_TIME,
                         r["time ours ckpt/plain"] <= CKPT_TIME))
    return [t._asdict() for t in checks]


def _case_table(rows: dict[str, dict[str, object]]) -> list[str]:
    lines = ["| model | method | checkpointing | step ms (median) | min–max ms | peak +MiB | file KiB (bf16) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        size, method, mode = name.split("/")
        seconds = row["seconds"]
        lines.append(f"| {size} | {method} | {'on' if mode == 'ckpt' else 'off'} | {row['median_s'] * 1e3:.1f} | "
                     f"{min(seconds) * 1e3:.1f}–{max(seconds) * 1e3:.1f} | {row['peak_increase_mib']:.1f} | "
                     f"{row.get('file_kib', 0.0):.1f} |")
    return lines


def _ratio_table(found: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| model | ratio | time | peak memory |", "|---|---|---:|---:|"]
    for size, r in found.items():
        names = sorted({key.split(" ", 1)[1] for key in r}, key=lambda n: (n.split()[0] != "ours", n))
        for name in names:
            lines.append(f"| {size} | {name} | {r['time ' + name]:.3f} | {r['peak ' + name]:.3f} |")
    return lines


def markdown(result: dict[str, object]) -> str:
    """Header line (machine), the case table, the ratio table, then PASS/MISS per target."""
    m, s = result["machine"], result["settings"]
    load = m.get("load_average")
    lines = [f"**Machine:** {m['processor']} · {m['cpu_count']} CPUs ({m['torch_threads']} torch threads) · "
             f"torch {m['torch']} · load {'/'.join(map(str, load)) if load else 'n/a'} · {s['dtype']} "
             f"{s['device']}, rank {s['rank']}, batch {s['batch_size']}, {s['repeats']} interleaved repeats "
             f"after {s['warmup']} warm-up", ""]
    lines += _case_table(result["cases"]) + [""] + _ratio_table(result["ratios"]) + [""]
    for t in result["targets"]:
        op = "<" if t["limit"] == 1.0 else "≤"
        lines.append(f"- {'PASS' if t['passed'] else 'MISS'} {t['name']}: {t['value']:.3f} ({op} {t['limit']})")
    return "\n".join(lines)
