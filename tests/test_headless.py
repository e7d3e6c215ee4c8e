"""Headless runs without ComfyUI: overrides, sweeps, reports, progress, and whole runs against a
small fake of ComfyUI's HTTP + websocket API (stdlib http.server on 127.0.0.1)."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import queue
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from comfyui_lora_trainer.headless import cli, follow
from comfyui_lora_trainer.headless.follow import RunState, handle_event
from comfyui_lora_trainer.headless.progress import ProgressBar, format_bar, format_duration
from comfyui_lora_trainer.headless.report import (RunResult, extract_outputs, format_execution_error,
                                                  format_outputs, format_refusal, format_summary, lora_file)
from comfyui_lora_trainer.headless.workflow import (Override, apply_overrides, load_workflow,
                                                    parse_override, parse_sweep, plan_runs)

WF = {
    "1": {"class_type": "CheckpointLoaderSimple", "_meta": {"title": "Load Checkpoint"}, "inputs": {"ckpt_name": "a.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "_meta": {"title": "caption"}, "inputs": {"text": "a photo", "clip": ["1", 1]}},
    "3": {"class_type": "CLIPTextEncode", "_meta": {"title": "caption"}, "inputs": {"text": "", "clip": ["1", 1]}},
    "5": {"class_type": "LoRATrainer_TrainLoRA", "_meta": {"title": "Train LoRA"},
          "inputs": {"model": ["1", 0], "positive": ["2", 0], "steps": 16, "learning_rate": 0.0005,
                     "seed": 0, "gradient_checkpointing": True, "existing_lora": "[None]"}},
    "6": {"class_type": "LoRATrainer_SaveLoRA", "_meta": {"title": "Save LoRA"}, "inputs": {"lora": ["5", 1], "prefix": "loras/x"}},
    "7": {"class_type": "LoRATrainer_PlotLossGraph", "_meta": {"title": "Plot Loss Graph"}, "inputs": {"loss": ["5", 2]}},
}
LORA = "loras/x_4_steps_00001_.safetensors"
ENTRY = {"outputs": {"6": {"text": [LORA]}, "7": {"images": [{"filename": "loss_00001_.png", "subfolder": "", "type": "temp"}]}},
         "status": {"status_str": "success", "completed": True, "messages": []}}


def _set(*specs: str, force: bool = False) -> dict:
    return apply_overrides(WF, [parse_override(s) for s in specs], force)


# ---- overrides ---------------------------------------------------------------------------
def test_override_by_title_id_class_and_case():
    wf = _set("Train LoRA.steps=200", "5.seed=5", "train lora.learning_rate=1e-4", "LoRATrainer_SaveLoRA.prefix=loras/y")
    assert wf["5"]["inputs"] | {} == WF["5"]["inputs"] | {"steps": 200, "seed": 5, "learning_rate": 1e-4}
    assert wf["6"]["inputs"]["prefix"] == "loras/y" and WF["5"]["inputs"]["steps"] == 16  # a copy


def test_override_values_json_or_text():
    wf = _set("Train LoRA.gradient_checkpointing=false", "2.text=1990", '3.text="quoted"', "1.ckpt_name=b c.safetensors")
    assert wf["5"]["inputs"]["gradient_checkpointing"] is False
    assert wf["2"]["inputs"]["text"] == "1990" and wf["3"]["inputs"]["text"] == "quoted"
    assert wf["1"]["inputs"]["ckpt_name"] == "b c.safetensors"
    assert parse_override("v1.5 model.ckpt_name=a=b") == Override("v1.5 model", "ckpt_name", "a=b")


@pytest.mark.parametrize("spec, match", [
    ("nope.steps=1", r'no node has the id or title "nope"; the nodes are: node 1 "Load Checkpoint"'),
    ("Train LoRA.stpes=1", r'has no input "stpes" \(did you mean "steps"\?\); its inputs: model, positive, steps'),
    ("caption.text=x", r'2 nodes are called "caption" \(ids 2, 3\); use the id'),
    ("Train LoRA.model=x", r'input "model" of node 5 "Train LoRA" .* is connected to node 1 output 0.*--force'),
    ("steps=3", r"expected NODE.INPUT=VALUE"),
])
def test_override_errors_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        _set(spec)


def test_force_replaces_links_and_adds_inputs():
    wf = _set('Train LoRA.model=["3", 0]', "Train LoRA.rank=4", force=True)
    assert wf["5"]["inputs"]["model"] == ["3", 0] and wf["5"]["inputs"]["rank"] == 4


# ---- sweeps, repeats ---------------------------------------------------------------------
def test_sweep_grid_and_repeats():
    assert [o.raw for o in parse_sweep('caption.text=["a, b", "c"]')] == ["a, b", "c"]
    sweeps = [parse_sweep("Train LoRA.learning_rate=1e-4,5e-4"), parse_sweep("5.steps=1,2")]
    runs = plan_runs(WF, [parse_override("Train LoRA.seed=7")], sweeps, repeats=2, increment="Train LoRA.seed")
    assert [r.index for r in runs] == list(range(1, 9))
    got = [(r.workflow["5"]["inputs"]["learning_rate"], r.workflow["5"]["inputs"]["steps"],
            r.workflow["5"]["inputs"]["seed"]) for r in runs]
    assert got[:4] == [(1e-4, 1, 7), (1e-4, 1, 8), (1e-4, 2, 7), (1e-4, 2, 8)] and got[-1] == (5e-4, 2, 8)
    assert cli.overrides_label(runs[1]) == "learning_rate=1e-4 steps=1 seed=8"


@pytest.mark.parametrize("kwargs, match", [
    ({"sweeps": [[Override("Train LoRA", "nope", "1")]]}, 'no input "nope"'),
    ({"sweeps": [], "repeats": 0}, r"--queue 0: must be 1 or more"),
    ({"sweeps": [], "increment": "Save LoRA.prefix"}, r'"prefix" .* not an integer'),
])
def test_plan_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_runs(WF, [], **kwargs)
    with pytest.raises(ValueError, match="empty"):
        parse_sweep("Train LoRA.steps=1,,2")


def test_load_workflow_rejects_ui_format_and_unwraps_prompt(tmp_path):
    (tmp_path / "ui.json").write_text(json.dumps({"nodes": [], "links": []}))
    with pytest.raises(ValueError, match=r"UI-format workflow.*Export \(API\)"):
        load_workflow(tmp_path / "ui.json")
    (tmp_path / "body.json").write_text(json.dumps({"prompt": WF, "client_id": "x"}))
    assert load_workflow(tmp_path / "body.json") == WF
    with pytest.raises(FileNotFoundError, match="missing.json: no such file"):
        load_workflow(tmp_path / "missing.json")


# ---- reports and progress ----------------------------------------------------------------
def test_outputs_from_history():
    items = extract_outputs(ENTRY)
    assert lora_file(items) == LORA and [i.kind for i in items] == ["text", "image"]
    text = format_outputs(items, WF)
    assert f'node 6 "Save LoRA" (LoRATrainer_SaveLoRA): text {LORA}' in text
    assert "image loss_00001_.png (temp)" in text


def test_error_and_refusal_are_readable():
    error = {"node_id": "5", "node_type": "LoRATrainer_TrainLoRA", "exception_type": "ValueError",
             "exception_message": "positive: got 3 captions for 8 images", "traceback": ["tb line\n"]}
    assert format_execution_error(error, WF) == (
        'node 5 "Train LoRA" (LoRATrainer_TrainLoRA) failed: ValueError: positive: got 3 captions for 8 images')
    body = {"error": {"message": "Prompt outputs failed validation"}, "node_errors": {"1": {
        "errors": [{"message": "Value not in list", "details": "ckpt_name: 'x' not in []"}]}}}
    assert format_refusal(400, body, WF).splitlines() == [
        "ComfyUI refused the workflow (HTTP 400): Prompt outputs failed validation",
        """  node 1 "Load Checkpoint" (CheckpointLoaderSimple): Value not in list: ckpt_name: 'x' not in []"""]


def test_summary_table():
    table = format_summary([RunResult(1, "learning_rate=1e-4", "success", 0.12345, (200, 200), LORA),
                            RunResult(2, "learning_rate=1e-3", "error", None, None, None)]).splitlines()
    assert table[0].split() == ["run", "overrides", "status", "final", "loss", "steps", "LoRA", "file"]
    assert table[2].split() == ["1", "learning_rate=1e-4", "success", "0.1235", "200/200", LORA]
    assert table[3].split() == ["2", "learning_rate=1e-3", "error", "-", "-", "-"]
    assert table[0].index("status") == table[2].index("success") == table[3].index("error")
    table = format_summary([RunResult(1, "", "success", 0.5, (2, 2), LORA, "p1", validation_loss=0.25),
                            RunResult(2, "", "success", 0.5, (2, 2), LORA, "p2")]).splitlines()
    assert table[0].split()[3:6] == ["final", "loss", "val"] and table[2].split()[3:5] == ["0.5", "0.25"]
    assert table[3].split()[3:5] == ["0.5", "-"]


def test_progress_bar_and_eta():
    assert format_duration(42) == "0:42" and format_duration(3725) == "1:02:05"
    assert format_bar("T", 50, 200, None, None, width=4) == "T [#---] 50/200  25%  loss -  ETA -"
    now = [0.0]
    out = io.StringIO()
    bar = ProgressBar(out, clock=lambda: now[0], interval=10, tty=False)
    for step, t in ((1, 0.0), (2, 2.0), (3, 4.0), (11, 20.0)):
        now[0] = t
        bar.update("Train LoRA", step, 11, 0.5)
    assert out.getvalue().splitlines() == ["Train LoRA [##----------------------] 1/11   9%  loss 0.5  ETA -",
                                           "Train LoRA [########################] 11/11 100%  loss 0.5  ETA 0:00"]
    now[0] = 4.0  # ETA: 2 s per step measured from the first update
    assert bar.eta("Train LoRA", 3, 11) == pytest.approx(16.0)


def test_bar_shows_what_train_loras_event_carries():
    line = format_bar("Train LoRA", 100, 200, 0.12345, 100.0, width=4, smoothed=0.13, validation=0.11, lr=1e-4)
    assert line == "Train LoRA [##--] 100/200  50%  loss 0.1235 (avg 0.13)  val 0.11  lr 1.00e-04  ETA 1:40"
    out = io.StringIO()
    bar = ProgressBar(out, clock=lambda: 0.0, tty=False)
    bar.update("Train LoRA", 1, 2, 0.5, eta=30.0)  # the sender's ETA, where none is measurable here
    for _ in range(2):  # the last step, then a notice at the same step: one line in a log
        bar.update("Train LoRA", 2, 2, 0.25, eta=0.0)
    assert out.getvalue().splitlines() == ["Train LoRA [############------------] 1/2  50%  loss 0.5  ETA 0:30",
                                           "Train LoRA [########################] 2/2 100%  loss 0.25  ETA 0:00"]


def _train_event(prompt_id: str | None, step: int, total: int = 4, **fields) -> dict:
    data = {"event": "step", "prompt_id": prompt_id, "node": "5", "step": step, "total": total, "loss": 1.0 / step,
            "smoothed_loss": 2.0 / step, "lr": 5e-4, "validation_loss": None, "eta": float(total - step)}
    return {"type": "lora_trainer.progress", "data": {**data, **fields}}


def test_events_update_state_for_this_prompt_only():
    out = io.StringIO()
    state, bar = RunState("p1", WF), ProgressBar(out, tty=False, interval=0)
    for event in ({"type": "progress", "data": {"prompt_id": "other", "node": "5", "value": 9, "max": 9}},
                  _train_event("other", 3, validation_loss=0.01),
                  {"type": "executing", "data": {"prompt_id": "p1", "node": "5"}},
                  {"type": "progress", "data": {"prompt_id": "p1", "node": "5", "value": 1, "max": 4}},
                  _train_event("p1", 2),
                  _train_event("p1", 3, event="validation", validation_loss=0.75),
                  {"type": "progress", "data": {"prompt_id": "p1", "node": "5", "value": 4, "max": 4}},  # left to the event
                  {"type": "execution_error", "data": {"prompt_id": "p1", "node_id": "5"}},
                  {"type": "executing", "data": {"prompt_id": "p1", "node": None}}):
        handle_event(state, event, bar)
    assert (state.steps(), state.loss, state.validation_loss, state.status, state.done) == ((3, 4), 1 / 3, 0.75, "error", True)
    lines = out.getvalue().splitlines()
    assert lines == ["Train LoRA [######------------------] 1/4  25%  loss -  ETA -",
                     "Train LoRA [############------------] 2/4  50%  loss 0.5 (avg 1)  lr 5.00e-04  ETA 0:02",
                     "Train LoRA [##################------] 3/4  75%  loss 0.3333 (avg 0.6667)  val 0.75  lr 5.00e-04  ETA 0:01"]
    handle_event(state, {"type": "executed", "data": {"prompt_id": "p1", "output": {"loss": [0.5, 0.25]}}}, bar)
    assert state.loss == 0.25


def _phase(what: str, done: int | None = None, of: int | None = None) -> dict:
    data = {"event": "phase", "prompt_id": "p1", "node": "5", "step": 0, "total": 4, "loss": None, "eta": None,
            "phase": what, "done": done, "of": of}
    return {"type": "lora_trainer.progress", "data": data}


def test_a_phase_before_the_first_step_shows_as_a_passing_status():
    """Train LoRA's "phase" events (loading, the step-0 validation) show on a terminal as what runs and how
    far along; a log gets no line for them, and the steps' counts are untouched."""
    for tty, expected in ((True, "\rTrain LoRA: validation at step 0 6/15"), (False, "")):
        out = io.StringIO()
        state, bar = RunState("p1", WF), ProgressBar(out, tty=tty, interval=0)
        handle_event(state, _phase("validation at step 0", 6, 15), bar)
        assert out.getvalue() == expected and state.steps() is None
    out = io.StringIO()
    handle_event(RunState("p1", WF), _phase("loading the model"),
                 ProgressBar(out, tty=True))
    assert out.getvalue() == "\rTrain LoRA: loading the model ..."


def test_event_without_node_counts_for_the_training_node():
    state = RunState("p1", WF)
    handle_event(state, _train_event(None, 2, node=None), ProgressBar(io.StringIO(), tty=False))
    assert state.progress == {"5": (2, 4)} and state.steps() == (2, 4)


# ---- whole runs against a fake ComfyUI -----------------------------------------------------
class Fake:
    """Scripted ComfyUI: `entry` answers /history after `ready_after` polls (None: never)."""

    def __init__(self, entry: dict | None = ENTRY, ready_after: int | None = 1, refuse: dict | None = None) -> None:
        self.entry, self.ready_after, self.refuse = entry, ready_after, refuse
        self.prompts: list[dict] = []
        self.posts: list[tuple[str, dict]] = []
        self.polls: dict[str, int] = {}
        self.posted: queue.Queue[str] = queue.Queue()


def _ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    size = len(payload)
    return bytes([0x80 | opcode]) + (bytes([size]) if size < 126 else b"\x7e" + size.to_bytes(2, "big")) + payload


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _json(self, body, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        fake: Fake = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        if self.path != "/prompt":
            fake.posts.append((self.path, body))
            return self._json({})
        fake.prompts.append(body)
        if fake.refuse:
            return self._json(fake.refuse, 400)
        prompt_id = f"p{len(fake.prompts)}"
        fake.posted.put(prompt_id)
        self._json({"prompt_id": prompt_id, "number": 0, "node_errors": {}})

    do_PATCH = do_POST

    def do_GET(self) -> None:
        fake: Fake = self.server.fake
        if self.path.startswith("/history/"):
            pid = self.path.rsplit("/", 1)[1]
            fake.polls[pid] = fake.polls.get(pid, 0) + 1
            ready = fake.ready_after is not None and fake.polls[pid] > fake.ready_after
            return self._json({pid: fake.entry} if ready else {})
        if self.path.startswith("/view?"):
            data = b"bytes of " + self.path.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return self.wfile.write(data)
        if self.path.startswith("/ws?"):
            return self._websocket(fake)
        self._json({"queue_running": [], "queue_pending": []})

    def _websocket(self, fake: Fake) -> None:
        key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        self.send_response(101)
        for name, value in (("Upgrade", "websocket"), ("Connection", "Upgrade"),
                            ("Sec-WebSocket-Accept", base64.b64encode(hashlib.sha1(key.encode()).digest()).decode())):
            self.send_header(name, value)
        self.end_headers()
        while not select.select([self.connection], [], [], 0)[0]:  # until the client closes
            try:
                pid = fake.posted.get(timeout=0.05)
            except queue.Empty:
                continue
            fake.ready_after = 0
            for kind, data in (("execution_start", {}), ("executing", {"node": "5"}),
                               ("progress", {"node": "5", "value": 1, "max": 4}),
                               ("lora_trainer.progress", {"event": "step", "node": "5", "step": 2, "total": 4,
                                                          "loss": 0.5, "smoothed_loss": 0.75, "lr": 1e-4, "eta": 2.0}),
                               ("progress", {"node": "5", "value": 2, "max": 4}),
                               ("lora_trainer.progress", {"event": "step", "node": "5", "step": 4, "total": 4,
                                                          "loss": 0.125, "smoothed_loss": 0.25, "lr": 1e-4,
                                                          "validation_loss": 0.0625, "eta": 0.0}),
                               ("executed", {"node": "6", "output": ENTRY["outputs"]["6"]}),
                               ("execution_success", {}), ("executing", {"node": None})):
                self.wfile.write(_ws_frame(json.dumps({"type": kind, "data": {**data, "prompt_id": pid}}).encode()))
            self.wfile.write(_ws_frame(b"\x00\x00\x00\x01preview", opcode=2))
        self.close_connection = True


@pytest.fixture
def fake():
    state = Fake()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.fake = state
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def wf_path(tmp_path):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(WF))
    return path


def test_polling_run_prints_outputs_and_downloads(fake, wf_path, tmp_path, capsys):
    code = cli.main([str(wf_path), "--server", fake.url, "--no-ws", "--poll-interval", "0.01",
                     "--set", "Train LoRA.steps=4", "--download", str(tmp_path / "dl")])
    out = capsys.readouterr().out
    assert code == 0 and fake.prompts[0]["prompt"]["5"]["inputs"]["steps"] == 4 and fake.prompts[0]["client_id"]
    assert f"text {LORA}" in out and "downloaded 2 file(s)" in out and fake.polls["p1"] == 2
    assert (tmp_path / "dl" / LORA).read_bytes().startswith(b"bytes of /view?filename=x_4_steps")
    assert (tmp_path / "dl" / "loss_00001_.png").is_file()


def test_invalid_override_fails_before_submission(fake, wf_path, capsys):
    assert cli.main([str(wf_path), "--server", fake.url, "--set", "Train LoRA.nope=1"]) == 2
    assert fake.prompts == [] and 'has no input "nope"' in capsys.readouterr().err


def test_refused_and_failed_runs_exit_1(fake, wf_path, capsys):
    fake.refuse = {"error": {"message": "Prompt outputs failed validation"}, "node_errors": {}}
    assert cli.main([str(wf_path), "--server", fake.url, "--no-ws"]) == 1
    assert "refused the workflow (HTTP 400): Prompt outputs failed validation" in capsys.readouterr().err
    fake.refuse, fake.entry = None, {"outputs": {}, "status": {"status_str": "error", "messages": [
        ["execution_error", {"node_id": "5", "exception_type": "ValueError", "exception_message": "bad rank"}]]}}
    assert cli.main([str(wf_path), "--server", fake.url, "--no-ws", "--poll-interval", "0.01"]) == 1
    assert 'node 5 "Train LoRA" (LoRATrainer_TrainLoRA) failed: ValueError: bad rank' in capsys.readouterr().err


def test_unreachable_server_is_one_line(wf_path, capsys):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main([str(wf_path), "--server", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot reach ComfyUI at http://127.0.0.1:{port}")


def test_ctrl_c_and_timeout_interrupt_the_prompt(fake, wf_path, monkeypatch, capsys):
    fake.ready_after = None
    assert cli.main([str(wf_path), "--server", fake.url, "--no-ws", "--timeout", "0.05", "--poll-interval", "0.01"]) == 1
    assert ("/interrupt", {"prompt_id": "p1"}) in fake.posts and ("/queue", {"delete": ["p1"]}) in fake.posts

    def ctrl_c(seconds: float) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(follow.time, "sleep", ctrl_c)
    assert cli.main([str(wf_path), "--server", fake.url, "--no-ws"]) == 130
    assert ("/interrupt", {"prompt_id": "p2"}) in fake.posts and "Ctrl-C" in capsys.readouterr().err


def test_websocket_sweep_shows_progress_and_summary(fake, wf_path, capsys):
    pytest.importorskip("websocket", reason="websocket-client is not installed")
    code = cli.main([str(wf_path), "--server", fake.url, "--sweep", "Train LoRA.learning_rate=1e-4,1e-3"])
    captured = capsys.readouterr()
    assert code == 0 and len(fake.prompts) == 2 and "polling" not in captured.err
    assert "Train LoRA [" in captured.err and "4/4 100%  loss 0.125 (avg 0.25)  val 0.0625  lr 1.00e-04  ETA 0:00" in captured.err
    assert "1/4  25%  loss -  ETA -" in captured.err  # ComfyUI's progress, before Train LoRA's event
    assert fake.posts == []  # no console subscription: the numbers come from the event
    rows = captured.out.strip().splitlines()[-2:]
    assert rows[0].split() == ["1", "learning_rate=1e-4", "success", "0.125", "0.0625", "4/4", LORA]
    assert rows[1].split()[:2] == ["2", "learning_rate=1e-3"]
    assert [p["prompt"]["5"]["inputs"]["learning_rate"] for p in fake.prompts] == [1e-4, 1e-3]


# ---- `train`: ComfyUI in this process (headless/inprocess.py); what fails before ComfyUI is needed ----

def _train(argv, monkeypatch, env=None):
    from comfyui_lora_trainer.__main__ import main

    for name in ("COMFYUI_DIR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    return main(["train", *argv])


def test_train_without_comfyui_names_comfyui_dir(tmp_path, monkeypatch, capsys):
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps({"1": {"class_type": "LoRATrainer_TrainLoRA", "inputs": {}}}))
    assert _train([str(workflow)], monkeypatch) == 2
    assert "COMFYUI_DIR" in capsys.readouterr().err
    assert _train([str(workflow), "--comfyui", str(tmp_path)], monkeypatch) == 2  # no execution.py there
    assert "is not a ComfyUI checkout" in capsys.readouterr().err


def test_train_refuses_a_missing_workflow_and_a_data_parallel_run_without_train_lora(tmp_path, monkeypatch, capsys):
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "execution.py").write_text("")
    assert _train([str(tmp_path / "nope.json"), "--comfyui", str(comfy)], monkeypatch) == 2
    assert "no such file" in capsys.readouterr().err
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps({"1": {"class_type": "SaveImage", "inputs": {}}}))
    assert _train([str(workflow), "--comfyui", str(comfy)], monkeypatch, {"RANK": "0", "WORLD_SIZE": "2"}) == 2
    assert "no Train LoRA (LoRATrainer_TrainLoRA) node" in capsys.readouterr().err
