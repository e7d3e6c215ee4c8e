"""`python -m comfyui_lora_trainer run WORKFLOW.json`: run an API-format workflow on a ComfyUI server.

Submits through POST /prompt, follows progress over the websocket (or polls /history), prints the
outputs, optionally downloads them; overrides, sweeps and repeats make one prompt per run, one
after another, and a summary table ends a multi-run call. Exit status: 0 every run succeeded,
1 a run failed (node error, refused workflow, server-side interrupt, --timeout), 2 bad arguments
or no server, 130 Ctrl-C (the running prompt is interrupted on the server first).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .client import DEFAULT_SERVER, ComfyHTTP, PromptRefused, ServerUnreachable
from .follow import RunState, RunTimeout, follow
from .progress import ProgressBar
from .report import (RunResult, download, extract_outputs, format_execution_error, format_outputs,
                     format_refusal, format_summary, lora_file)
from .workflow import Run, load_workflow, node_inputs_listing, parse_override, parse_sweep, plan_runs

EXAMPLES = """examples:
  %(prog)s example_workflows/api/train_lora.json --set "Train LoRA.steps=200" --set dataset.folder=my_set
  %(prog)s wf.json --sweep "Train LoRA.learning_rate=1e-4,5e-4,1e-3" --download out/
  %(prog)s wf.json --queue 3 --increment "Train LoRA.seed"
  %(prog)s wf.json --list                 (nodes, titles and inputs you can --set)

NODE is a node title or id; VALUE is JSON when it parses (200, 1e-4, true), else text. A text input
keeps the text as typed; write '"..."' for a JSON string."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comfyui_lora_trainer run")
    add_run_arguments(parser)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options, description and examples of `run`: for build_parser or a subparser in __main__."""
    parser.description = ("Run an API-format workflow (Workflow > Export (API)) on a ComfyUI server, "
                          "with a progress bar, and print its outputs.")
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    add("workflow", type=Path, help="API-format workflow JSON")
    add("--server", default=DEFAULT_SERVER, help=f"ComfyUI URL (default {DEFAULT_SERVER})")
    add("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
        help='override an input, e.g. "Train LoRA.steps=200" or 12.seed=5 (repeatable)')
    add("--sweep", action="append", default=[], metavar="NODE.INPUT=V1,V2,...",
        help="one run per value; several --sweep options run every combination")
    add("--queue", type=int, default=1, metavar="N", help="run each prompt N times (default 1)")
    add("--increment", metavar="NODE.INPUT",
        help="add the repeat index (0..N-1) to this integer input, e.g. a seed, so that repeats "
             "differ (ComfyUI answers an identical prompt from its cache)")
    add("--force", action="store_true",
        help="allow --set on a connected input, or on an input the workflow does not list")
    add("--no-ws", action="store_true", help="poll /history instead of the websocket (no progress bar)")
    add("--download", type=Path, metavar="DIR", help="fetch output images and LoRA files into DIR")
    add("--timeout", type=float, default=0, metavar="SECONDS",
        help="interrupt a run that takes longer than this (default 0: no limit)")
    add("--poll-interval", type=float, default=1.0, metavar="SECONDS", help="history polling period")
    add("--traceback", action="store_true", help="print the Python traceback of a failing node")
    add("--list", action="store_true", help="list the workflow's nodes and inputs, then exit")
    add("--dry-run", action="store_true", help="print the workflow of each run as JSON, then exit")


@dataclass
class Session:
    """What the runs of one call share: the server, the websocket (None: poll) and the output."""

    client: ComfyHTTP
    client_id: str
    ws: Any
    bar: ProgressBar
    args: argparse.Namespace


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def open_websocket(client: ComfyHTTP, client_id: str) -> tuple[Any, str | None]:
    """(connection, None), or (None, why) when the websocket cannot be used."""
    try:
        import websocket  # websocket-client
    except ImportError:
        return None, "the websocket-client package is not installed (pip install websocket-client)"
    try:
        return websocket.create_connection(client.ws_url(client_id), timeout=client.timeout), None
    except (websocket.WebSocketException, OSError) as e:
        return None, f"{type(e).__name__}: {e}"


def overrides_label(run: Run) -> str:
    """`learning_rate=1e-4 seed=1`, or NODE.INPUT=VALUE where input names repeat."""
    names = [o.input for o in run.varied]
    return " ".join(o.text if names.count(o.input) > 1 else f"{o.input}={o.raw}" for o in run.varied)


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (without the `run` word) and run; returns the exit status (see module doc)."""
    args = build_parser().parse_args(argv)
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Validate everything, then submit the runs; nothing is sent when an override is invalid."""
    try:
        workflow = load_workflow(args.workflow)
        if args.list:
            print(node_inputs_listing(workflow))
            return 0
        sets = [parse_override(spec) for spec in args.set]
        sweeps = [parse_sweep(spec) for spec in args.sweep]
        runs = plan_runs(workflow, sets, sweeps, args.queue, args.increment, args.force)
        client = ComfyHTTP(args.server)
    except (ValueError, FileNotFoundError) as e:
        return _error(str(e), 2)
    if args.dry_run:
        print(json.dumps({str(run.index): run.workflow for run in runs}, indent=2))
        return 0
    try:
        client.check()
    except ServerUnreachable as e:
        return _error(str(e), 2)
    except KeyboardInterrupt:
        return 130
    if args.queue > 1 and args.increment is None:
        print(f"note: --queue {args.queue} repeats identical prompts, which ComfyUI answers from its "
              'cache; add --increment "Train LoRA.seed" to train each time', file=sys.stderr)
    return run_all(client, runs, args)


def run_all(client: ComfyHTTP, runs: list[Run], args: argparse.Namespace) -> int:
    """Each run in turn; a summary table when there were several."""
    client_id = uuid.uuid4().hex
    bar = ProgressBar()
    ws, why = (None, "--no-ws") if args.no_ws else open_websocket(client, client_id)
    if ws is None and not args.no_ws:
        bar.note(f"note: no websocket ({why}); following by polling /history, without progress")
    session = Session(client, client_id, ws, bar, args)
    results: list[RunResult] = []
    code = 0
    try:
        for run in runs:
            result = execute_run(session, run, len(runs))
            results.append(result)
            if result.status == "cancelled":
                code = 130
                break
            code = code or (0 if result.status == "success" else 1)
    except ServerUnreachable as e:
        code = _error(str(e), 2)
    except RuntimeError as e:  # an unexpected HTTP answer, e.g. a 500 from /history
        code = _error(str(e), 1)
    except KeyboardInterrupt:
        code = 130
    finally:
        if session.ws is not None:
            session.ws.close()
    if len(runs) > 1:
        print("\n" + format_summary(results))
    return code


def execute_run(session: Session, run: Run, total: int) -> RunResult:
    """Submit one run, follow it, report it; Ctrl-C or --timeout interrupt it on the server."""
    label = overrides_label(run)
    if total > 1:
        print(f"\n== run {run.index}/{total}: {label or 'as in the workflow'}")
    try:
        prompt_id = session.client.queue_prompt(run.workflow, session.client_id)
    except PromptRefused as e:
        print(format_refusal(e.status, e.body, run.workflow), file=sys.stderr)
        return RunResult(run.index, label, "refused", None, None, None)
    except KeyboardInterrupt:
        return RunResult(run.index, label, "cancelled", None, None, None)
    state = RunState(prompt_id, run.workflow)
    timeout = session.args.timeout
    deadline = time.monotonic() + timeout if timeout > 0 else None
    try:
        if not follow(session.client, state, session.bar, session.ws, session.args.poll_interval, deadline):
            session.ws = None
    except (KeyboardInterrupt, RunTimeout) as stop:
        session.bar.close()
        session.client.interrupt(prompt_id)
        cancelled = isinstance(stop, KeyboardInterrupt)
        why = "Ctrl-C" if cancelled else str(stop)
        print(f"interrupted prompt {prompt_id} ({why}): sent POST /interrupt", file=sys.stderr)
        return RunResult(run.index, label, "cancelled" if cancelled else "timeout",
                         state.loss, state.steps(), None, prompt_id, state.validation_loss)
    return report_run(session, run, state, label)


def report_run(session: Session, run: Run, state: RunState, label: str) -> RunResult:
    """Print the outcome of a finished prompt (outputs or the node's error); its summary row."""
    items = extract_outputs(state.entry)
    if state.status == "success":
        if state.executed_nodes == 0 and state.cached_nodes > 0:
            print("note: every node came from ComfyUI's cache (an identical prompt ran before); "
                  "change an input, e.g. the seed, to train again", file=sys.stderr)
        print(f"prompt {state.prompt_id}: success\noutputs:\n{format_outputs(items, run.workflow)}")
        if session.args.download is not None:
            try:
                written = download(session.client, items, session.args.download)
                print(f"downloaded {len(written)} file(s) to {session.args.download}")
            except (ValueError, RuntimeError, OSError) as e:
                _error(f"--download {session.args.download}: {e}", 1)
                state.status = "download failed"
    elif state.status == "interrupted":
        print(f"prompt {state.prompt_id}: interrupted on the server", file=sys.stderr)
    else:
        error = format_execution_error(state.error, run.workflow, session.args.traceback) \
            if state.error else "no error message in the history"
        print(f"prompt {state.prompt_id}: error: {error}", file=sys.stderr)
    return RunResult(run.index, label, state.status, state.loss, state.steps(), lora_file(items),
                     state.prompt_id, state.validation_loss)
