"""`python -m comfyui_lora_trainer train WORKFLOW.json`: run a workflow in this process, with ComfyUI
as a library (no server), and under `torchrun` data-parallel over N processes:

    torchrun --nproc-per-node 4 -m comfyui_lora_trainer train wf.json --set "Train LoRA.steps=2000"
    torchrun --nproc-per-node 2 -m comfyui_lora_trainer train wf.json -- --cpu   (gloo, CPU processes)

COMFYUI_DIR (or --comfyui) is a ComfyUI checkout; options after `--` are ComfyUI's own (its parser
reads them: --cpu, --base-directory, --output-directory, --lowvram, …). Every process loads ComfyUI,
its built-in and custom nodes (this pack among them) and executes the workflow the way ComfyUI's
prompt worker does (`execution.PromptExecutor`). Under torchrun the processes join one process group
(NCCL when CUDA is there and --cpu is not given, else gloo; each takes the GPU of its LOCAL_RANK)
and Train LoRA trains data-parallel (training/distributed.py). Rank 0 executes the whole workflow:
it writes the files (Save LoRA, Plot Loss Graph, checkpoints, previews) and prints progress; the
other ranks execute only the Train LoRA nodes and what feeds them. An error on any process ends
it with exit status 1, and torchrun stops the others. A training state saved under N processes
resumes under N processes (Train LoRA's `resume`): every rank reads it from the same output folder.

On a machine where torch sees no GPU, ComfyUI runs on the CPU (`--cpu` is added, with a note).

Exit status: 0 success, 1 the workflow failed or was refused, 2 bad arguments (no ComfyUI, no file,
a Python without torch or without ComfyUI's requirements).
"""
from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from .report import extract_outputs, format_outputs
from .workflow import TRAIN_CLASS_TYPES, Workflow, apply_overrides, load_workflow, parse_override

OUR_TRAIN_NODE = TRAIN_CLASS_TYPES[0]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run an API-format workflow in this process with ComfyUI as a library; under torchrun, "
                          "Train LoRA trains data-parallel over the processes.")
    parser.epilog = __doc__.split("\n\n", 2)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("workflow", type=Path, help="API-format workflow JSON")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help='override an input, e.g. "Train LoRA.steps=200" (repeatable)')
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_DIR"),
                        help="the ComfyUI checkout (default: $COMFYUI_DIR)")
    parser.usage = "%(prog)s WORKFLOW [--set NODE.INPUT=VALUE ...] [--comfyui DIR] [-- COMFYUI OPTIONS ...]"


def split_comfy_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our arguments, ComfyUI's): everything after the first `--` is ComfyUI's own options."""
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def _rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) when run directly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _import_comfyui(comfy_dir: Path, comfy_args: list[str], local_rank: int, distributed: bool):
    """ComfyUI's modules, its options parsed from `comfy_args`, its nodes loaded; the executor's server."""
    sys.path.insert(0, str(comfy_dir))
    os.chdir(comfy_dir)  # ComfyUI resolves some paths against its folder
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.argv = [str(comfy_dir / "main.py"), *comfy_args]
    from comfy.cli_args import args

    import torch
    if distributed and not args.cpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # before comfy.model_management picks its device
    import folder_paths

    for name, setter in (("output_directory", "set_output_directory"), ("input_directory", "set_input_directory"),
                         ("user_directory", "set_user_directory")):
        value = getattr(args, name, None)
        if value and hasattr(folder_paths, setter):
            getattr(folder_paths, setter)(os.path.abspath(value))
    import execution
    import nodes
    import server

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    prompt_server = server.PromptServer(loop)  # custom nodes reach it at import; it never listens here
    init = nodes.init_extra_nodes(init_custom_nodes=not getattr(args, "disable_all_custom_nodes", False))
    if inspect.isawaitable(init):
        loop.run_until_complete(init)
    _register_ours(nodes)
    return execution, prompt_server, loop


def _register_ours(nodes) -> None:
    """This pack's nodes, when ComfyUI's custom_nodes folder does not hold it (it runs as a package here)."""
    if OUR_TRAIN_NODE in nodes.NODE_CLASS_MAPPINGS:
        return
    from .. import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    nodes.NODE_CLASS_MAPPINGS.update(NODE_CLASS_MAPPINGS)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.update(NODE_DISPLAY_NAME_MAPPINGS)


def _make_executor(execution, prompt_server):
    """ComfyUI's PromptExecutor, keeping no outputs between prompts (there is one)."""
    parameters = inspect.signature(execution.PromptExecutor).parameters
    if "cache_type" in parameters:
        cache = getattr(execution.CacheType, "CLASSIC", False)
        return execution.PromptExecutor(prompt_server, cache_type=cache,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    return execution.PromptExecutor(prompt_server)


def _validate(execution, loop, prompt: Workflow, prompt_id: str) -> tuple[bool, Any, list[str], dict]:
    parameters = inspect.signature(execution.validate_prompt).parameters
    call = (execution.validate_prompt(prompt_id, prompt, None) if "partial_execution_list" in parameters
            else execution.validate_prompt(prompt))
    result = loop.run_until_complete(call) if inspect.isawaitable(call) else call
    valid, error, outputs, node_errors = result[:4]
    return valid, error, list(outputs), node_errors


def _has_accelerator(torch) -> bool:
    """Whether torch sees a device ComfyUI would use instead of the CPU (CUDA/ROCm, Intel XPU, Apple MPS)."""
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return (torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())
            or bool(mps is not None and mps.is_available()))


def _error_message(messages: list) -> str | None:
    for event, data in messages:
        if event == "execution_error":
            return (f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message')}")
        if event == "execution_interrupted":
            return "interrupted"
    return None


class _Refused(Exception):
    """A one-line error for the user and the exit status it ends with."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _say(text: str, stream=sys.stdout) -> None:
    """Print on rank 0 only (every rank runs the same command)."""
    if _rank()[0] == 0:
        print(text, file=stream, flush=True)


def _workflow(args: argparse.Namespace, world: int) -> tuple[Workflow, list[str]]:
    """The workflow with its overrides and its Train LoRA nodes; _Refused for a bad argument."""
    if not args.comfyui or not (Path(args.comfyui) / "execution.py").is_file():
        raise _Refused(f"--comfyui / COMFYUI_DIR: {args.comfyui or 'not set'} is not a ComfyUI checkout; set "
                       "COMFYUI_DIR to the folder that has main.py and execution.py")
    try:
        workflow = apply_overrides(load_workflow(args.workflow.resolve()), [parse_override(s) for s in args.set])
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise _Refused(str(err)) from None
    trainers = [node_id for node_id, node in workflow.items() if node["class_type"] == OUR_TRAIN_NODE]
    if world > 1 and not trainers:
        raise _Refused(f"{args.workflow}: no Train LoRA ({OUR_TRAIN_NODE}) node to train data-parallel")
    return workflow, trainers


def _torch(comfy_args: list[str]):
    """torch, with `--cpu` added to ComfyUI's options where it sees no GPU; _Refused without torch."""
    try:
        import torch
        import torch.distributed  # noqa: F401
    except ModuleNotFoundError as err:
        raise _Refused(f"this Python has no {err.name}; run `train` with ComfyUI's Python (the one that starts "
                       "ComfyUI, its requirements installed)") from None
    if "--cpu" not in comfy_args and not _has_accelerator(torch):
        _say("note: no GPU found, so ComfyUI runs on the CPU (as with `-- --cpu`)", sys.stderr)
        comfy_args.append("--cpu")
    return torch


def _execute(args: argparse.Namespace, comfy_args: list[str], workflow: Workflow, trainers: list[str]) -> int:
    """Run the workflow with ComfyUI in-process: rank 0 every output, the other ranks only the trainings."""
    rank, world, local_rank = _rank()
    try:
        execution, prompt_server, loop = _import_comfyui(Path(args.comfyui).resolve(), comfy_args, local_rank, world > 1)
    except ModuleNotFoundError as err:
        raise _Refused(f"ComfyUI cannot start in this Python: no module named {err.name!r}; run `train` with "
                       f"ComfyUI's Python, or install its requirements (pip install -r {args.comfyui}/requirements.txt)")
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = _validate(execution, loop, workflow, prompt_id)
    if not valid:
        raise _Refused(f"ComfyUI refused the workflow: {error}\n{json.dumps(node_errors, indent=2)}", 1)
    executor = _make_executor(execution, prompt_server)
    # rank 0 runs every output; the others only the trainings (and what feeds them): no file twice
    executor.execute(workflow, prompt_id, {}, outputs if rank == 0 else trainers)
    failure = _error_message(executor.status_messages) if not executor.success else None
    if failure is not None or not executor.success:
        print(f"error (rank {rank}): {failure or 'the workflow failed'}", file=sys.stderr, flush=True)
        return 1
    items = extract_outputs(getattr(executor, "history_result", None) or {})  # {"outputs": {node: ui}}
    _say(format_outputs(items, workflow) if items else "done (no outputs)")
    return 0


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Print the memory one training step of each Train LoRA in an API-format workflow needs "
                          "(docs/memory.md), without training: ComfyUI runs in this process up to Train LoRA, "
                          "which counts one step on fake tensors and stops.")
    parser.add_argument("workflow", type=Path, help="API-format workflow JSON")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help='override an input, e.g. "Train LoRA.batch_size=2" (repeatable)')
    parser.add_argument("--measure", action="store_true",
                        help="also run the same step for real and print what they held (slow at full size)")
    parser.add_argument("--json", type=Path, help="also write the estimates to this JSON file")
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_DIR"),
                        help="the ComfyUI checkout (default: $COMFYUI_DIR)")
    parser.usage = "%(prog)s WORKFLOW [--set NODE.INPUT=VALUE ...] [--measure] [--json PATH] [-- COMFYUI OPTIONS ...]"


def _mib(value: float) -> str:
    return f"{value / 1024:.2f} GiB" if value >= 1024 else f"{value:.1f} MiB"


def format_estimate(record: dict[str, Any]) -> str:
    """One Train LoRA's estimate (its JSON record) as lines for the terminal."""
    found = record["estimate"]
    parts = [(name, found[f"{name}_mib"]) for name in ("weights", "adapters", "gradients", "optimizer", "activations",
                                                       "transient")]
    extra = [(k[:-4], v) for k, v in found.items() if k.endswith("_mib") and k[:-4] not in dict(parts)
             and k not in ("step_mib", "total_mib")]
    lines = [f"Train LoRA (node {record.get('node', '?')}): {_mib(found['total_mib'])} on {found['device']} at the "
             f"peak of a step, batch {'×'.join(str(n) for n in found['batch'])}"]
    lines += [f"  {name:<12} {_mib(value)}" for name, value in parts + extra]
    verdict = "fits" if record["fits"] else "does NOT fit"
    lines.append(f"  {verdict}: {_mib(found['total_mib'] - found['weights_mib'])} above the loaded weights, "
                 f"{_mib(record['free_mib'])} free on {found['device']}")
    if record.get("cheapest"):
        lines.append(f"  cheapest settings that fit: {', '.join(record['cheapest'])}")
    measured = record.get("measured")
    if measured:
        ratio = found["step_mib"] / measured["step_mib"] if measured["step_mib"] else float("nan")
        lines.append(f"  measured in a real step: {_mib(measured['step_mib'])} above the weights "
                     f"(estimate/measured {ratio:.3f})")
    return "\n".join(lines)


def estimate_command(args: argparse.Namespace) -> int:
    """The `estimate` command: run the workflow's Train LoRA nodes (and what feeds them) in estimate mode."""
    from ..nodes.common import ESTIMATE_MODE, ESTIMATE_OUT
    comfy_args = list(getattr(args, "comfy_args", []))
    try:
        workflow, trainers = _workflow(args, 1)
        if not trainers:
            raise _Refused(f"{args.workflow}: no Train LoRA ({OUR_TRAIN_NODE}) node to estimate")
        _torch(comfy_args)
        execution, prompt_server, loop = _import_comfyui(Path(args.comfyui).resolve(), comfy_args, 0, False)
    except _Refused as refused:
        _say(f"error: {refused}", sys.stderr)
        return refused.code
    except ModuleNotFoundError as err:
        _say(f"error: ComfyUI cannot start in this Python: no module named {err.name!r}", sys.stderr)
        return 2
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "estimates.jsonl"
        os.environ[ESTIMATE_MODE], os.environ[ESTIMATE_OUT] = ("measure" if args.measure else "only"), str(out)
        for node in trainers:  # one at a time, so each record knows its node
            prompt_id = str(uuid.uuid4())
            valid, error, _, node_errors = _validate(execution, loop, workflow, prompt_id)
            if not valid:
                _say(f"error: ComfyUI refused the workflow: {error}\n{json.dumps(node_errors, indent=2)}", sys.stderr)
                return 1
            executor = _make_executor(execution, prompt_server)
            executor.execute(workflow, prompt_id, {}, [node])
            lines = out.read_text("utf-8").splitlines() if out.exists() else []
            out.unlink(missing_ok=True)
            if not lines:
                failure = _error_message(executor.status_messages) or "Train LoRA did not reach its first step"
                _say(f"error: Train LoRA (node {node}): {failure}", sys.stderr)
                return 1
            records += [{"node": node, **json.loads(line)} for line in lines]
    for record in records:
        _say(format_estimate(record))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1), "utf-8")
    return 0


def train_command(args: argparse.Namespace) -> int:
    """The `train` command: check the arguments, join the process group under torchrun, run the workflow."""
    world = _rank()[1]
    comfy_args = list(getattr(args, "comfy_args", []))
    try:
        workflow, trainers = _workflow(args, world)
        torch = _torch(comfy_args)
    except _Refused as refused:
        _say(f"error: {refused}", sys.stderr)
        return refused.code
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() and "--cpu" not in comfy_args else "gloo"
        torch.distributed.init_process_group(backend)
        _say(f"Train LoRA: {world} processes, {backend}")
    try:
        return _execute(args, comfy_args, workflow, trainers)
    except _Refused as refused:
        _say(f"error: {refused}", sys.stderr)
        return refused.code
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
