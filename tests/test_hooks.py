"""Train LoRA's hooks around the engine (nodes/hooks.py), alone: stand-ins for ComfyUI's progress bar,
the progress event, the previewer and the checkpoint writer, and a real training loop on the tiny model."""
from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import torch

from comfyui_lora_trainer.nodes.hooks import TrainingHooks
from comfyui_lora_trainer.nodes.progress import ProgressReporter
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import train
from comfyui_lora_trainer.training.validation import Validation


class Interrupt(Exception):
    """Stands for ComfyUI's InterruptProcessingException."""


class Recorder:
    """A console bar, ComfyUI's bar, the reporter, the previewer and the checkpoint writer in one: it
    records every call; ComfyUI's bar raises Interrupt at `raise_at` (as its hook does on a cancel)."""

    def __init__(self, raise_at: int | None = None) -> None:
        self.calls: list[tuple] = []
        self.raise_at = raise_at

    def update_absolute(self, step: int, total: int) -> None:
        self.calls.append(("bar", step, total))
        if step == self.raise_at:
            raise Interrupt()

    def set_postfix(self, **values: str) -> None:
        self.calls.append(("postfix", values["loss"] != ""))

    def update(self, n: int) -> None:
        self.calls.append(("console", n))

    def close(self) -> None:
        self.calls.append(("close",))

    def flush(self) -> None:
        self.calls.append(("flush",))

    def step(self, state) -> None:
        self.calls.append(("event", "step", state.step))

    def event(self, name: str, state, **fields) -> None:
        self.calls.append(("event", name, state.step, *fields.values()))

    def due(self, step: int) -> bool:
        return step % 2 == 0

    steps = 3  # a preview's sampler steps

    def take(self, step: int, progress=None) -> None:
        self.calls.append(("preview", step))
        for i in range(1, self.steps + 1):
            progress(i)

    @contextmanager
    def working(self, kind: str, what: str, of: int | None = None):
        self.calls.append(("working", kind, what, of))
        yield SimpleNamespace(advance=lambda done: self.calls.append(("advance", what, done)))

    def save(self, state, lora, reason: str) -> str:
        self.calls.append(("save", state.step, reason, len(lora)))
        return f"loras/ck_{state.step}.safetensors"


def _train(hooks: TrainingHooks, steps: int = 4, validation_every: int = 0):
    model = build_tiny("eps")
    fns = tiny_fns(model, encode_captions(["a ramp"], model.net.config.context_dim))
    config = TrainConfig(steps=steps, batch_size=1, training_dtype="fp32", lora_dtype="fp32",
                         gradient_checkpointing=False, save_every=3)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    validator = (hooks.validator(Validation(fns, latents[:1] + 0.5, config, validation_every, noise_levels=5))
                 if validation_every else None)
    return train(model.net, fns, latents, config, hooks=hooks.hooks(), validator=validator)


def test_the_hooks_report_preview_and_checkpoint_each_step():
    r = Recorder()
    hooks = TrainingHooks(4, r, r, r, previewer=r, checkpoints=r, interrupt=Interrupt)
    result = _train(hooks)
    assert len(result.losses) == 4 and hooks.steps_done == 4 and not hooks.interrupted
    assert [c for c in r.calls if c[0] == "preview"] == [("preview", 0), ("preview", 2), ("preview", 4)]
    assert [c[1:3] for c in r.calls if c[0] == "save"] == [(3, "every"), (4, "every")]
    assert ("event", "checkpoint", 3, "loras/ck_3.safetensors", "every") in r.calls
    assert [c[2] for c in r.calls if c[:2] == ("event", "step")] == [1, 2, 3, 4]
    assert [c[1] for c in r.calls if c[0] == "bar"] == [0, 1, 2, 3, 4]
    hooks.close()
    assert r.calls[-2:] == [("close",), ("flush",)]
    per_step, steps = hooks.seconds_per_step()
    assert steps == 3 and per_step > 0


def test_an_interrupt_raised_inside_a_hook_cancels_at_the_next_check_and_keeps_the_step():
    r = Recorder(raise_at=2)
    hooks = TrainingHooks(6, r, r, r, checkpoints=r, interrupt=Interrupt)
    result = _train(hooks, steps=6)
    assert hooks.interrupted and result.cancelled and len(result.losses) == 2
    assert [c[1:3] for c in r.calls if c[0] == "save"] == [(2, "cancel")]  # the cancel's checkpoint


def test_comfyuis_cancel_flag_cancels_and_no_writer_means_no_checkpoint():
    r = Recorder()
    pressed = {"now": False}
    hooks = TrainingHooks(5, r, r, r, interrupt=Interrupt, interrupted_flag=lambda: pressed["now"])
    original = hooks.on_step

    def on_step(state):
        original(state)
        pressed["now"] = state.step == 3

    hooks.on_step = on_step
    result = _train(hooks, steps=5)
    assert result.cancelled and len(result.losses) == 3 and hooks.hooks().save is None
    assert not [c for c in r.calls if c[0] == "save"]


def test_before_the_first_step_the_event_says_what_runs_and_how_far_along():
    """The step-0 validation and preview are phases of the real reporter's event, with their progress,
    sent before step 1's message; a validation after step 2 is named by its step."""
    r, sent = Recorder(), []
    reporter = ProgressReporter(4, sent.append, min_interval=0.0)
    hooks = TrainingHooks(4, r, r, reporter, previewer=r, interrupt=Interrupt)
    result = _train(hooks, validation_every=2)
    assert [step for step, _ in result.validation] == [0, 2, 4]
    first_step = next(i for i, m in enumerate(sent) if m["event"] == "step")
    before = [(m.get("phase", m["event"]), m.get("done"), m.get("of")) for m in sent[:first_step]]
    assert before == [("validation at step 0", done, 5) for done in range(6)] + [
        ("preview at step 0", done, 3) for done in range(4)] + [("preview", None, None)]  # the preview's notice
    phases = {m["phase"] for m in sent if m["event"] == "phase"}
    assert phases == {"validation at step 0", "preview at step 0", "validation at step 2", "preview at step 2",
                      "validation at step 4", "preview at step 4"}
    assert all(m["step"] == 0 and m["loss"] is None for m in sent[:first_step])
