"""Data-parallel training (training/distributed.py): two gloo processes launched by torchrun train the
single-process LoRA, through the real engine on the tiny model.

Each torchrun process runs tests/distributed_worker.py; the single-process reference runs the same
function here, without a process group. The processes sum their gradients, so both hold the same
weights bit for bit, and those equal the single-process run's up to float summation order.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfyui_lora_trainer.training.config import TrainConfig

WORKER = Path(__file__).with_name("distributed_worker.py")
_spec = importlib.util.spec_from_file_location("lora_trainer_distributed_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

FAST = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False, "learning_rate": 2e-3}
CASES = {
    # 6 images, batch 4: the shares are 2 + 2 of each batch
    "batch 4": {"steps": 5, "batch_size": 4, **FAST},
    # uneven shares (2 + 1), two micro-batches per step, epoch order, caption dropout's draws, noise options
    "batch 3, accumulation 2": {"steps": 4, "batch_size": 3, "gradient_accumulation": 2, "batch_order": "epoch",
                                "noise_offset": 0.05, "loss_weighting": "min_snr", **FAST},
    # batch 1: the second process has no rows at all in every step and still takes each step
    "batch 1": {"steps": 4, "batch_size": 1, **FAST},
    # a text encoder trained too (its adapters' gradients summed with the rest)
    "text encoder": {"steps": 4, "batch_size": 4, "text_encoder_lr": 1e-3, **FAST},
}


def launch(out: Path, settings: dict, processes: int = 2) -> None:
    """`torchrun --standalone` of the worker on `processes` gloo processes; every one must exit 0."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                           "--standalone", str(WORKER), str(out), json.dumps(settings)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def torchrun(out: Path, settings: dict, processes: int = 2) -> list[dict[str, torch.Tensor]]:
    """The LoRA of each process."""
    launch(out, settings, processes)
    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(processes)]


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("case", CASES)
def test_two_gloo_processes_train_the_single_process_lora(tmp_path, case):
    settings = CASES[case]
    ranks = torchrun(tmp_path / "ddp", settings)
    single = worker.run(tmp_path / "single", TrainConfig(**settings))
    assert_equal(ranks[0], ranks[1])  # the same summed gradient and optimizer step on both
    assert ranks[0].keys() == single.keys()
    trained = [k for k in single if k.endswith("lora_up.weight")]
    assert trained and all(single[k].abs().max() > 0 for k in trained)  # the LoRA moved from its zero init
    assert any(k.startswith("lora_te_") for k in trained) == bool(settings.get("text_encoder_lr"))
    # each layer's effect (up @ down, differences) equals the single run's up to float summation order
    # (measured: at most 3e-5 relative); training on half the batch moves every layer by 0.3 or more
    # (worker.lora_effects says why the factors themselves are not compared)
    errors = worker.relative_errors(single, ranks[0])
    assert max(errors.values()) < 5e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_a_two_process_checkpoint_resumes_under_two_processes(tmp_path):
    """6 steps straight == 3 steps (checkpoint + state written by rank 0) + resumed 3, all under 2 processes."""
    settings = {"steps": 6, "batch_size": 3, "save_every": 3, **FAST}
    straight = torchrun(tmp_path / "straight", settings)
    torchrun(tmp_path / "halves", {**settings, "steps": 3})
    states = list((tmp_path / "halves" / "output").rglob("*.state.json"))
    assert len(states) == 1, states  # rank 0 alone wrote it
    resumed = torchrun(tmp_path / "halves", {**settings, "resume": "latest"})
    assert_equal(resumed[0], resumed[1])
    assert_equal(resumed[0], straight[0])


def test_a_nan_on_one_process_stops_every_process_at_the_same_step(tmp_path):
    """Process 1's model returns NaN at its 3rd call (step 3): the summed loss is NaN on both, so both stop
    there (none waits forever in an all-reduce the other left), and rank 0 writes the last good state."""
    out = tmp_path / "nan"
    settings = {"steps": 6, "batch_size": 4, **FAST, "nan_on_rank": 1, "nan_at_call": 3}
    launch(out, settings)
    messages = [(out / f"rank{r}.diverged").read_text() for r in range(2)]
    assert all("the loss became nan at step 3;" in m for m in messages), messages
    assert "lora_2_steps_00001_.safetensors" in messages[0]  # rank 0's last good checkpoint (step 2)
    assert list((out / "output").rglob("*.safetensors")) and not (out / "rank0.safetensors").exists()


def test_a_cancel_on_one_process_cancels_every_process_at_the_same_step(tmp_path):
    """Process 1 asks to cancel after 2 steps (ComfyUI's interrupt, in a node): both stop there, and rank 0
    writes the checkpoint of step 2 to resume from."""
    out = tmp_path / "cancel"
    settings = {"steps": 6, "batch_size": 4, **FAST, "cancel_on_rank": 1, "cancel_after": 2}
    launch(out, settings)
    assert [(out / f"rank{r}.cancelled").read_text() for r in range(2)] == ["2", "2"]
    assert [p.name for p in (out / "output").rglob("*.state.json")] == ["lora_2_steps_00001_.state.json"]
