"""Headless runs (`python -m comfyui_lora_trainer run`) against a real ComfyUI (skipped unless
COMFYUI_DIR is set): the training example end to end with overrides, progress over the websocket
(Train LoRA's own "lora_trainer.progress" event: loss, smoothed loss, lr, ETA), outputs found and
downloaded; the event itself as a websocket client receives it; a sweep followed by polling;
invalid overrides refused before anything is queued; ComfyUI's validation errors printed; Ctrl-C
interrupting the run."""
from __future__ import annotations

import json
import math
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_lora_trainer.headless.cli import main
from comfyui_lora_trainer.headless.client import ComfyHTTP
from comfyui_lora_trainer.headless.workflow import load_workflow, parse_override, plan_runs

PACK_ROOT = Path(__file__).resolve().parents[2]
API_WORKFLOW = PACK_ROOT / "example_workflows" / "api" / "train_lora.json"
DATASET = "headless_it_set"
# Runs the CLI in a child process, loading the repository root as `comfyui_lora_trainer`
# (as tests/conftest.py does) so that the test can send it a real SIGINT.
BOOT = ("import importlib.util, sys; root = sys.argv[1]; "
        "spec = importlib.util.spec_from_file_location('comfyui_lora_trainer', root + '/__init__.py', "
        "submodule_search_locations=[root]); m = importlib.util.module_from_spec(spec); "
        "sys.modules['comfyui_lora_trainer'] = m; spec.loader.exec_module(m); "
        "from comfyui_lora_trainer.headless.cli import main; sys.exit(main(sys.argv[2:]))")


@pytest.fixture(scope="module")
def workflow() -> Path:
    if not API_WORKFLOW.is_file():
        pytest.skip(f"{API_WORKFLOW.relative_to(PACK_ROOT)} does not exist yet")
    return API_WORKFLOW


@pytest.fixture(scope="module")
def dataset(comfy) -> str:
    """Two 64x64 noise images in an input subfolder."""
    folder = comfy.input_dir / DATASET
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return DATASET


def _fit_to_test_server(comfy, workflow: Path, steps: int) -> list[str]:
    """--set options: the tiny checkpoint, the test images at 64 px, few fp32 steps, a fresh seed
    (so no run is answered from ComfyUI's cache), a test prefix. Nodes are found by class type."""
    graph = json.loads(workflow.read_text("utf-8"))
    sets = []
    for node_id, node in graph.items():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            sets.append(f"{node_id}.ckpt_name={comfy.checkpoint}")
        if "folder" in inputs:
            sets.append(f"{node_id}.folder={DATASET}")
        sets += [f"{node_id}.{name}=64" for name in ("width", "height") if name in inputs]
    sets += [f"Train LoRA.steps={steps}", "Train LoRA.training_dtype=fp32", "Train LoRA.batch_size=1",
             f"Train LoRA.seed={uuid.uuid4().int % 2**31}", "Save LoRA.prefix=loras/it_headless",
             "LoRA Training Preview.steps=2"]  # the example's previews, kept short
    return [arg for spec in sets for arg in ("--set", spec)]


def _lora_paths(text: str) -> list[str]:
    return re.findall(r"text (\S+\.safetensors)", text)


def test_training_end_to_end_with_progress_and_download(comfy, workflow, dataset, tmp_path, capsys):
    pytest.importorskip("websocket", reason="progress needs websocket-client")
    code = main([str(workflow), "--server", comfy.url, "--timeout", "600", "--download", str(tmp_path),
                 *_fit_to_test_server(comfy, workflow, steps=3)])
    out, err = capsys.readouterr()
    assert code == 0, f"{out}\n{err}\n{comfy.log()[-4000:]}"
    # progress from Train LoRA's event: the loss, its smoothed value and the LR, not only the step
    number = r"-?\d[\d.e+-]*"
    assert re.search(rf"Train LoRA \[#+\] 3/3 100%  loss {number} \(avg {number}\)(  val {number})?  lr {number}  "
                     r"ETA 0:00", err), err
    loras = _lora_paths(out)
    assert len(loras) == 1 and "_3_steps_" in loras[0], out
    written = comfy.output_dir / loras[0]
    assert written.is_file() and (tmp_path / loras[0]).read_bytes() == written.read_bytes()


def test_train_lora_sends_its_progress_event(comfy, workflow, dataset):
    """What a websocket client of the prompt receives: step events in order up to N of N (the
    throttle may skip some, never the last), this prompt's and Train LoRA's ids, finite numbers,
    and the ETA 0 at the end."""
    websocket = pytest.importorskip("websocket", reason="listening needs websocket-client")
    sets = _fit_to_test_server(comfy, workflow, steps=3)
    graph = plan_runs(load_workflow(workflow), [parse_override(spec) for spec in sets[1::2]], [])[0].workflow
    train_node = next(n for n, node in graph.items() if node["class_type"] == "LoRATrainer_TrainLoRA")
    client, client_id = ComfyHTTP(comfy.url), uuid.uuid4().hex
    ws = websocket.create_connection(client.ws_url(client_id), timeout=300)
    events = []
    try:
        prompt_id = client.queue_prompt(graph, client_id)
        while True:
            message = ws.recv()
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            data = event.get("data") or {}
            if event["type"] == "lora_trainer.progress":
                events.append(data)
            if event["type"] == "executing" and data.get("prompt_id") == prompt_id and data.get("node") is None:
                break
            assert event["type"] != "execution_error", f"{data}\n{comfy.log()[-3000:]}"
    finally:
        ws.close()
    assert events, comfy.log()[-3000:]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps[-1] == 3 and steps == sorted(steps) and all(e["total"] == 3 for e in events)
    assert {(e["prompt_id"], e["node"]) for e in events} == {(prompt_id, train_node)}
    last = events[-1]
    for name in ("loss", "smoothed_loss", "lr", "elapsed"):
        assert isinstance(last[name], float) and math.isfinite(last[name]), (name, last)
    assert last["eta"] == 0.0 and last["lr"] > 0 and last["lora_steps"] == 3
    assert "validation_loss" in last  # null unless validation latents are connected


def test_sweep_by_polling_prints_a_summary(comfy, workflow, dataset, capsys):
    code = main([str(workflow), "--server", comfy.url, "--no-ws", "--poll-interval", "0.2",
                 "--timeout", "600", *_fit_to_test_server(comfy, workflow, steps=1),
                 "--sweep", "Train LoRA.learning_rate=1e-4,1e-3"])
    out, err = capsys.readouterr()
    assert code == 0, f"{out}\n{err}"
    rows = [line.split() for line in out.splitlines() if re.match(r"[12] +learning_rate=", line)]
    assert [r[:3] for r in rows] == [["1", "learning_rate=1e-4", "success"], ["2", "learning_rate=1e-3", "success"]]
    assert all(r[-1].endswith(".safetensors") and (comfy.output_dir / r[-1]).is_file() for r in rows)


@pytest.mark.parametrize("spec, message", [
    ("Train LoRA.no_such_input=1", 'has no input "no_such_input"'),
    ("No Such Node.steps=1", 'no node has the id or title "No Such Node"'),
    ("Train LoRA.model=3", 'input "model" of node .* is connected to node'),
])
def test_invalid_override_fails_before_submission(comfy, workflow, spec, message, capsys):
    mark = len(comfy.log())
    assert main([str(workflow), "--server", comfy.url, "--set", spec]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert "got prompt" not in comfy.log(mark)


def test_server_validation_errors_are_printed(comfy, workflow, dataset, capsys):
    args = _fit_to_test_server(comfy, workflow, steps=1) + ["--set", "CheckpointLoaderSimple.ckpt_name=missing.safetensors"]
    assert main([str(workflow), "--server", comfy.url, *args]) == 1
    err = capsys.readouterr().err
    assert "ComfyUI refused the workflow (HTTP 400)" in err
    assert re.search(r'node \d+ ".*" \(CheckpointLoaderSimple\): Value not in list', err), err


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)


def test_ctrl_c_interrupts_the_running_prompt(comfy, workflow, dataset):
    pytest.importorskip("websocket", reason="waiting for the first progress needs websocket-client")
    args = [str(workflow), "--server", comfy.url, *_fit_to_test_server(comfy, workflow, steps=5000)]
    # Ctrl-C as a terminal gives it: SIGINT at its default, so Python turns it into KeyboardInterrupt. A shell
    # without job control starts background jobs (`pytest … &`) with SIGINT ignored, and children inherit that
    child = subprocess.Popen([sys.executable, "-c", BOOT, str(PACK_ROOT), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(child.stderr, lines), daemon=True).start()
    deadline, seen = time.monotonic() + 300, []
    try:
        while not any("Train LoRA [" in line for line in seen):  # training has started
            assert time.monotonic() < deadline and child.poll() is None, "".join(seen) + comfy.log()[-3000:]
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        child.send_signal(signal.SIGINT)
        try:
            code = child.wait(timeout=120)
        except subprocess.TimeoutExpired:  # say what the client had printed: where it stopped
            time.sleep(0.5)
            while not lines.empty():
                seen.append(lines.get())
            raise AssertionError("the client did not exit within 120 s of Ctrl-C; its stderr:\n"
                                 + "".join(seen)[-3000:]) from None
        assert code == 130
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    time.sleep(0.5)  # let the reader thread drain the pipe
    while not lines.empty():
        seen.append(lines.get())
    found = re.search(r"interrupted prompt (\S+) \(Ctrl-C\)", "".join(seen))
    assert found, "".join(seen)
    entry = comfy.wait(found.group(1), timeout=300)
    events = [event for event, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in events and entry["status"]["status_str"] == "error"
