"""Training states on disk: safetensors for the tensors, JSON for the rest, never pickle.

A state is what `Trainer.state()` returns (training/loop.py): the fp32 LoRA, the optimizer's
state, the RNG states, the data order still pending, the step, the losses, the validation
history. Two files share a stem: `<stem>.state.safetensors` (tensors under "lora/<module
path>/<suffix>", "optimizer/<param index>/<name>", "rng/<name>", "ema/<parameter name>") and `<stem>.state.json` (numbers,
the optimizer's param groups and non-tensor entries, the config and the run's fingerprint). Both
are written atomically, the JSON last: a state whose JSON exists is complete.

Reading back (`read_state`) checks that the state fits this run (`check_fits`): settings that
give the state its shape (algorithm, rank, optimizer, …) and the training images' count and
shapes must match, else a ValueError names the mismatch; other settings (learning_rate, steps, …)
may change, with a warning naming each, since the run then differs from an uninterrupted one.
The model's layers are checked by `Trainer.load_state`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..lora.files import write_atomically
from ..lora.layers import LayerWeights
from .config import TrainConfig
from .loop import TrainState

log = logging.getLogger(__name__)

KIND = "comfyui-lora-trainer training state"
VERSION = 1
TENSORS, JSON = ".state.safetensors", ".state.json"

# Settings a state takes its shape from: a different value cannot continue it.
STRUCTURAL = ("algorithm", "rank", "network_alpha", "conv_rank", "conv_alpha", "lokr_factor", "target",
              "include_layers", "exclude_layers", "train_norms", "train_biases", "optimizer", "weight_decay",
              "lora_plus_ratio", "batch_order", "network_dropout", "rank_dropout", "module_dropout")
# How a run is kept, not what it trains: never compared.
RUN_CONTROL = ("save_every", "keep_last", "checkpoint_prefix", "resume")


def state_paths(stem: str | os.PathLike) -> tuple[Path, Path]:
    """(tensors file, JSON file) of the state with that stem."""
    stem = str(stem)
    return Path(stem + TENSORS), Path(stem + JSON)


def stem_of(path: str | os.PathLike) -> str:
    """The stem of a state from either of its files' paths."""
    text = str(path)
    for suffix in (JSON, TENSORS):
        if text.endswith(suffix):
            return text[: -len(suffix)]
    raise ValueError(f"resume: {path} is not a training state; give a file ending in {JSON}")


def _flat(entries: dict, prefix: str = "") -> dict[str, Any]:
    """A parameter's optimizer state with nested dicts (bitsandbytes' quantization state) as "a/b" names."""
    flat = {}
    for name, value in entries.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{name}/"))
        else:
            flat[prefix + name] = value
    return flat


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        where = nested
        for parent in parents:
            where = where.setdefault(parent, {})
        where[leaf] = value
    return nested


def _split_optimizer(optimizer: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, entries in optimizer["state"].items():
        for name, value in _flat(entries).items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value.detach().clone().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": optimizer["param_groups"], "scalars": scalars}


def write_state(stem: str | os.PathLike, state: TrainState, config: TrainConfig, fingerprint: dict[str, Any],
                extra: dict[str, Any] | None = None) -> Path:
    """Write both files of `state`; returns the JSON's path. `extra` joins the JSON (e.g. the checkpoint file)."""
    tensors = {f"lora/{path}/{suffix}": t.detach().clone().contiguous()
               for path, weights in state.lora.items() for suffix, t in weights.tensors.items()}
    optimizer_tensors, optimizer_rest = _split_optimizer(state.optimizer)
    tensors.update(optimizer_tensors)
    tensors.update({f"rng/{name}": t.clone() for name, t in state.rng.items()})
    tensors.update({f"ema/{name}": t.detach().clone().contiguous() for name, t in (state.ema or {}).items()})
    algorithms = {path: weights.algorithm for path, weights in state.lora.items()}
    record = {
        "kind": KIND, "version": VERSION, "step": state.step, "total_steps": state.total_steps, "loss": state.loss,
        "lr": state.lr, "losses": state.losses, "pending": state.pending,
        "validation": [list(v) for v in state.validation], "algorithms": algorithms, "optimizer": optimizer_rest,
        "config": asdict(config), "fingerprint": fingerprint, **(extra or {}),
    }
    tensors_path, json_path = state_paths(stem)
    write_atomically(tensors_path, lambda tmp: save_file(tensors, tmp), "training state")
    try:
        text = json.dumps(record, indent=1)
        write_atomically(json_path, lambda tmp: Path(tmp).write_text(text, "utf-8"), "training state")
    except BaseException:
        tensors_path.unlink(missing_ok=True)  # no half-written state
        raise
    return json_path


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON of a state (either file's path); ValueError naming `resume` if it is not one."""
    _, json_path = state_paths(stem_of(path))
    if not json_path.is_file():
        raise FileNotFoundError(f"resume: {json_path} does not exist; give 'latest' or the path of a {JSON} file")
    try:
        record = json.loads(json_path.read_text("utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"resume: {json_path} is not a readable training state ({err}); pick another") from None
    if not isinstance(record, dict) or record.get("kind") != KIND:
        raise ValueError(f"resume: {json_path} is not a training state of this node pack; pick a {JSON} file "
                         "written by Train LoRA")
    if record.get("version") != VERSION:
        raise ValueError(f"resume: {json_path} has training-state version {record.get('version')}, this version "
                         f"reads {VERSION}; continue it with existing_lora (its LoRA file) instead")
    problem = _schema_problem(record)
    if problem is not None:
        raise ValueError(f"resume: {json_path} is damaged ({problem}); pick another training state, or clear resume "
                         "to start fresh")
    return record


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _schema_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with a state's JSON, in words, or None: every entry the reader uses has its type,
    and the step agrees with the losses (one per step) and the total (step + a continued LoRA's steps)."""
    expected = {"step": _is_int, "total_steps": _is_int, "loss": _is_number, "lr": _is_number,
                "losses": lambda v: isinstance(v, list) and all(map(_is_number, v)),
                "pending": lambda v: isinstance(v, list) and all(map(_is_int, v)),
                "validation": lambda v: isinstance(v, list) and all(
                    isinstance(e, list) and len(e) == 2 and _is_int(e[0]) and _is_number(e[1]) for e in v),
                "algorithms": lambda v: isinstance(v, dict) and all(a is None or isinstance(a, str) for a in v.values()),
                "optimizer": lambda v: isinstance(v, dict) and isinstance(v.get("param_groups"), list)
                and isinstance(v.get("scalars"), dict) and all(isinstance(e, dict) for e in v["scalars"].values()),
                "config": lambda v: isinstance(v, dict),
                "fingerprint": lambda v: isinstance(v, dict) and isinstance(v.get("image_shapes", []), list),
                "checkpoints": lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v)}
    for key, valid in expected.items():
        if key not in record:
            if key == "checkpoints":
                continue
            return f"it has no {key!r} entry"
        if not valid(record[key]):
            return f"its {key!r} entry is {json.dumps(record[key])[:80]}, not what a training state holds"
    step, total, losses = record["step"], record["total_steps"], record["losses"]
    if step < 0 or len(losses) != step:
        return f"its step {step} disagrees with its {len(losses)} losses, one per step"
    if total < step:
        return f"its total_steps {total} is fewer than its step {step}"
    return None


def check_fits(record: dict[str, Any], config: TrainConfig, fingerprint: dict[str, Any], where: str) -> list[str]:
    """ValueError naming the first setting or input the state cannot continue with; returns the
    other settings that changed ("learning_rate 0.001 → 0.0005"), which the caller warns about."""
    saved = record["config"]
    now = asdict(config)
    for name in STRUCTURAL:
        if saved.get(name) != now[name]:
            raise ValueError(f"resume: the training state {where} was made with {name} {saved.get(name)!r}, this run "
                             f"has {now[name]!r}; set {name} back to {saved.get(name)!r}, or clear resume to start "
                             "fresh (existing_lora continues its LoRA with new settings)")
    ours, theirs = fingerprint, record["fingerprint"]
    if theirs.get("image_shapes") != ours.get("image_shapes"):
        n_then, n_now = len(theirs.get("image_shapes", [])), len(ours.get("image_shapes", []))
        what = f"{n_then} training images" if n_then != n_now else "training images of other sizes"
        raise ValueError(f"resume: the training state {where} was made with {what}, this run has {n_now}"
                         f"{'' if n_then != n_now else ' of sizes ' + str(ours.get('image_shapes'))[:200]}; "
                         "connect the same latents, or clear resume to start fresh")
    changed = [f"{name} {saved.get(name)!r} → {now[name]!r}" for name in now
               if name not in STRUCTURAL + RUN_CONTROL and saved.get(name) != now[name]]
    for key, label in (("images_sha256", "the training images' values"), ("captions", "the captions")):
        if theirs.get(key) != ours.get(key):
            changed.append(f"{label} changed")
    return changed


def read_state(path: str | os.PathLike, config: TrainConfig, fingerprint: dict[str, Any]) -> tuple[TrainState, dict]:
    """(TrainState, its JSON record) of a state that fits this run (`check_fits`); changed settings are logged."""
    record = read_record(path)
    tensors_path, json_path = state_paths(stem_of(path))
    if record["step"] > config.steps:
        raise ValueError(f"resume: the training state {json_path} is at step {record['step']}, past this run's steps "
                         f"{config.steps}; set steps to {record['step']} or more to continue it, or pick another")
    changed = check_fits(record, config, fingerprint, str(json_path))
    if changed:
        log.warning("Train LoRA: resuming %s with changed settings (%s); the run is no longer the one it would "
                    "have been uninterrupted", json_path, "; ".join(changed))
    try:
        tensors = load_file(str(tensors_path))
    except Exception as err:  # OSError, or safetensors' own error types
        raise ValueError(f"resume: cannot read {tensors_path} ({err}); pick another training state") from None
    lora: dict[str, dict[str, torch.Tensor]] = {}
    optimizer_state: dict[int, dict[str, Any]] = {}
    rng: dict[str, torch.Tensor] = {}
    ema: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "lora":
            path_, _, suffix = rest.rpartition("/")
            lora.setdefault(path_, {})[suffix] = tensor
        elif kind == "optimizer":
            index, _, name = rest.partition("/")
            optimizer_state.setdefault(int(index), {})[name] = tensor
        elif kind == "rng":
            rng[rest] = tensor
        elif kind == "ema":
            ema[rest] = tensor
    for index, entries in record["optimizer"]["scalars"].items():
        optimizer_state.setdefault(int(index), {}).update(entries)
    optimizer_state = {index: _nest(entries) for index, entries in optimizer_state.items()}
    state = TrainState(
        step=record["step"], total_steps=record["total_steps"], loss=record["loss"], lr=record["lr"],
        losses=list(record["losses"]),
        lora={p: LayerWeights(record["algorithms"].get(p), t) for p, t in lora.items()},
        optimizer={"state": optimizer_state, "param_groups": record["optimizer"]["param_groups"]},
        rng=rng, pending=list(record["pending"]), validation=[tuple(v) for v in record["validation"]],
        ema=ema or None)
    return state, record


def fingerprint(images: list[torch.Tensor], captions: int) -> dict[str, Any]:
    """What a state must be resumed with: the training images' shapes (the data order indexes them),
    a hash of their values and the number of caption entries (changes there only warn)."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {"image_shapes": [list(x.shape) for x in images], "images_sha256": digest.hexdigest(), "captions": captions}
