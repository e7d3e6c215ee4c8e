"""What Train LoRA does around the engine's steps inside ComfyUI, as one object: the console bar, ComfyUI's
progress bar, the `lora_trainer.progress` event, previews, checkpoints and cancel. The engine sees it as
training/loop.py's `Hooks` (`hooks()`).

No ComfyUI import: ComfyUI's pieces come in as arguments (nodes/comfy_train.py passes them), so the
hooks test alone with stand-ins. ComfyUI's own progress hook raises its InterruptProcessingException
from inside `update_absolute` on a cancel and clears its flag; such a raise inside a hook is caught
(`interrupted` is set) and the loop stops at its next cancel check, after the step was kept.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Callable

from ..training.loop import Hooks, TrainState


class TrainingHooks:
    """The hooks of one run.

    steps: the run's step count; bar: a tqdm-like console bar (`update`, `set_postfix`, `close`);
    ui_bar: ComfyUI's ProgressBar (`update_absolute(step, total)`); reporter: nodes/progress.py's
    ProgressReporter; previewer: nodes/comfy_preview.py's Previewer or None; checkpoints: a
    CheckpointWriter or None (only rank 0 writes); validating: a validation set is measured;
    interrupt: ComfyUI's cancel exception; interrupted_flag: ComfyUI's "cancel was pressed" check.
    """

    def __init__(self, steps: int, bar: Any, ui_bar: Any, reporter: Any, *, previewer: Any = None,
                 checkpoints: Any = None, validating: bool = False, interrupt: type[BaseException] = KeyboardInterrupt,
                 interrupted_flag: Callable[[], bool] = lambda: False, start_step: int = 0) -> None:
        self.steps, self.bar, self.ui_bar, self.reporter = steps, bar, ui_bar, reporter
        self.previewer, self.checkpoints, self.validating = previewer, checkpoints, validating
        self.interrupt, self.interrupted_flag = interrupt, interrupted_flag
        self.steps_done = 0  # completed steps, also when ComfyUI's progress hook raised on cancel
        self.interrupted = False  # ComfyUI's progress hook raised (and cleared its flag) inside a hook
        self.step_times: list[float] = []  # perf_counter after each step, for the s/step log line
        self.started = False  # on_start ran: the steps are under way
        self.start_step = start_step  # the step the run starts at (a resumed run's)

    def hooks(self) -> Hooks:
        """The engine's view of these hooks."""
        return Hooks(on_step=self._guarded(self.on_step), should_cancel=self.should_cancel,
                     on_start=self._guarded(self.on_start),
                     save=self.save if self.checkpoints is not None else None, cancel_errors=(self.interrupt,))

    def validator(self, validator: Any) -> Any:
        """The engine's validator, reporting its progress ("validation at step 0: 6 of 15") as it measures."""
        return _ReportedValidation(validator, self)

    def validation_step(self) -> int:
        """The step a validation measures now: the engine validates at the start (before on_start) and
        after a step (before that step's on_step)."""
        return self.steps_done + 1 if self.started else self.start_step

    def on_start(self, state: TrainState) -> None:
        """Before the first step (after a resume: at the resumed step): the bar, the first preview."""
        self.started, self.steps_done = True, state.step
        self.ui_bar.update_absolute(state.step, self.steps)
        if self.previewer is not None:
            self._preview(state)

    def on_step(self, state: TrainState) -> None:
        """After each optimizer step: console, event, validation notice, ComfyUI's bar, a due preview."""
        self.steps_done = state.step
        self.step_times.append(time.perf_counter())
        self.bar.set_postfix(loss=f"{state.loss:.4f}", lr=f"{state.lr:.2e}")
        self.bar.update(1)
        self.reporter.step(state)
        if self.validating and state.validation and state.validation[-1][0] == state.step:
            self.reporter.event("validation", state)
        self.ui_bar.update_absolute(state.step, self.steps)
        if self.previewer is not None and self.previewer.due(state.step):
            self._preview(state)

    def save(self, state: TrainState, lora: Any, reason: str) -> str:
        """Write a checkpoint (Hooks.save) and announce it; returns where it went."""
        where = self.checkpoints.save(state, lora, reason)
        self.reporter.event("checkpoint", state, path=where, reason=reason)
        return where

    def should_cancel(self) -> bool:
        return self.interrupted or self.interrupted_flag()

    def close(self) -> None:
        self.bar.close()
        self.reporter.flush()

    def seconds_per_step(self) -> tuple[float, int] | None:
        """(seconds per step, steps) from the end of the first step (its extra first-use cost left out)."""
        if len(self.step_times) < 2:
            return None
        return (self.step_times[-1] - self.step_times[0]) / (len(self.step_times) - 1), len(self.step_times) - 1

    def _preview(self, state: TrainState) -> None:
        with (state.shown() if state.shown is not None else nullcontext(),  # the EMA's weights, if it is asked
              self.reporter.working("preview", f"preview at step {state.step}", self.previewer.steps) as phase):
            self.previewer.take(state.step, phase.advance)
        self.reporter.event("preview", state)

    def _guarded(self, hook: Callable[[TrainState], None]) -> Callable[[TrainState], None]:
        def run(state: TrainState) -> None:
            try:
                hook(state)
            except self.interrupt:  # ComfyUI's progress hook raised (its flag now cleared): stop at the next check
                self.interrupted = True

        return run


class _ReportedValidation:
    """A validator (training/validation.py Validation) whose measuring is a reported, timed phase."""

    def __init__(self, validator: Any, hooks: TrainingHooks) -> None:
        self.validator, self.hooks, self.every = validator, hooks, validator.every

    def loss(self) -> float:
        what = f"validation at step {self.hooks.validation_step()}"
        with self.hooks.reporter.working("validation", what, self.validator.measurements) as phase:
            return self.validator.loss(progress=phase.advance)
