"""Train LoRA's own websocket event, `lora_trainer.progress`: what a client needs to follow a run.

ComfyUI's "progress" message carries only `value`/`max`; this event adds the loss, a smoothed loss,
the LR, the latest validation loss and an ETA, so a client (the headless CLI, a browser extension)
reads numbers instead of parsing console text. It goes out through ComfyUI's server like core's own
messages (server.py `PromptServer.send_sync(event, data, sid)`, to `PromptServer.instance.client_id`,
the client that queued the running prompt; None sends to every client, as core's "progress" does).
The prompt and node come from ComfyUI's executing context (comfy_execution/utils.py
`get_executing_context()`, set around the node's function), else the server's last ones.

Payload (JSON; every number finite or null):
  event           "step" after an optimizer step; "validation" | "preview" | "checkpoint" notices;
                  "phase" while work other than a step runs (loading, latents, a validation, a preview)
  prompt_id, node the running prompt and Train LoRA's node id (null outside ComfyUI)
  step, total     optimizer steps done in this run / to do in this run
  lora_steps      the LoRA's steps counting a continued LoRA's earlier ones (TrainState.total_steps)
  loss            the last step's loss
  smoothed_loss   the mean of the last SMOOTHING_WINDOW steps' losses (a trailing window: no lag
                  from an EMA's bias, the same value whatever messages were skipped)
  lr              the last step's learning rate
  validation_loss, validation_step   the latest validation (TrainState.validation), or null
  elapsed         seconds since the reporter was made (training start)
  eta             seconds left: the training time per step (since the first reported step, less the
                  time validations and previews took) x the steps left, plus each validation and
                  preview still due x the mean time one took so far; null until two steps were seen
                  (the first one carries the model's load time)
  (a notice adds its own fields, e.g. "path")
  phase, done, of a "phase" event's: what runs ("loading the model", "validation at step 0") and how
                  far along it is (done of `of` units; both null when it cannot be counted)

Phases are what a user waits through before the first step (and at each validation and preview): the
node would otherwise say nothing for minutes. `working(kind, what, of)` wraps one (a context whose
`advance(done)` reports progress); the time a "validation" or "preview" took is what the ETA adds for
each one still due (`schedule`).

Throttle: step messages go out at most every `min_interval` seconds (0.1: ~10 a second); the first
and the last step always go out, and notices are never dropped. The payload builder is pure and
no ComfyUI module is imported here until a reporter without `send` is made.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple, Sequence

EVENT = "lora_trainer.progress"
NOTICES = ("validation", "preview", "checkpoint")
PHASE = "phase"
TIMED = ("validation", "preview")  # the work the ETA counts beside the steps
SMOOTHING_WINDOW = 20  # steps
MIN_INTERVAL = 0.1  # seconds between step messages

Send = Callable[[dict], None]


class Blank(NamedTuple):
    """The numbers of a run with no step done yet (a phase before the first step)."""

    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    lr: float | None = None
    losses: tuple = ()
    validation: tuple = ()


def _number(value: Any) -> float | None:
    """A finite float, or None: JSON has no NaN/inf (a browser's JSON.parse refuses them)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def smoothed(losses: Sequence[float], window: int = SMOOTHING_WINDOW) -> float | None:
    """The mean of the last `window` finite losses; None when there are none."""
    recent = [x for x in losses[-window:] if _number(x) is not None]
    return sum(recent) / len(recent) if recent else None


def latest_validation(state: Any) -> tuple[int | None, float | None]:
    """(step, loss) of the last entry of `state.validation` ([(step, loss), ...]), or (None, None)."""
    entries = getattr(state, "validation", None) or []
    if not entries:
        return None, None
    step, loss = entries[-1]
    return int(step), _number(loss)


def payload(state: Any, total: int, *, event: str = "step", elapsed: float = 0.0, eta: float | None = None,
            node: str | None = None, prompt_id: str | None = None) -> dict:
    """The message for `state` (training/loop.py TrainState: step, total_steps, loss, lr, losses,
    validation); see the module doc for the fields. Pure: no clock, no ComfyUI."""
    validation_step, validation_loss = latest_validation(state)
    return {
        "event": event, "prompt_id": prompt_id, "node": node,
        "step": int(state.step), "total": int(total), "lora_steps": int(getattr(state, "total_steps", state.step)),
        "loss": _number(state.loss), "smoothed_loss": smoothed(state.losses), "lr": _number(state.lr),
        "validation_loss": validation_loss, "validation_step": validation_step,
        "elapsed": round(elapsed, 3), "eta": None if eta is None else round(max(0.0, eta), 3),
    }


def comfy_sender() -> tuple[Send, str | None, str | None]:
    """(send to the running prompt's client, prompt id, node id) from ComfyUI's server; call it
    while the node runs (the executing context is set around the node's function)."""
    from comfy_execution.utils import get_executing_context
    from server import PromptServer

    server = PromptServer.instance
    context = get_executing_context()
    prompt_id = context.prompt_id if context is not None else getattr(server, "last_prompt_id", None)
    node = context.node_id if context is not None else getattr(server, "last_node_id", None)

    def send(data: dict) -> None:
        server.send_sync(EVENT, data, server.client_id)

    return send, prompt_id, None if node is None else str(node)


class Phase:
    """One running phase (`ProgressReporter.working`): `advance(done)` after each unit of its work."""

    def __init__(self, reporter: "ProgressReporter", what: str, of: int | None) -> None:
        self.reporter, self.what, self.of = reporter, what, of

    def advance(self, done: int) -> None:
        self.reporter.phase(self.what, done, self.of)


class ProgressReporter:
    """Sends `lora_trainer.progress` for one run: `phase(...)`/`working(...)` while anything but a step
    runs, `step(state)` after each optimizer step, `event(kind)` after a validation, preview or checkpoint.

    `send=None` sends through ComfyUI's server (see `comfy_sender`); a callable taking the payload
    dict is used as given (tests, other hosts), with `node`/`prompt_id` as passed.
    """

    def __init__(self, total_steps: int, send: Send | None = None, *, node: str | None = None,
                 prompt_id: str | None = None, clock: Callable[[], float] = time.monotonic,
                 min_interval: float = MIN_INTERVAL) -> None:
        if send is None:
            send, prompt_id, node = comfy_sender()
        self.total, self.send, self.node, self.prompt_id = int(total_steps), send, node, prompt_id
        self.clock, self.min_interval = clock, min_interval
        self.started = clock()
        self._first: tuple[float, int] | None = None  # (time, step) of the first step seen
        self._last_sent = -math.inf
        self._state: Any = Blank()  # the latest state seen
        self._unsent = False  # the latest step was throttled away
        self._timed: dict[str, list[float]] = {kind: [] for kind in TIMED}  # seconds each one took
        self._timed_since_first = 0.0  # of that, the seconds after the first step
        self._every: dict[str, int] = {}

    def start_at(self, step: int) -> None:
        """The run starts at `step` (a resumed run): what phases before its first step report."""
        if self._first is None:
            self._state = Blank(step, step)

    def schedule(self, kind: str, every: int) -> None:
        """`kind` ("validation", "preview") runs after every `every` steps and after the last; the ETA adds the
        mean time one took for each still due."""
        if kind not in TIMED:
            raise ValueError(f"kind: got {kind!r}; use one of {', '.join(TIMED)}")
        self._every[kind] = max(1, int(every))

    def due_after(self, kind: str, step: int) -> int:
        """How many `kind` runs are due after `step` (0 when not scheduled)."""
        every = self._every.get(kind)
        if every is None or step >= self.total:
            return 0
        return self.total // every - step // every + (self.total % every != 0)

    def eta(self, step: int) -> float | None:
        """Seconds left (see the module doc); None until measurable."""
        if self._first is None or step <= self._first[1]:
            return None
        training = self.clock() - self._first[0] - self._timed_since_first
        per_step = max(0.0, training) / (step - self._first[1])
        left = per_step * max(0, self.total - step)
        for kind, taken in self._timed.items():
            if taken:
                left += sum(taken) / len(taken) * self.due_after(kind, step)
        return left

    def _message(self, state: Any, event: str) -> dict:
        return payload(state, self.total, event=event, elapsed=self.clock() - self.started, eta=self.eta(state.step),
                       node=self.node, prompt_id=self.prompt_id)

    def _emit(self, data: dict) -> None:
        self._last_sent = self.clock()
        self.send(data)

    def step(self, state: Any) -> None:
        """After an optimizer step: send unless a message went out less than `min_interval` ago
        (the first and the last step always go out)."""
        now = self.clock()
        if self._first is None:
            self._first = (now, state.step)
        self._state = state
        due = now - self._last_sent >= self.min_interval or state.step >= self.total or state.step == self._first[1]
        self._unsent = not due
        if due:
            self._emit(self._message(state, "step"))

    def event(self, kind: str, state: Any = None, **extra: Any) -> None:
        """A notice ("validation", "preview", "checkpoint") with the latest numbers (of `state` if
        given, else of the last step) and `extra` JSON-ready fields (e.g. path="loras/x.safetensors").
        Never throttled."""
        if kind not in NOTICES:
            raise ValueError(f"kind: got {kind!r}; use one of {', '.join(NOTICES)}")
        state = state if state is not None else self._state
        self._state, self._unsent = state, False
        self._emit({**self._message(state, kind), **extra})

    def phase(self, what: str, done: int | None = None, of: int | None = None) -> None:
        """What runs now and how far along (`done` of `of`), with the latest step's numbers. Throttled like
        steps, but a phase's start and end (done None, 0 or `of`) always go out."""
        edge = done is None or done == 0 or (of is not None and done >= of)
        if not edge and self.clock() - self._last_sent < self.min_interval:
            return
        self._emit({**self._message(self._state, PHASE), "phase": what,
                    "done": None if done is None else int(done), "of": None if of is None else int(of)})

    @contextmanager
    def working(self, kind: str, what: str, of: int | None = None) -> Iterator[Phase]:
        """A phase from start (done 0) to end; a "validation" or "preview" is timed for the ETA."""
        started = self.clock()
        self.phase(what, 0 if of is not None else None, of)
        yield Phase(self, what, of)
        taken = self.clock() - started
        if kind in self._timed:
            self._timed[kind].append(taken)
            if self._first is not None:
                self._timed_since_first += taken

    def flush(self) -> None:
        """Send the latest step if the throttle held it back (e.g. when a run stops early)."""
        if self._unsent and self._state is not None:
            self._unsent = False
            self._emit(self._message(self._state, "step"))
