"""Our Train LoRA against ComfyUI core's TrainLoraNode, in a real ComfyUI server (COMFYUI_DIR).

Same tiny SD1.5-detected checkpoint (tests/integration/make_checkpoint.py), same images (the demo
set at 64 px), same settings (fp32, rank 8, batch 1, lr 5e-4, gradient checkpointing as given).
- per-step time: (wall time of an N-step run − a 1-step run) / (N − 1), from /history timestamps,
  so loading and encoding cancel; runs alternate between trainers, median over repeats;
- peak resident memory: a fresh server per trainer loads and encodes, its peak counter is reset,
  then it runs one N-step training; the server's VmHWM against its RSS before training.
Core is run with bypass_mode off (its default: weights rebuilt each forward) and on (forward hooks).

    COMFYUI_DIR=/path/to/ComfyUI python -m comfyui_lora_trainer.bench.comfyui [--steps N] [--repeats R]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
OURS = "LoRATrainer_TrainLoRA"
TRAINERS = {"ours": (OURS, {}), "core": ("TrainLoraNode", {"bypass_mode": False}),
            "core-bypass": ("TrainLoraNode", {"bypass_mode": True})}
DATASET = "bench_set"


def load_server_module():
    spec = importlib.util.spec_from_file_location("lora_trainer_bench_server", ROOT / "tests/integration/server.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_dataset(input_dir: Path) -> None:
    folder = input_dir / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    for png in sorted((ROOT / "assets" / "demo_images").glob("*.png")):
        Image.open(png).convert("RGB").resize((64, 64)).save(folder / png.name)


def defaults(info: dict) -> dict:
    """Each widget input's default from /object_info (combos: the first choice)."""
    values = {}
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            kind, options = spec[0], spec[1] if len(spec) > 1 else {}
            if isinstance(kind, list):
                values[name] = options.get("default", kind[0] if kind else None)
            elif "default" in options:
                values[name] = options["default"]
    return values


def prompt(client, trainer: str, steps: int, seed: int, checkpointing: bool) -> dict:
    node, extra = TRAINERS[trainer]
    inputs = defaults(client.object_info(node))
    inputs.update(extra, model=["1", 0], latents=["3", 0], positive=["4", 0], steps=steps, seed=seed,
                  batch_size=1, rank=8, learning_rate=5e-4, training_dtype="fp32", lora_dtype="fp32",
                  gradient_checkpointing=checkpointing, existing_lora="[None]")
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": client.checkpoint}},
        "2": {"class_type": "LoRATrainer_LoadImageSetFromFolder", "inputs": {"folder": DATASET}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a picture in lrtstyle", "clip": ["1", 1]}},
        "5": {"class_type": node, "inputs": inputs},
        "6": {"class_type": "LoRATrainer_SaveLoRA", "inputs": {"lora": ["5", 1 if node == OURS else 0],
                                                                 "prefix": f"bench/{trainer}"}},
    }


def run_seconds(client, graph: dict) -> float:
    entry = client.run(graph, timeout=1800)
    stamps = {event: data.get("timestamp") for event, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def proc_status_mib(pid: int, field: str) -> float:
    """VmRSS / VmHWM of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/{pid}/status (Linux only)")


def encode_only(client) -> dict:
    """Load + encode, ending in a preview of the decoded latents: warms every cached upstream node."""
    graph = {k: v for k, v in prompt(client, "ours", 1, 0, True).items() if k in ("1", "2", "3", "4")}
    graph["5"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}}
    graph["6"] = {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}
    return graph


def time_per_step(server, args, names: list[str]) -> dict[str, float]:
    client, seed, samples = fresh_server(server, args), 0, {n: [] for n in names}
    try:
        client.run(encode_only(client), timeout=1800)
        for name in names:  # warm-up: first use of each trainer's code paths
            run_seconds(client, prompt(client, name, 1, 0, args.checkpointing))
        for _ in range(args.repeats):
            for name in names:  # alternate trainers within each repeat
                seed += 1
                one = run_seconds(client, prompt(client, name, 1, seed, args.checkpointing))
                many = run_seconds(client, prompt(client, name, args.steps, seed, args.checkpointing))
                samples[name].append((many - one) / (args.steps - 1))
                print(f"  {name}: {samples[name][-1] * 1000:.0f} ms/step", flush=True)
    finally:
        server.stop(client.process)
    return {n: statistics.median(v) for n, v in samples.items()}


def fresh_server(server, args):
    comfy_dir = server.comfyui_dir()
    python = server.comfyui_python(comfy_dir)
    base = Path(tempfile.mkdtemp(prefix="lora_trainer_bench_"))
    server.make_base_dir(base, server.cached_checkpoint(comfy_dir, python))
    write_dataset(base / "input")
    return server.start_server(comfy_dir, python, base)


def peak_memory(server, args, name: str) -> tuple[float, float]:
    """(RSS after load + encode, peak RSS during one N-step training by `name`) in MiB, fresh server.

    The kernel's peak counter is reset after loading (clear_refs 5), so the peak is training's own.
    """
    client = fresh_server(server, args)
    try:
        client.run(encode_only(client), timeout=1800)
        pid = client.process.pid
        before = proc_status_mib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        client.run(prompt(client, name, args.steps, 1, args.checkpointing), timeout=1800)
        return before, proc_status_mib(pid, "VmHWM")
    finally:
        server.stop(client.process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=21, help="steps of the long run (default 21)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "comfyui.json")
    args = parser.parse_args(argv)
    server = load_server_module()
    try:
        server.comfyui_dir()
    except server.NoComfyUI as why:
        print(f"bench/comfyui: {why}")
        return 2
    names = list(TRAINERS)
    print(f"per-step time ({args.repeats} repeats, {args.steps}-step vs 1-step runs):")
    per_step = time_per_step(server, args, names)
    print("peak memory (fresh server each):")
    peaks = {n: peak_memory(server, args, n) for n in names}
    result = {"settings": {k: str(v) for k, v in vars(args).items()},
              "ms_per_step": {n: v * 1000 for n, v in per_step.items()},
              "rss_after_load_mib": {n: p[0] for n, p in peaks.items()},
              "peak_rss_training_mib": {n: p[1] for n, p in peaks.items()}}
    print("\n| trainer | ms/step | vs core | RSS after load MiB | peak RSS training MiB | training's extra MiB |")
    print("|---|---|---|---|---|---|")
    for n in names:
        before, peak = peaks[n]
        print(f"| {n} | {per_step[n] * 1000:.0f} | {per_step[n] / per_step['core']:.2f}x | {before:.0f} "
              f"| {peak:.0f} | {peak - before:.0f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
