"""Checkpoints of a run and resuming one: the files, their names, keep_last, and `resume`.

No ComfyUI import: the caller passes the output folder, so all of it tests offline.

A checkpoint is a LoRA file named as Save LoRA names its files, from the options node's
`checkpoint_prefix`: `<prefix>_<steps>_steps_<counter>_.safetensors` (steps counting a continued
LoRA's, as Save LoRA's `steps`), written in the full format (everything trained), with the file
metadata Save LoRA writes. Its training state (training/resume.py) goes under
`<output>/lora_training_states/` at the same relative path, `.state.safetensors` + `.state.json`:
not beside the LoRA, because every `.safetensors` under the loras folder would show up in every
LoRA list. keep_last deletes this run's older checkpoints (LoRA and state), never other runs'.

`resume`: "" starts fresh; "latest" takes the newest state (by time written) under the prefix's
name, or starts fresh when there is none; anything else is a state's path (its .json, its
.safetensors, or its checkpoint LoRA) relative to the output folder.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
import torch

from ..lora import save_lora_file
from ..lora.files import steps_name, steps_names
from ..lora.metadata import output_name
from ..training.config import TrainConfig
from ..training.loop import TrainState
from ..training.resume import JSON, TENSORS, fingerprint, read_record, read_state, state_paths, stem_of, write_state
from .lora_file import file_contents
from .paths import PrefixInput, next_free, output_target

log = logging.getLogger(__name__)

STATES_FOLDER = "lora_training_states"
CHECKPOINT_PREFIX = PrefixInput("checkpoint_prefix", "lora", "loras/checkpoints/my_lora")
LATEST = "latest"


class CheckpointWriter:
    """Writes a run's checkpoints (Hooks.save) and finds the state it resumes from (`resume()`)."""

    def __init__(self, output_dir: str | os.PathLike, config: TrainConfig, images: list[torch.Tensor], captions: int):
        self.output = Path(output_dir).resolve()
        self.config = config
        self.fingerprint = fingerprint(images, captions)
        self.folder, self.stem = output_target(self.output, config.checkpoint_prefix, CHECKPOINT_PREFIX)
        self.written: list[str] = []  # this run's checkpoints, relative to the output folder, oldest first
        self.protected: str | None = None  # the checkpoint `resume` named by path: keep_last never deletes it

    def state_stem(self, lora_path: Path) -> Path:
        """Where the training state of the checkpoint `lora_path` goes (without its suffixes)."""
        relative = lora_path.relative_to(self.output)
        return self.output / STATES_FOLDER / relative.with_suffix("")

    def save(self, state: TrainState, lora: dict, reason: str) -> str:
        """Write the checkpoint of `state` and its training state; returns the checkpoint's path (relative)."""
        steps = state.total_steps
        # an older run's state under this name (its LoRA deleted) keeps its counter: never overwritten
        path = next_free(self.folder, lambda n: steps_name(self.stem, steps, n),
                         lambda lora: any(p.exists() for p in state_paths(self.state_stem(lora))))
        sd, metadata = file_contents(lora, steps, "full")
        metadata.update(output_name(self.stem))  # as Save LoRA: the prefix's name, without step and counter
        save_lora_file(path, sd, metadata)
        relative = path.relative_to(self.output).as_posix()
        try:
            write_state(self.state_stem(path), state, self.config, self.fingerprint,
                        {"lora_file": relative, "reason": reason, "checkpoints": [*self.written, relative]})
        except BaseException:
            path.unlink(missing_ok=True)  # a checkpoint without its state is no checkpoint
            raise
        self.written.append(relative)
        self._prune()
        log.info("Train LoRA: checkpoint at step %d (%s): %s", state.step, reason, relative)
        return relative

    def _prune(self) -> None:
        keep = self.config.keep_last
        while keep and len(self.written) > keep:
            relative = self.written.pop(0)
            if relative == self.protected:
                continue
            old = self.output / relative
            for path in (old, *state_paths(self.state_stem(old))):
                path.unlink(missing_ok=True)

    def is_ours(self, relative: str) -> bool:
        """Whether a checkpoint (relative to the output folder) is named by this run's prefix: keep_last
        acts on those alone, also after resuming a state from another prefix."""
        path = self.output / relative
        return path.parent == self.folder and steps_names(self.stem).match(path.name) is not None

    def resume(self) -> TrainState | None:
        """The state `config.resume` names, checked against this run; None to start fresh."""
        wanted = self.config.resume.strip()
        if not wanted:
            return None
        json_path = self._latest() if wanted == LATEST else self._named(wanted)
        if json_path is None:
            log.info("Train LoRA: resume is 'latest' but there is no training state for %s yet; starting fresh",
                     self.config.checkpoint_prefix)
            return None
        state, record = read_state(json_path, self.config, self.fingerprint)
        self.written = [p for p in record.get("checkpoints", []) if self.is_ours(p) and (self.output / p).exists()]
        if wanted != LATEST:
            self.protected = record.get("lora_file")
        log.info("Train LoRA: resuming from %s at step %d of %d", json_path, state.step, self.config.steps)
        return state

    def _latest(self) -> Path | None:
        folder = self.output / STATES_FOLDER / self.folder.relative_to(self.output)
        name = steps_names(self.stem, JSON)
        found = [p for p in folder.glob(f"*{JSON}") if name.match(p.name)] if folder.is_dir() else []
        return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name), default=None)

    def _named(self, wanted: str) -> Path:
        path = (self.output / wanted.replace("\\", "/")).resolve()
        if self.output not in path.parents:
            raise ValueError(f"resume: {wanted!r} points outside the output folder; give 'latest' or a path relative "
                             f"to it, like '{STATES_FOLDER}/loras/checkpoints/lora_100_steps_00001_{JSON}'")
        if path.suffix == ".safetensors" and not str(path).endswith(TENSORS):  # a checkpoint LoRA: its state
            path = self.state_stem(path)
            path = path.with_name(path.name + JSON)
        json_path = state_paths(stem_of(path))[1]
        if not json_path.is_file():
            raise FileNotFoundError(f"resume: no training state at {json_path}; give 'latest', or the path of a "
                                    f"{JSON} file under {STATES_FOLDER}/ (relative to the output folder)")
        read_record(json_path)
        return json_path

