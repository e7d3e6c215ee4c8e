"""Following one queued prompt to its end: websocket events, or polling /history.

ComfyUI sends JSON text frames `{"type", "data"}` to the socket of the prompt's client_id
(execution.py, main.py): "status", "execution_start", "execution_cached" {nodes}, "executing"
{node, prompt_id} (node null: the prompt is finished and its history written), "progress" {value,
max, node, prompt_id}, "executed" {node, output, prompt_id}, "execution_error" {node_id,
node_type, exception_type, exception_message, traceback}, "execution_interrupted",
"execution_success"; binary frames are image previews and are skipped. The history entry is the
record of the finished run either way; the websocket only adds progress.

The loss: Train LoRA reports it on the server console only (its tqdm bar, `loss=0.1234`), so a
client subscribed to the console (`PATCH /internal/logs/subscribe`, an internal endpoint of the
ComfyUI frontend; best effort) gets "logs" {entries: [{t, m}]} messages and the last `loss=`
in them is shown while a training node of this prompt runs. The console is server-wide: on a
server that runs other jobs at the same time, that loss may be another job's. A loss carried by
a "progress" message or a UI output is used too.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from .client import ComfyHTTP
from .progress import ProgressBar
from .workflow import TRAIN_CLASS_TYPES, Workflow, title_of

WS_RECV_TIMEOUT = 5.0  # seconds without a message before /history is checked
LOSS_IN_LOG = re.compile(r"\bloss[=:]\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


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
    progress: dict[str, tuple[int, int]] = field(default_factory=dict)  # node -> (value, max)
    executed_nodes: int = 0
    current_node: str | None = None  # the node executing now ("executing" messages)
    cached_nodes: int = 0
    done: bool = False
    entry: dict = field(default_factory=dict)  # the /history entry, once finished

    def training_now(self) -> bool:
        node = self.workflow.get(self.current_node or "")
        return node is not None and node["class_type"] in TRAIN_CLASS_TYPES

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


def loss_from_logs(data: dict) -> float | None:
    """The last `loss=<number>` in a "logs" message's console entries."""
    found = None
    for entry in data.get("entries") or []:
        matches = LOSS_IN_LOG.findall(str(entry.get("m", ""))) if isinstance(entry, dict) else []
        found = float(matches[-1]) if matches else found
    return found


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
    if kind == "progress":
        node, value, total = str(data.get("node")), int(data.get("value", 0)), int(data.get("max", 0))
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
    elif kind == "logs" and state.training_now():  # the console is shared: only while we train
        found = loss_from_logs(data)
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
