"""Checkpoints and resume on disk (training/resume.py, nodes/checkpoints.py), on the tiny model.

The proof the issue asks for: N steps in one run equal N/2 steps, a checkpoint on disk, and a
resumed N/2 — the LoRA bit-identical; also after a cancel in the middle, and after a NaN step.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from comfyui_lora_trainer.nodes.checkpoints import STATES_FOLDER, CheckpointWriter
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import Hooks, TrainingDiverged, train
from comfyui_lora_trainer.training.resume import JSON, TENSORS
from comfyui_lora_trainer.training.validation import Validation

FAST = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)
# a schedule counting total steps, warmup, dropout (its own RNG stream) and the epoch order: all must resume
CONFIG = TrainConfig(steps=8, batch_size=2, learning_rate=2e-3, lr_schedule="cosine", warmup_steps=2,
                     batch_order="epoch", rank_dropout=0.2, noise_offset=0.05, **FAST)


def setup(n: int = 5, regular: int = 0):
    """The tiny model, its callables (captions for `n` images and `regular` regularisation images, the empty
    caption, the preservation caption) and the training latents."""
    model = build_tiny("eps")
    dim = model.net.config.context_dim
    contexts = encode_captions(["a ramp, lrtstyle"] * n + ["a ramp"] * regular, dim)
    fns = tiny_fns(model, contexts, encode_captions([""], dim), encode_captions(["a ramp"], dim))
    latents = torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    return model, fns, latents


REGULAR = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(5))  # a regularisation set


def run(tmp_path, config, *, cancel_at=None, validate_every=None, regular=False):
    """train() with a CheckpointWriter on `tmp_path` as the output folder; cancel before step `cancel_at`+1;
    with `validate_every`, a validation loss on two held-out latents; `regular`: with a regularisation set."""
    model, fns, latents = setup(regular=len(REGULAR) if regular else 0)
    writer = CheckpointWriter(tmp_path, config, list(latents.unbind(0)), 1)
    resume = writer.resume()
    held_out = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(11))
    validator = Validation(fns, held_out, config, validate_every, 2) if validate_every else None
    seen = []
    hooks = Hooks(on_step=lambda s: seen.append(s.step),
                  should_cancel=(lambda: bool(seen) and seen[-1] == cancel_at) if cancel_at else None,
                  save=writer.save)
    return train(model.net, fns, latents, config, hooks=hooks, resume=resume, validator=validator,
                 regularization=REGULAR if regular else None), writer


def assert_same_lora(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# the memory levers keep their state in the same files: 8-bit moments (bitsandbytes' nested quantization
# state), and one optimizer per parameter stepped in the backward pass; the EMA's averages; the optional
# optimizers' states (schedule-free's z, Lion's and CAME's moments); preservation and the regularisation set
# draw from the run's generator
PRESERVING = {"ema_decay": 0.9, "ema_every": 2, "dop_multiplier": 1.0, "trigger_word": "lrtstyle",
              "blank_prompt_multiplier": 0.5, "regular": True}


@pytest.mark.parametrize("lever", [{}, {"optimizer": "AdamW8bit"}, {"step_in_backward": True},
                                   {"step_in_backward": True, "optimizer_on_cpu": True}, PRESERVING,
                                   {"optimizer": "AdamWScheduleFree", "lr_schedule": "constant", "ema_decay": 0.9},
                                   {"optimizer": "Lion"}, {"optimizer": "CAME"}],
                         ids=["plain", "AdamW8bit", "step_in_backward", "optimizer_on_cpu", "ema_dop_prior",
                              "schedule_free_ema", "Lion", "CAME"])
def test_half_then_resumed_half_is_bit_identical_to_one_run(tmp_path, lever):
    lever = dict(lever)
    regular = lever.pop("regular", False)
    config = replace(CONFIG, **lever)
    run = functools.partial(globals()["run"], regular=regular)
    straight, _ = run(tmp_path / "one", config)
    first, writer = run(tmp_path / "two", replace(config, save_every=4))
    assert writer.written == ["loras/checkpoints/lora_4_steps_00001_.safetensors",
                              "loras/checkpoints/lora_8_steps_00001_.safetensors"]
    # drop the final checkpoint: resume from the middle one
    (tmp_path / "two" / writer.written[1]).unlink()
    for suffix in (TENSORS, JSON):
        (tmp_path / "two" / STATES_FOLDER / "loras/checkpoints" / f"lora_8_steps_00001_{suffix}").unlink()
    second, _ = run(tmp_path / "two", replace(config, resume="latest"))
    assert second.total_steps == 8 and second.losses == straight.losses
    assert_same_lora(second.lora, straight.lora)
    assert_same_lora(first.lora, straight.lora)


def test_cancel_writes_the_last_completed_step_and_resume_finishes_bit_identically(tmp_path):
    straight, _ = run(tmp_path / "one", CONFIG)
    cancelled, writer = run(tmp_path / "two", CONFIG, cancel_at=3)  # save_every off: the cancel still writes
    assert cancelled.cancelled and cancelled.total_steps == 3
    assert cancelled.checkpoint == "loras/checkpoints/lora_3_steps_00001_.safetensors"
    resumed, _ = run(tmp_path / "two", replace(CONFIG, resume="latest"))
    assert not resumed.cancelled and resumed.losses == straight.losses
    assert_same_lora(resumed.lora, straight.lora)


def test_the_validation_history_resumes_with_the_run(tmp_path):
    straight, _ = run(tmp_path / "one", CONFIG, validate_every=3)
    run(tmp_path / "two", CONFIG, cancel_at=4, validate_every=3)
    resumed, _ = run(tmp_path / "two", replace(CONFIG, resume="latest"), validate_every=3)
    assert [step for step, _ in straight.validation] == [0, 3, 6, 8]
    assert resumed.validation == straight.validation  # the values before the cancel come from the state
    assert_same_lora(resumed.lora, straight.lora)


class Interrupt(Exception):
    """Stands in for ComfyUI's InterruptProcessingException, which its ops raise inside the model."""


def test_a_cancel_raised_inside_the_model_mid_step_keeps_the_last_completed_step(tmp_path):
    config = replace(CONFIG, gradient_accumulation=2)  # the cancel lands between two micro-batches
    straight, _ = run(tmp_path / "one", config)
    model, fns, latents = setup()
    calls = {"n": 0}

    def interrupted(noisy, sigma, indices):
        calls["n"] += 1
        if calls["n"] == 7:  # the 2nd micro-batch of step 4 (one forward per micro-batch of one shape)
            raise Interrupt()
        return fns.denoise(noisy, sigma, indices)

    writer = CheckpointWriter(tmp_path / "two", config, list(latents.unbind(0)), 1)
    cut = train(model.net, fns._replace(denoise=interrupted), latents, config,
                hooks=Hooks(save=writer.save, cancel_errors=(Interrupt,)))
    assert cut.cancelled and cut.total_steps == 3 and cut.checkpoint.endswith("lora_3_steps_00001_.safetensors")
    resumed, _ = run(tmp_path / "two", replace(config, resume="latest"))
    assert resumed.losses == straight.losses
    assert_same_lora(resumed.lora, straight.lora)


def test_a_cancel_inside_the_validation_loss_resumes_to_the_same_history(tmp_path):
    straight, _ = run(tmp_path / "one", CONFIG, validate_every=3)
    model, fns, latents = setup()
    held_out = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(11))
    validation = Validation(fns, held_out, CONFIG, 3, 2)
    calls = {"n": 0}

    class Cut:  # measures at step 0, then a cancel arrives while measuring after step 3
        every = 3

        def loss(self):
            calls["n"] += 1
            if calls["n"] == 2:
                raise Interrupt()
            return validation.loss()

    writer = CheckpointWriter(tmp_path / "two", CONFIG, list(latents.unbind(0)), 1)
    cut = train(model.net, fns, latents, CONFIG, validator=Cut(),
                hooks=Hooks(save=writer.save, cancel_errors=(Interrupt,)))
    assert cut.cancelled and cut.total_steps == 3 and [s for s, _ in cut.validation] == [0]
    resumed, _ = run(tmp_path / "two", replace(CONFIG, resume="latest"), validate_every=3)
    assert resumed.validation == straight.validation  # step 3 measured on resuming
    assert_same_lora(resumed.lora, straight.lora)


def test_named_state_resumes_from_its_checkpoint_path_or_json(tmp_path):
    straight, _ = run(tmp_path / "one", CONFIG)
    run(tmp_path / "two", replace(CONFIG, save_every=3, steps=8))  # checkpoints at 3, 6, 8
    for name in ("loras/checkpoints/lora_3_steps_00001_.safetensors",
                 f"{STATES_FOLDER}/loras/checkpoints/lora_6_steps_00001_{JSON}"):
        resumed, _ = run(tmp_path / "two", replace(CONFIG, resume=name))
        assert_same_lora(resumed.lora, straight.lora)


def test_files_are_safetensors_and_json_with_the_step_config_and_order(tmp_path):
    _, writer = run(tmp_path, replace(CONFIG, save_every=4))
    stem = tmp_path / STATES_FOLDER / "loras/checkpoints/lora_4_steps_00001_"
    record = json.loads(stem.with_name(stem.name + JSON).read_text())
    assert record["step"] == 4 and record["config"]["learning_rate"] == CONFIG.learning_rate
    assert record["lora_file"] == writer.written[0] and "pending" in record and len(record["losses"]) == 4
    with safe_open(str(stem) + TENSORS, "pt") as f:
        kinds = {k.split("/")[0] for k in f.keys()}
    assert kinds == {"lora", "optimizer", "rng"}
    # the checkpoint LoRA is a normal LoRA file with Save LoRA's metadata and its steps
    with safe_open(str(tmp_path / writer.written[0]), "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "4" and meta["ss_network_module"] == "networks.lora"
    assert meta["lora_trainer.format"] == "full" and meta["ss_output_name"] == "lora"


def test_keep_last_deletes_only_this_runs_older_checkpoints(tmp_path):
    other = tmp_path / "loras/checkpoints/lora_1_steps_00001_.safetensors"  # another run's file
    other.parent.mkdir(parents=True)
    other.write_bytes(b"not ours")
    _, writer = run(tmp_path, replace(CONFIG, save_every=2, keep_last=2))
    left = sorted(p.name for p in (tmp_path / "loras/checkpoints").iterdir())
    assert left == ["lora_1_steps_00001_.safetensors", "lora_6_steps_00001_.safetensors",
                    "lora_8_steps_00001_.safetensors"]
    states = sorted(p.name for p in (tmp_path / STATES_FOLDER / "loras/checkpoints").iterdir())
    assert states == [f"lora_{s}_steps_00001_{x}" for s in (6, 8) for x in (JSON, TENSORS)]


def test_nan_keeps_the_last_good_lora_and_state_and_says_where(tmp_path):
    config = replace(CONFIG, steps=6)
    model, fns, latents = setup()
    calls = {"n": 0}

    def poisoned(noisy, sigma, indices):  # the 4th step's loss turns NaN
        calls["n"] += 1
        out = fns.denoise(noisy, sigma, indices)
        return out * float("nan") if calls["n"] == 4 else out

    writer = CheckpointWriter(tmp_path, config, list(latents.unbind(0)), 1)
    with pytest.raises(TrainingDiverged) as err:
        train(model.net, fns._replace(denoise=poisoned), latents, config, hooks=Hooks(save=writer.save))
    assert "lora_3_steps_00001_.safetensors" in str(err.value) and err.value.last_good.total_steps == 3
    # the last good state resumes into exactly the uninterrupted run
    straight, _ = run(tmp_path / "one", config)
    resumed, _ = run(tmp_path, replace(config, resume="latest"))
    assert_same_lora(resumed.lora, straight.lora)


@pytest.mark.parametrize("change, named", [(dict(rank=4), "rank"), (dict(optimizer="SGD"), "optimizer"),
                                           (dict(algorithm="dora"), "algorithm")])
def test_a_state_that_does_not_fit_is_refused_naming_the_setting(tmp_path, change, named):
    run(tmp_path, replace(CONFIG, save_every=4))
    with pytest.raises(ValueError, match=rf"^resume: .* made with {named} .*set {named} back"):
        run(tmp_path, replace(CONFIG, resume="latest", **change))


def test_other_images_are_refused_and_changed_learning_settings_warn(tmp_path, caplog):
    run(tmp_path, replace(CONFIG, save_every=4))
    model, fns, latents = setup(n=4)
    with pytest.raises(ValueError, match="made with 5 training images, this run has 4"):
        CheckpointWriter(tmp_path, replace(CONFIG, resume="latest"), list(latents.unbind(0)), 1).resume()
    with caplog.at_level(logging.WARNING):
        resumed, _ = run(tmp_path, replace(CONFIG, resume="latest", learning_rate=1e-3))
    assert "learning_rate 0.002 → 0.001" in caplog.text and resumed.total_steps == 8


def test_a_state_of_another_model_is_refused_naming_a_layer(tmp_path):
    run(tmp_path, replace(CONFIG, save_every=4))
    writer = CheckpointWriter(tmp_path, replace(CONFIG, resume="latest", include_layers="attn"),
                              list(setup()[2].unbind(0)), 1)
    with pytest.raises(ValueError, match="include_layers"):
        writer.resume()
    state = CheckpointWriter(tmp_path, replace(CONFIG, resume="latest"), list(setup()[2].unbind(0)), 1).resume()
    state.lora["other.layer"] = next(iter(state.lora.values()))
    model, fns, latents = setup()
    with pytest.raises(ValueError, match=r"resume: this model lacks 1 layers .*first: other\.layer"):
        train(model.net, fns, latents, CONFIG, resume=state)


def test_resume_errors_name_the_input(tmp_path):
    latents = list(setup()[2].unbind(0))
    with pytest.raises(FileNotFoundError, match="^resume: no training state at"):
        CheckpointWriter(tmp_path, replace(CONFIG, resume="loras/nothing.safetensors"), latents, 1).resume()
    with pytest.raises(ValueError, match="^resume: '../x' points outside the output folder"):
        CheckpointWriter(tmp_path, replace(CONFIG, resume="../x"), latents, 1).resume()
    assert CheckpointWriter(tmp_path, replace(CONFIG, resume="latest"), latents, 1).resume() is None  # none yet
