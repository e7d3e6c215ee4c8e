"""`python -m comfyui_lora_trainer demo` (train on the bundled tiny model), `... run WORKFLOW.json`
(drive a running ComfyUI headless), `... train WORKFLOW.json` (ComfyUI in this process; under
torchrun, data-parallel) and `... estimate WORKFLOW.json` (the memory a training step needs)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .headless.cli import add_run_arguments  # standard library only
from .headless.inprocess import add_estimate_arguments, add_train_arguments, split_comfy_args  # standard library only (ComfyUI, torch: when run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfyui_lora_trainer")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a LoRA on the bundled tiny model and images")
    demo.add_argument("--out", type=Path, default=Path("output/demo"), help="output folder (default output/demo)")
    demo.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    demo.add_argument("--kind", choices=("eps", "v", "flow"), default="eps", help="tiny model parameterisation")
    demo.add_argument("--seed", type=int, default=0)
    run = commands.add_parser("run", help="run an API-format workflow on a ComfyUI server (headless training)")
    add_run_arguments(run)
    train = commands.add_parser("train", help="run a workflow in this process with ComfyUI as a library "
                                              "(torchrun: data-parallel training)")
    add_train_arguments(train)
    estimate = commands.add_parser("estimate", help="print the memory a workflow's training step needs, without "
                                                    "training (ComfyUI in this process)")
    add_estimate_arguments(estimate)
    argv = sys.argv[1:] if argv is None else list(argv)
    comfy_args: list[str] = []
    if argv[:1] in (["train"], ["estimate"]):  # after `--`: ComfyUI's own options, for its parser
        argv, comfy_args = split_comfy_args(argv)
    args = parser.parse_args(argv)
    args.comfy_args = comfy_args
    if args.command == "demo":
        try:
            import torch  # noqa: F401
        except ModuleNotFoundError:
            print("error: the demo needs torch; run it with the quick start's `bash scripts/demo.sh`, or "
                  "pip install torch", file=sys.stderr)
            return 2
        from .tiny.demo import run_demo

        run_demo(args.out, args.steps, args.kind, args.seed)
    if args.command == "run":
        from .headless.cli import run_command

        return run_command(args)
    if args.command == "estimate":
        from .headless.inprocess import estimate_command

        return estimate_command(args)
    if args.command == "train":
        from .headless.inprocess import train_command

        return train_command(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
