"""What a headless run prints: outputs from the history entry, errors, the sweep summary table.

Outputs come from `/history/<id>` -> `outputs`: `{node_id: {"images": [{"filename", "subfolder",
"type"}], "text": [str]}}` (ComfyUI's UI outputs; our Save LoRA returns `{"ui": {"text": [path
relative to the output folder]}}`). Validation refusals are POST /prompt's HTTP 400 body
`{"error": {"type", "message", "details"}, "node_errors": {id: {"errors": [...], "class_type"}}}`.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..lora.files import write_atomically
from .client import ComfyHTTP
from .progress import format_loss
from .workflow import Workflow, describe

LORA_SUFFIX = ".safetensors"
MAX_DETAIL = 400  # characters of a validation detail (a combo's full choice list can be huge)


@dataclass(frozen=True)
class OutputItem:
    """One UI output: an image (filename, subfolder, type) or a text entry (`text`)."""

    node: str
    kind: str  # "image" | "text"
    filename: str = ""
    subfolder: str = ""
    type: str = ""
    text: str = ""

    @property
    def is_lora(self) -> bool:
        return self.kind == "text" and self.text.endswith(LORA_SUFFIX)


@dataclass(frozen=True)
class RunResult:
    """One row of the summary."""

    index: int
    overrides: str
    status: str
    loss: float | None
    steps: tuple[int, int] | None
    lora: str | None
    prompt_id: str | None = None
    validation_loss: float | None = None  # the latest, from Train LoRA's event


def extract_outputs(entry: dict) -> list[OutputItem]:
    """Every image and text entry of the history entry's outputs, in node order."""
    items: list[OutputItem] = []
    for node_id, output in (entry.get("outputs") or {}).items():
        if not isinstance(output, dict):
            continue
        for image in output.get("images") or []:
            if isinstance(image, dict) and image.get("filename"):
                items.append(OutputItem(str(node_id), "image", str(image["filename"]),
                                        str(image.get("subfolder", "")), str(image.get("type", "output"))))
        for text in output.get("text") or []:
            items.append(OutputItem(str(node_id), "text", text=str(text)))
    return items


def format_outputs(items: list[OutputItem], workflow: Workflow) -> str:
    """`  node 6 "Save LoRA" (LoRATrainer_SaveLoRA): text loras/x_200_steps_00001_.safetensors`."""
    if not items:
        return "  (no outputs)"
    lines = []
    for item in items:
        where = describe(workflow, item.node)
        if item.kind == "image":
            path = posixpath.join(item.subfolder, item.filename) if item.subfolder else item.filename
            lines.append(f"  {where}: image {path} ({item.type})")
        else:
            lines.append(f"  {where}: text {item.text}")
    return "\n".join(lines)


def lora_file(items: list[OutputItem]) -> str | None:
    """The last LoRA file a node reported (a text output ending in .safetensors)."""
    files = [item.text for item in items if item.is_lora]
    return files[-1] if files else None


def format_execution_error(error: dict, workflow: Workflow, traceback: bool = False) -> str:
    """`node 5 "Train LoRA" (LoRATrainer_TrainLoRA) failed: ValueError: ...` (+ traceback)."""
    node_id = str(error.get("node_id", "?"))
    where = describe(workflow, node_id) if node_id in workflow else f"node {node_id} ({error.get('node_type', '?')})"
    kind = error.get("exception_type") or "error"
    text = f"{where} failed: {kind}: {error.get('exception_message', '').strip()}"
    if traceback and error.get("traceback"):
        text += "\n" + "".join(error["traceback"]).rstrip()
    return text


def format_refusal(status: int, body: Any, workflow: Workflow) -> str:
    """ComfyUI's HTTP 400 from POST /prompt as readable lines, one per node error."""
    if not isinstance(body, dict):
        return f"ComfyUI refused the workflow (HTTP {status}): {str(body)[:MAX_DETAIL]}"
    error = body.get("error") or {}
    message = error.get("message", "invalid prompt") if isinstance(error, dict) else str(error)
    lines = [f"ComfyUI refused the workflow (HTTP {status}): {message}"]
    node_errors = body.get("node_errors") or {}
    for node_id, info in node_errors.items():
        for item in (info or {}).get("errors", []):
            detail = str(item.get("details", ""))[:MAX_DETAIL]
            lines.append(f"  {describe(workflow, str(node_id))}: {item.get('message', '')}"
                         + (f": {detail}" if detail else ""))
    if not node_errors and isinstance(error, dict) and error.get("details"):
        lines.append(f"  {str(error['details'])[:MAX_DETAIL]}")
    return "\n".join(lines)


def format_summary(results: list[RunResult]) -> str:
    """An aligned table: run, overrides, status, final loss, (validation loss, when a run had one,)
    steps, LoRA file."""
    validated = any(r.validation_loss is not None for r in results)
    header = ("run", "overrides", "status", "final loss", *(("val loss",) if validated else ()), "steps", "LoRA file")
    rows = [header] + [(str(r.index), r.overrides or "-", r.status, format_loss(r.loss),
                        *((format_loss(r.validation_loss),) if validated else ()),
                        f"{r.steps[0]}/{r.steps[1]}" if r.steps else "-", r.lora or "-")
                       for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _safe_destination(root: Path, subfolder: str, filename: str) -> Path:
    """root/subfolder/filename, refusing names that would leave `root` (a hostile server)."""
    destination = (root / subfolder / filename).resolve()
    if root.resolve() not in destination.parents:
        raise ValueError(f"--download: refusing {subfolder}/{filename}: it would leave {root}")
    return destination


def write_atomic(path: Path, data: bytes) -> None:
    """A downloaded file, written atomically (lora/files.py), replacing an earlier download of the same name."""
    write_atomically(path, lambda tmp: Path(tmp).write_bytes(data), "download", overwrite=True)


def download(client: ComfyHTTP, items: list[OutputItem], root: Path) -> list[Path]:
    """Fetch every image and LoRA file through GET /view into `root/<subfolder>/<filename>`."""
    written = []
    for item in items:
        if item.kind == "image":
            source = (item.filename, item.subfolder, item.type)
        elif item.is_lora:  # relative to the output folder
            folder, name = posixpath.split(item.text)
            source = (name, folder, "output")
        else:
            continue
        destination = _safe_destination(root, source[1], source[0])
        write_atomic(destination, client.view(*source))
        written.append(destination)
    return written
