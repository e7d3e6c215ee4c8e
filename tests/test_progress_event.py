"""Train LoRA's websocket event (nodes/progress.py) without ComfyUI: the payload, the throttle, the
ETA, notices, and the sender against stand-ins of ComfyUI's server and executing context."""
from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import dataclass, field

import pytest

from comfyui_lora_trainer.nodes import progress
from comfyui_lora_trainer.nodes.progress import EVENT, SMOOTHING_WINDOW, ProgressReporter, payload, smoothed


@dataclass
class State:  # the fields of training/loop.py TrainState the reporter reads
    step: int
    total_steps: int
    loss: float
    lr: float
    losses: list[float]
    validation: list[tuple[int, float]] = field(default_factory=list)


def _state(step: int, losses: list[float] | None = None, earlier: int = 0, **kw) -> State:
    losses = losses if losses is not None else [1.0 / (i + 1) for i in range(step)]
    return State(step, earlier + step, losses[-1] if losses else math.nan, 1e-4, losses, **kw)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_payload_fields_and_json_safety():
    losses = [float(i) for i in range(1, 31)]
    state = _state(30, losses, earlier=100, validation=[(10, 0.5), (20, 0.25)])
    data = payload(state, 50, elapsed=12.3456, eta=4.0, node="5", prompt_id="p1")
    assert data == {"event": "step", "prompt_id": "p1", "node": "5", "step": 30, "total": 50, "lora_steps": 130,
                    "loss": 30.0, "smoothed_loss": sum(losses[-SMOOTHING_WINDOW:]) / SMOOTHING_WINDOW, "lr": 1e-4,
                    "validation_loss": 0.25, "validation_step": 20, "elapsed": 12.346, "eta": 4.0}
    nan = State(0, 0, math.nan, 1e-4, [])  # before the first step: no loss yet
    data = payload(nan, 10)
    assert data["loss"] is None and data["smoothed_loss"] is None and data["validation_loss"] is None
    json.loads(json.dumps(data, allow_nan=False))  # strict JSON, as a browser parses it
    assert smoothed([1.0, math.inf, 3.0]) == 2.0  # a diverged value does not poison the mean


def test_a_state_without_validation_field_reports_null():
    @dataclass
    class Old:
        step: int = 1
        total_steps: int = 1
        loss: float = 0.5
        lr: float = 1e-3
        losses: list = field(default_factory=lambda: [0.5])
    assert payload(Old(), 1)["validation_loss"] is None


def test_throttle_first_last_and_flush():
    clock, sent = Clock(), []
    reporter = ProgressReporter(10, sent.append, node="5", prompt_id="p", clock=clock)
    for step in range(1, 11):
        clock.now += 0.03  # 33 steps a second
        reporter.step(_state(step))
    steps = [m["step"] for m in sent]
    assert steps[0] == 1 and steps[-1] == 10  # first and last always
    times = [100.0 + 0.03 * s for s in steps]
    assert all(b - a >= 0.1 - 1e-9 for a, b in zip(times[:-2], times[1:-1]))  # at most ~10 a second
    assert len(sent) < 10
    clock.now, sent[:] = 200.0, []
    reporter = ProgressReporter(100, sent.append, clock=clock)
    reporter.step(_state(1))
    clock.now += 0.01
    reporter.step(_state(2))  # held back
    assert [m["step"] for m in sent] == [1]
    reporter.flush()
    reporter.flush()  # nothing new: nothing sent
    assert [m["step"] for m in sent] == [1, 2] and all(m["node"] is None for m in sent)


def test_eta_and_elapsed_from_the_clock():
    clock, sent = Clock(), []
    reporter = ProgressReporter(10, sent.append, clock=clock, min_interval=0)
    clock.now += 5.0  # model loading before the first step
    reporter.step(_state(1))
    assert sent[-1]["eta"] is None and sent[-1]["elapsed"] == 5.0
    clock.now += 4.0  # two steps in 4 s: 2 s a step, 7 steps left
    reporter.step(_state(3))
    assert sent[-1]["eta"] == pytest.approx(14.0) and sent[-1]["elapsed"] == 9.0
    clock.now += 10.0
    reporter.step(_state(10))
    assert sent[-1]["eta"] == 0.0


def test_resumed_run_measures_from_its_first_step():
    clock, sent = Clock(), []
    reporter = ProgressReporter(100, sent.append, clock=clock, min_interval=0)
    reporter.step(_state(50))
    clock.now += 10.0
    reporter.step(_state(60))  # 1 s a step since step 50, 40 left
    assert sent[-1]["eta"] == pytest.approx(40.0)


def test_notices_are_never_throttled_and_carry_extras():
    clock, sent = Clock(), []
    reporter = ProgressReporter(10, sent.append, clock=clock)
    state = _state(4)
    reporter.step(state)
    state.validation.append((4, 0.125))  # the run adds the validation to its state
    reporter.event("validation")
    reporter.event("checkpoint", path="loras/x_4_steps_00001_.safetensors")
    reporter.event("preview", state=_state(5), image="preview_00001_.png")
    assert [m["event"] for m in sent] == ["step", "validation", "checkpoint", "preview"]
    assert sent[1]["validation_loss"] == 0.125 and sent[1]["validation_step"] == 4
    assert sent[2]["path"] == "loras/x_4_steps_00001_.safetensors" and sent[2]["step"] == 4
    assert sent[3]["step"] == 5 and sent[3]["image"] == "preview_00001_.png"
    with pytest.raises(ValueError, match="kind: got 'saved'; use one of validation, preview, checkpoint"):
        reporter.event("saved")


def test_comfy_sender_uses_the_executing_context_and_the_prompts_client(monkeypatch):
    """send=None goes through ComfyUI's PromptServer.send_sync to the prompt's client_id, with the
    prompt and node of the executing context (stand-ins of server.py and comfy_execution.utils)."""
    calls = []
    server = types.SimpleNamespace(client_id="client-1", last_prompt_id="old", last_node_id="9",
                                   send_sync=lambda event, data, sid: calls.append((event, data, sid)))
    server_module = types.ModuleType("server")
    server_module.PromptServer = types.SimpleNamespace(instance=server)
    context = types.SimpleNamespace(prompt_id="p7", node_id="5", list_index=0)
    utils = types.ModuleType("comfy_execution.utils")
    utils.get_executing_context = lambda: context
    monkeypatch.setitem(sys.modules, "server", server_module)
    monkeypatch.setitem(sys.modules, "comfy_execution", types.ModuleType("comfy_execution"))
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", utils)
    reporter = ProgressReporter(2)
    reporter.step(_state(2))
    (event, data, sid), = calls
    assert (event, sid, data["prompt_id"], data["node"], data["step"]) == (EVENT, "client-1", "p7", "5", 2)
    context = None  # outside the context: the server's last prompt and node
    utils.get_executing_context = lambda: context
    _, prompt_id, node = progress.comfy_sender()
    assert (prompt_id, node) == ("old", "9")


def test_phases_report_progress_throttled_but_never_their_start_and_end():
    clock, sent = Clock(), []
    reporter = ProgressReporter(10, sent.append, clock=clock, min_interval=1.0)
    reporter.phase("loading the model")
    with reporter.working("validation", "validation at step 0", 15) as phase:
        for done in range(1, 16):
            clock.now += 0.25
            phase.advance(done)
    shown = [(m["event"], m["phase"], m["done"], m["of"], m["step"], m["eta"]) for m in sent]
    assert shown == [("phase", "loading the model", None, None, 0, None),
                     ("phase", "validation at step 0", 0, 15, 0, None),
                     ("phase", "validation at step 0", 4, 15, 0, None),  # 1 s after the last message
                     ("phase", "validation at step 0", 8, 15, 0, None),
                     ("phase", "validation at step 0", 12, 15, 0, None),
                     ("phase", "validation at step 0", 15, 15, 0, None)]  # its end always goes out
    json.dumps(sent, allow_nan=False)


def test_the_eta_counts_validations_and_previews_still_due():
    """10 steps of 1 s, a validation every 5 steps (3.75 s each) and a preview every 4 (and the last): the
    ETA is the steps' time without the validations' and previews', plus each one still due at its mean."""
    clock, sent = Clock(), []
    reporter = ProgressReporter(10, sent.append, clock=clock, min_interval=0.0)
    reporter.schedule("validation", 5)
    reporter.schedule("preview", 4)

    def work(kind: str, seconds: float) -> None:
        with reporter.working(kind, f"{kind} at step x"):
            clock.now += seconds

    work("validation", 3.75)  # step 0's: before the first step
    work("preview", 2.0)
    for step in range(1, 7):
        clock.now += 1.0
        if step == 5:
            work("validation", 3.75)
        if step == 4:
            work("preview", 6.0)
        reporter.step(_state(step))
    # after step 6: steps left 4 at 1 s; validations due after 6: step 10 (1 at 3.75 s); previews
    # due: steps 8 and 10 (2 at a mean of (2 + 6) / 2 = 4 s)
    assert sent[-1]["step"] == 6 and sent[-1]["eta"] == 4 * 1.0 + 3.75 + 2 * 4.0
    assert reporter.due_after("preview", 6) == 2 and reporter.due_after("validation", 10) == 0
    with pytest.raises(ValueError, match="kind: got 'loss'; use one of validation, preview"):
        reporter.schedule("loss", 3)
