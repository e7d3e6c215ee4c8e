"""Following one queued prompt to its end: websocket events, or polling /history.

ComfyUI sends JSON text frames `{"type", "data"}` to the socket of the prompt's client_id
(execution.py, main.py): "status", "execution_start", "execution_cached" {nodes}, "executing"
{node, prompt_id} (node null: the prompt is finished and its history written), "progress" {value,
max, node, prompt_id}, "executed" {node, output, prompt_id}, "execution_error" {node_id,
node_type, exception_type, exception_message, traceback}, "execution_interrupted",
"execution_success"; binary frames are image previews and are skipped. The history entry is the
record of the finished run either way; the websocket only adds progress.

Train LoRA's own event, "lora_trainer.progress" (nodes/progress.py: step, total, loss,
smoothed_loss, lr, validation_loss, eta, ...; sent to this client_id only), gives the bar its numbers;
once a node has sent it, ComfyUI's plain "progress" for that node is left to it. Without a
websocket (--no-ws, or websocket-client missing) /history polling finds the end and the outputs,
without progress. A loss carried by a UI output ("executed" or the history entry) is used too.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from .client import ComfyHTTP
from .progress import ProgressBar
from .workflow import TRAIN_CLASS_TYPES, Workflow, title_of

WS_RECV_TIMEOUT = 5.0  # seconds without a message before /history is checked
TRAIN_EVENT = "lora_trainer.progress"  # nodes/progress.py EVENT (headless imports nothing of nodes/)


class RunTimeout(Exception):
    """The run did not finish within --timeout."""


@dataclass
class RunState:
    """What is known of one prompt: status "running" | "success" | "error" | "interrupted"."""

    prompt_id: str
    workflow: Workflow
    status: str = "running"
    error: dict | None = None
    loss: float | None = None
    validation_loss: float | None = None  # the latest, from Train LoRA's event
    progress: dict[str, tuple[int, int]] = field(default_factory=dict)  # node -> (value, max)
    executed_nodes: int = 0
    current_node: str | None = None  # the node executing now ("executing" messages)
    cached_nodes: int = 0
    done: bool = False
    entry: dict = field(default_factory=dict)  # the /history entry, once finished
    event_nodes: set[str] = field(default_factory=set)  # nodes that sent Train LoRA's event

    def steps(self) -> tuple[int, int] | None:
        """(value, max) of the training node's progress, else of the longest progress seen."""
        train = [n for n, node in self.workflow.items() if node["class_type"] in TRAIN_CLASS_TYPES]
        for node_id in train:
            if node_id in self.progress:
                return self.progress[node_id]
        return max(self.progress.values(), key=lambda p: p[1], default=None)


def loss_from(mapping: Any) -> float | None:
    """A loss carried by a message or UI output: `loss` as a number, text, or list (last item)."""
    value = mapping.get("loss") if isinstance(mapping, dict) else None
    if isinstance(value, list):
        value = value[-1] if value else None
    if isinstance(value, list):  # {"loss": [[...]]}: a list per call
        value = value[-1] if value else None
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def training_node(state: RunState, node: Any) -> str:
    """The node an event names, else the workflow's (first) training node."""
    if node is not None:
        return str(node)
    train = [n for n, spec in state.workflow.items() if spec["class_type"] in TRAIN_CLASS_TYPES]
    return train[0] if train else "?"


def handle_train_event(state: RunState, data: dict, bar: ProgressBar) -> None:
    """Train LoRA's "lora_trainer.progress": step/total, loss, smoothed loss, lr, validation, ETA; a phase (what
    runs before the first step or during a validation or preview) as a passing status."""
    node = training_node(state, data.get("node"))
    step, total = int(data.get("step") or 0), int(data.get("total") or 0)
    state.event_nodes.add(node)
    if data.get("event") == "phase":  # work besides the steps ("validation at step 0", 6 of 15)
        done, of = data.get("done"), data.get("of")
        bar.status(f"{label(state.workflow, node)}: {data.get('phase')}" + (f" {done}/{of}" if of else " ..."))
        return
    state.progress[node] = (step, total)
    for name in ("loss", "validation_loss"):
        found = _float(data.get(name))
        if found is not None:
            setattr(state, name, found)
    bar.update(label(state.workflow, node), step, total, state.loss, smoothed=_float(data.get("smoothed_loss")),
               validation=state.validation_loss, lr=_float(data.get("lr")), eta=_float(data.get("eta")))


def label(workflow: Workflow, node_id: Any) -> str:
    node = workflow.get(str(node_id))
    return title_of(node) if node is not None else f"node {node_id}"


def handle_event(state: RunState, event: dict, bar: ProgressBar) -> None:
    """Update `state` (and the bar) from one websocket message; other prompts' messages are ignored."""
    kind, data = event.get("type"), event.get("data")
    if not isinstance(data, dict):
        return
    if data.get("prompt_id") not in (None, state.prompt_id):
        return
    if kind == TRAIN_EVENT:
        handle_train_event(state, data, bar)
    elif kind == "progress":
        node, value, total = str(data.get("node")), int(data.get("value", 0)), int(data.get("max", 0))
        if node in state.event_nodes:  # Train LoRA's own event already told this, with more
            return
        state.progress[node] = (value, total)
        state.loss = loss_from(data) if loss_from(data) is not None else state.loss
        bar.update(label(state.workflow, node), value, total, state.loss)
    elif kind == "executing":
        state.current_node = None if data.get("node") is None else str(data["node"])
        state.done = state.current_node is None
        if not state.done:
            state.executed_nodes += 1
            bar.status(f"{label(state.workflow, state.current_node)} ...")
    elif kind == "executed":
        found = loss_from(data.get("output"))
        state.loss = found if found is not None else state.loss
    elif kind == "execution_cached":
        state.cached_nodes = len(data.get("nodes") or [])
    elif kind == "execution_error":
        state.status, state.error = "error", data
    elif kind == "execution_interrupted":
        state.status, state.error = "interrupted", data
    elif kind == "execution_success" and state.status == "running":
        state.status = "success"


def finish_from_history(state: RunState, entry: dict) -> None:
    """Take the final status, error and (if a UI output carries one) loss from the history entry."""
    status = entry.get("status") or {}
    for event, data in status.get("messages") or []:
        if event == "execution_error":
            state.status, state.error = "error", data
        elif event == "execution_interrupted":
            state.status, state.error = "interrupted", data
    if state.status == "running":
        state.status = "success" if status.get("status_str", "success") == "success" else "error"
    for output in (entry.get("outputs") or {}).values():
        found = loss_from(output)
        state.loss = found if found is not None else state.loss
    state.entry = entry
    state.done = True


def _check_deadline(deadline: float | None, prompt_id: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise RunTimeout(f"prompt {prompt_id} did not finish within --timeout")


def poll_history(client: ComfyHTTP, prompt_id: str, interval: float, deadline: float | None) -> dict:
    """GET /history/<id> every `interval` seconds until the prompt finished; its entry."""
    while True:
        entry = client.history_entry(prompt_id)
        if entry is not None:
            return entry
        _check_deadline(deadline, prompt_id)
        time.sleep(interval)


def follow_websocket(ws: Any, client: ComfyHTTP, state: RunState, bar: ProgressBar,
                     deadline: float | None) -> bool:
    """Read events until the prompt is done; False if the socket failed (then poll instead)."""
    import websocket  # websocket-client; only this path needs it

    ws.settimeout(WS_RECV_TIMEOUT)
    while not state.done:
        _check_deadline(deadline, state.prompt_id)
        try:
            message = ws.recv()
        except (websocket.WebSocketTimeoutException, TimeoutError):
            if client.history_entry(state.prompt_id) is not None:  # finished while we heard nothing
                return True
            continue
        except (websocket.WebSocketException, OSError):
            return False
        if isinstance(message, bytes):
            continue
        try:
            event = json.loads(message)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            handle_event(state, event, bar)
    return True


def follow(client: ComfyHTTP, state: RunState, bar: ProgressBar, ws: Any | None,
           interval: float = 1.0, deadline: float | None = None) -> bool:
    """Follow the run to its end and fill `state` from its history; True if the socket held."""
    bar.reset()
    socket_ok = ws is not None and follow_websocket(ws, client, state, bar, deadline)
    bar.close()
    if ws is not None and not socket_ok:
        bar.note("websocket closed; following by polling /history")
    finish_from_history(state, poll_history(client, state.prompt_id, interval, deadline))
    return socket_ok
