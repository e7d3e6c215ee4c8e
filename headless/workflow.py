"""API-format workflows: loading, finding nodes by id or title, `--set` overrides, `--sweep` plans.

The API format is what ComfyUI's "Export (API)" writes and what POST /prompt takes:
`{node_id: {"class_type": str, "inputs": {name: value}, "_meta": {"title": str}}}`. An input whose
value is a two-item list `[source_node_id, output_index]` is a link to another node's output, not a
widget value; overriding one needs `force` (it would cut the graph).

Override values are JSON when they parse as JSON (numbers, booleans, null, lists), else the text as
typed. An input whose current value is a string keeps the typed text unless it is a JSON string
literal, so `caption.text=1990` stays "1990" rather than becoming the number 1990.
"""
from __future__ import annotations

import copy
import difflib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Workflow = dict[str, dict[str, Any]]

# Node classes whose progress is "the training" (ours and ComfyUI core's), for step counts.
TRAIN_CLASS_TYPES = ("LoRATrainer_TrainLoRA", "TrainLoraNode")


@dataclass(frozen=True)
class Override:
    """`target.input=raw`: target is a node id or title as typed; raw is the value text."""

    target: str
    input: str
    raw: str

    @property
    def text(self) -> str:
        return f"{self.target}.{self.input}={self.raw}"


@dataclass(frozen=True)
class Run:
    """One prompt to submit: its 1-based index, what varies in it, and the finished workflow."""

    index: int
    varied: tuple[Override, ...]
    workflow: Workflow


def load_workflow(path: Path) -> Workflow:
    """Read an API-format workflow; UI-format files and malformed nodes get an error with the fix."""
    if not path.is_file():
        raise FileNotFoundError(f"workflow {path}: no such file; give the path of an API-format workflow JSON")
    try:
        data = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"workflow {path}: not valid JSON ({e}); give an API-format workflow: in ComfyUI, "
                         "Workflow > Export (API) saves one") from None
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # a saved POST /prompt body
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ValueError(f"workflow {path}: this is a UI-format workflow; in ComfyUI use "
                         "Workflow > Export (API) and pass that file")
    if not isinstance(data, dict) or not data:
        raise ValueError(f"workflow {path}: expected a JSON object {{node_id: {{class_type, inputs}}}}")
    for node_id, node in data.items():
        if not isinstance(node, dict) or "class_type" not in node or not isinstance(node.get("inputs"), dict):
            raise ValueError(f"workflow {path}: node {node_id!r} needs \"class_type\" and an \"inputs\" "
                             "object; export the workflow with Export (API)")
    return data


def title_of(node: dict[str, Any]) -> str:
    """The node's title (`_meta.title`), or its class type when it has none."""
    return str((node.get("_meta") or {}).get("title") or node["class_type"])


def describe(workflow: Workflow, node_id: str) -> str:
    """`node 5 "Train LoRA" (LoRATrainer_TrainLoRA)` for messages."""
    node = workflow.get(node_id)
    if node is None:
        return f"node {node_id}"
    return f'node {node_id} "{title_of(node)}" ({node["class_type"]})'


def is_link(value: Any) -> bool:
    """True for `[source_node_id, output_index]`, a connection rather than a value."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def parse_override(spec: str, option: str = "--set") -> Override:
    """`"Train LoRA.steps=200"` -> Override("Train LoRA", "steps", "200"); the last dot splits."""
    left, eq, raw = spec.partition("=")
    target, dot, name = left.strip().rpartition(".")
    if not eq or not dot or not target.strip() or not name.strip():
        raise ValueError(f'{option} {spec!r}: expected NODE.INPUT=VALUE with NODE a title or id, '
                         f'e.g. {option} "Train LoRA.steps=200"')
    return Override(target.strip(), name.strip(), raw)


def parse_sweep(spec: str) -> list[Override]:
    """`"Train LoRA.learning_rate=1e-4,5e-4"` -> one Override per value.

    Values are split on commas; a JSON list (`'caption.text=["a, b", "c"]'`) gives values that
    contain commas.
    """
    base = parse_override(spec, "--sweep")
    try:
        items = json.loads(base.raw)
    except json.JSONDecodeError:
        items = None
    if isinstance(items, list):
        values = [v if isinstance(v, str) else json.dumps(v) for v in items]
    else:
        values = [v.strip() for v in base.raw.split(",")]
    if not values or any(v == "" for v in values):
        raise ValueError(f"--sweep {spec!r}: needs comma-separated values without empty ones, "
                         f'e.g. --sweep "Train LoRA.learning_rate=1e-4,5e-4,1e-3"')
    return [Override(base.target, base.input, v) for v in values]


def coerce_value(raw: str, current: Any) -> Any:
    """JSON when `raw` parses, else the text; a string input keeps the text (see module doc)."""
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    if isinstance(current, str) and not isinstance(parsed, str):
        return raw
    return parsed


def find_node(workflow: Workflow, target: str, spec: str) -> str:
    """The id of the node `target` names: an id, else a title (exact, then any case), else a class."""
    if target in workflow:
        return target
    for key in (lambda n: title_of(n) == target, lambda n: title_of(n).lower() == target.lower(),
                lambda n: n["class_type"] == target):
        matches = [node_id for node_id, node in workflow.items() if key(node)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ValueError(f'{spec}: {len(matches)} nodes are called "{target}" (ids {", ".join(matches)}); '
                             f"use the id instead, e.g. {matches[0]}.INPUT=VALUE")
    listing = "; ".join(describe(workflow, node_id) for node_id in workflow)
    raise ValueError(f'{spec}: no node has the id or title "{target}"; the nodes are: {listing}')


def apply_override(workflow: Workflow, override: Override, force: bool = False) -> str:
    """Set one input in place (validated first); returns the node id. See the module doc."""
    node_id = find_node(workflow, override.target, override.text)
    inputs = workflow[node_id]["inputs"]
    name = override.input
    if name not in inputs and not force:
        close = difflib.get_close_matches(name, list(inputs), n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise ValueError(f'{override.text}: {describe(workflow, node_id)} has no input "{name}"{hint}; '
                         f'its inputs: {", ".join(inputs) or "none"}. An optional input the workflow '
                         "leaves at its default can be added with --force")
    current = inputs.get(name)
    if is_link(current) and not force:
        raise ValueError(f'{override.text}: input "{name}" of {describe(workflow, node_id)} is connected to '
                         f"node {current[0]} output {current[1]}, not a value; pass --force to replace "
                         "the connection")
    inputs[name] = coerce_value(override.raw, current)
    return node_id


def apply_overrides(workflow: Workflow, overrides: list[Override], force: bool = False) -> Workflow:
    """A deep copy of `workflow` with every override applied; the original is left as it was."""
    result = copy.deepcopy(workflow)
    for override in overrides:
        apply_override(result, override, force)
    return result


def increment_override(workflow: Workflow, spec: str, repeat: int) -> Override:
    """`--increment "Train LoRA.seed"`: an Override adding `repeat` to that integer input."""
    base = parse_override(f"{spec}=0", "--increment")
    node_id = find_node(workflow, base.target, f"--increment {spec}")
    current = workflow[node_id]["inputs"].get(base.input)
    if not isinstance(current, int) or isinstance(current, bool):
        raise ValueError(f'--increment {spec}: input "{base.input}" of {describe(workflow, node_id)} is '
                         f"{current!r}, not an integer; name an integer input such as a seed")
    return Override(base.target, base.input, str(current + repeat))


def plan_runs(workflow: Workflow, sets: list[Override], sweeps: list[list[Override]],
              repeats: int = 1, increment: str | None = None, force: bool = False) -> list[Run]:
    """Every prompt to submit, validated: `sets` apply to all; the sweep grid (all combinations of
    the `--sweep` values, the first sweep slowest) times `repeats`, each repeat adding its index
    (0, 1, ...) to the `increment` input."""
    if repeats < 1:
        raise ValueError(f"--queue {repeats}: must be 1 or more")
    base = apply_overrides(workflow, sets, force)
    runs: list[Run] = []
    for combo in itertools.product(*sweeps):
        swept = apply_overrides(base, list(combo), force)
        for repeat in range(repeats):
            varied = list(combo)
            if increment is not None:
                varied.append(increment_override(swept, increment, repeat))
            runs.append(Run(len(runs) + 1, tuple(varied), apply_overrides(swept, varied[len(combo):], force)))
    return runs


def node_inputs_listing(workflow: Workflow) -> str:
    """Every node with its settable inputs and current values (links shown as `<- node:output`)."""
    lines = []
    for node_id, node in workflow.items():
        lines.append(describe(workflow, node_id))
        for name, value in node["inputs"].items():
            shown = f"<- node {value[0]} output {value[1]}" if is_link(value) else json.dumps(value)
            lines.append(f"    {name} = {shown}")
    return "\n".join(lines)
