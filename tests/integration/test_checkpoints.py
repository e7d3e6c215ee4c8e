"""Checkpoints, cancel and resume in a real ComfyUI (docs/long-runs.md#checkpoints-and-resume).

One run of N steps straight through; the same run cancelled with POST /interrupt part-way (it
writes the checkpoint and training state of its last completed step), then queued again with the
options node's resume set to 'latest': the LoRA Save LoRA writes is bit-identical to the straight
run's, and the loss history is the same. A state is refused for a run it does not fit.
"""
from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

_spec = importlib.util.spec_from_file_location("it_nodes", Path(__file__).with_name("test_nodes.py"))
it = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(it)

STEPS = 16
RUN = {"steps": STEPS, "seed": 5, "batch_size": 2, "learning_rate": 1e-3}
OPTIONS_NODE = "9"


@pytest.fixture(scope="module")
def dataset(comfy) -> str:
    it._write_dataset(comfy.input_dir / it.DATASET, ["circle", "stripes", "sunset"])
    return it.DATASET


def graph(comfy, name: str, **options) -> dict:
    g = it.train_graph(comfy, prefix=f"loras/it_ckpt_final/{name}", **RUN)
    g[OPTIONS_NODE]["inputs"].update({"checkpoint_prefix": f"loras/it_ckpt/{name}", **options})
    g[it.TRAIN_NODE]["inputs"]["lr_schedule"] = "cosine"  # the schedule counts total steps across the resume
    return g


def saved_tensors(comfy, entry: dict) -> dict[str, torch.Tensor]:
    return load_file(str(comfy.output_dir / entry["outputs"][it.SAVE_NODE]["text"][0]))


def test_cancelled_then_resumed_run_equals_the_straight_run(comfy, dataset):
    straight = comfy.run(graph(comfy, "straight", save_every=4, keep_last=2), timeout=900)
    written = sorted(p.name for p in (comfy.output_dir / "loras/it_ckpt").glob("straight_*_steps_*"))
    assert written == ["straight_12_steps_00001_.safetensors", "straight_16_steps_00001_.safetensors"], written
    states = comfy.output_dir / "lora_training_states/loras/it_ckpt"
    assert (states / "straight_16_steps_00001_.state.json").is_file()

    mark = len(comfy.log())
    prompt_id = comfy.queue(graph(comfy, "cut"))
    deadline = time.monotonic() + 300
    while not re.search(rf"Train LoRA:.*\s([3-9])/{STEPS}", comfy.log(mark)):
        assert time.monotonic() < deadline, f"training never got going:\n{comfy.log(mark)[-3000:]}"
        time.sleep(0.05)
    comfy.interrupt()
    entry = comfy.wait(prompt_id, timeout=300)
    assert "execution_interrupted" in [event for event, _ in entry["status"]["messages"]], entry["status"]
    said = re.search(r"cancelled after (\d+) of 16 steps; the model is restored; the checkpoint and training state "
                     r"of step \1 are in (loras/it_ckpt/cut_\1_steps_00001_\.safetensors)", comfy.log(mark))
    assert said, comfy.log(mark)[-3000:]
    assert 0 < int(said.group(1)) < STEPS and (comfy.output_dir / said.group(2)).is_file()

    resumed = comfy.run(graph(comfy, "cut", resume="latest"), timeout=900)
    assert re.search(rf"resuming from .*cut_{said.group(1)}_steps_00001_\.state\.json at step {said.group(1)}",
                     comfy.log(mark))
    ours, theirs = saved_tensors(comfy, resumed), saved_tensors(comfy, straight)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "the resumed LoRA differs from the straight run's"
    assert resumed["outputs"][it.PLOT_NODE]["loss"] == straight["outputs"][it.PLOT_NODE]["loss"]


def test_a_state_is_refused_for_a_run_it_does_not_fit(comfy, dataset):
    comfy.run(_short(comfy), timeout=600)
    bad = _short(comfy, resume="latest")
    bad[it.TRAIN_NODE]["inputs"]["rank"] = 4
    _, error = it.run_failing(comfy, bad)
    assert re.search(r"resume: the training state .*fit_5_steps_00001_\.state\.json was made with rank 8, this run "
                     r"has 4; set rank back to 8", error), error


def _short(comfy, **options) -> dict:
    g = it.train_graph(comfy, prefix="loras/it_ckpt_final/fit", steps=5, seed=6)
    g[OPTIONS_NODE]["inputs"].update({"checkpoint_prefix": "loras/it_ckpt/fit", "save_every": 5, **options})
    return g
