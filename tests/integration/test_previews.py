"""Train LoRA's sample previews in a real ComfyUI (CPU, the tiny SD1.5 checkpoint; docs/long-runs.md#sample-previews).

The training example (example_workflows/api/train_lora.json, its validation branch dropped) at 64 px,
6 steps, a preview every 3 steps with 2 sampling steps. Checked: the PNGs in the output folder at
steps 0, 3 and 6; Train LoRA's UI entry lists them; the previews output is their labelled grid of
the size training/grid.py lays out; each preview reaches a websocket client as ComfyUI's binary
progress preview while training runs; the step-0 preview (the LoRA starts at zero) is exactly what
core's KSampler + VAE Decode make of the base model with the same settings; later previews change
with the LoRA; without a VAE the latent previewer draws them; and the LoRA and its losses are
bit-identical with previews on (with a VAE, or an ancestral sampler without one) and off; a cancel
while a preview samples stops the run cleanly, and the runs after it still train and preview.
Skips unless COMFYUI_DIR is set (see conftest.py).
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
import uuid
from io import BytesIO
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DEMO_IMAGES = ROOT / "assets" / "demo_images"
_spec = importlib.util.spec_from_file_location("lora_trainer_grid", ROOT / "training" / "grid.py")
grid_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grid_module)

SIZE = 64
DATASET = "it_previews_dataset"
TRAIN = {"steps": 6, "learning_rate": 5e-3, "training_dtype": "fp32", "lora_dtype": "fp32", "seed": 1}
EVERY = 3
STEPS_PREVIEWED = [0, 3, 6]
PREVIEW = {"every": EVERY, "seed": 5, "steps": 2, "cfg": 2.0, "width": SIZE, "height": SIZE,
           "sampler_name": "euler", "scheduler": "normal"}
TRAIN_NODE, SAVE_NODE, PLOT_NODE, PREVIEW_NODE, GRID_NODE = "5", "6", "7", "15", "16"
PREVIEW_IMAGE = 1  # ComfyUI's binary websocket event for a progress preview (protocol.BinaryEventTypes)


class Run(NamedTuple):
    entry: dict
    previews_sent: list[Image.Image]  # binary progress previews the websocket client received


# ---- graphs ------------------------------------------------------------------------------
def training_graph(comfy, name: str, preview: dict | None, vae: bool = True, negative: bool = True) -> dict:
    """The example at 64 px; `preview` overrides the preview node's inputs (None: no preview connected)."""
    g = json.loads((ROOT / "example_workflows" / "api" / "train_lora.json").read_text())
    del g[TRAIN_NODE]["inputs"]["validation"]  # its nodes then feed no output, so ComfyUI skips them
    g["1"]["inputs"]["ckpt_name"] = comfy.checkpoint
    g["2"]["inputs"].update(folder=DATASET, width=SIZE, height=SIZE)
    g[TRAIN_NODE]["inputs"].update(TRAIN)
    g[SAVE_NODE]["inputs"]["prefix"] = f"loras/it_previews_{name}"
    g[PLOT_NODE]["inputs"]["filename_prefix"] = f"it_previews/{name}_loss"
    if preview is None:
        del g[TRAIN_NODE]["inputs"]["preview"], g[GRID_NODE]
        return g
    node = g[PREVIEW_NODE]["inputs"]
    node.update(PREVIEW, filename_prefix=f"it_previews/{name}", **preview)
    if not vae:
        del node["vae"]
    if not negative:
        del node["negative"]
    g[GRID_NODE] = {"class_type": "SaveImage",
                    "inputs": {"images": [TRAIN_NODE, 4], "filename_prefix": f"it_previews/{name}_grid"}}
    return g


def with_reference_sample(graph: dict, name: str) -> dict:
    """Core's EmptyLatentImage → KSampler → VAE Decode → Save Image of the base model, with the preview's settings."""
    p = graph[PREVIEW_NODE]["inputs"]
    graph["r5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
    graph["r6"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": p["seed"], "steps": p["steps"], "cfg": p["cfg"], "sampler_name": p["sampler_name"],
        "scheduler": p["scheduler"], "positive": p["positive"], "negative": p["negative"], "latent_image": ["r5", 0],
        "denoise": 1.0}}
    graph["r7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["r6", 0], "vae": ["1", 2]}}
    graph["r8"] = {"class_type": "SaveImage", "inputs": {"images": ["r7", 0], "filename_prefix": f"it_previews/{name}_ref"}}
    return graph


# ---- running -----------------------------------------------------------------------------
def run_listening(comfy, graph: dict, timeout: float = 600) -> Run:
    """Queue as a websocket client; collect the binary previews until the prompt finishes."""
    websocket = pytest.importorskip("websocket", reason="listening needs websocket-client")
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"{comfy.url.replace('http', 'ws', 1)}/ws?clientId={client_id}", timeout=timeout)
    sent = []
    try:
        status, body = comfy.post_prompt(graph, client_id)
        assert status == 200, body
        prompt_id = body["prompt_id"]
        while True:
            message = ws.recv()
            if isinstance(message, bytes):
                event, image_type = struct.unpack(">II", message[:8])
                if event == PREVIEW_IMAGE and image_type == 1:  # 1: JPEG
                    sent.append(Image.open(BytesIO(message[8:])).convert("RGB"))
                continue
            event = json.loads(message)
            data = event.get("data") or {}
            if event["type"] == "execution_error" or (event["type"] == "executing" and data.get("node") is None
                                                      and data.get("prompt_id") == prompt_id):
                break
    finally:
        ws.close()
    entry = comfy.wait(prompt_id, timeout)
    assert entry["status"]["status_str"] == "success", comfy.execution_error(entry) or entry["status"]
    return Run(entry, sent)


def read_png(comfy, image: dict) -> np.ndarray:
    with Image.open(comfy.output_dir / image["subfolder"] / image["filename"]) as img:
        return np.asarray(img.convert("RGB")).copy()


def lora_tensors(comfy, entry: dict) -> dict:
    from safetensors.torch import load_file
    return load_file(comfy.output_dir / entry["outputs"][SAVE_NODE]["text"][0])


# ---- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(comfy) -> str:
    folder = comfy.input_dir / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("circle", "stripes", "sunset"):
        shutil.copy(DEMO_IMAGES / f"{name}.png", folder / f"{name}.png")
    return DATASET


@pytest.fixture(scope="module")
def with_vae(comfy, dataset) -> Run:
    return run_listening(comfy, with_reference_sample(training_graph(comfy, "vae", {}), "vae"))


@pytest.fixture(scope="module")
def latent_only(comfy, dataset) -> Run:
    """No VAE, no negative (so cfg 1), an ancestral sampler (draws from the global RNG while sampling)."""
    return run_listening(comfy, training_graph(comfy, "latent", {"sampler_name": "euler_ancestral"},
                                               vae=False, negative=False))


@pytest.fixture(scope="module")
def without_previews(comfy, dataset) -> dict:
    return comfy.run(training_graph(comfy, "none", None), timeout=600)


# ---- tests -------------------------------------------------------------------------------
def assert_saved_previews(comfy, run: Run, name: str) -> list[np.ndarray]:
    """The PNGs at the expected steps, listed in Train LoRA's UI entry in step order; their pixels."""
    listed = run.entry["outputs"][TRAIN_NODE]["images"]
    assert [e["type"] for e in listed] == ["output"] * len(STEPS_PREVIEWED) and {e["subfolder"] for e in listed} == {"it_previews"}
    names = [e["filename"] for e in listed]
    assert all(re.fullmatch(rf"{name}_{step}_steps_\d{{5}}_\.png", n) for n, step in zip(names, STEPS_PREVIEWED)), names
    assert sorted(p.name for p in comfy.output_files(f"it_previews/{name}_*_steps_*.png")) == sorted(names)
    images = [read_png(comfy, e) for e in listed]
    assert all(im.shape == (SIZE, SIZE, 3) for im in images)
    return images


def assert_grid(comfy, run: Run, name: str, previews: list[np.ndarray]) -> None:
    """Train LoRA's previews output: the saved previews, each under its step, laid out by training/grid.py."""
    (saved,) = run.entry["outputs"][GRID_NODE]["images"]
    grid = read_png(comfy, saved)
    plan = grid_module.layout(len(previews), SIZE, SIZE)
    assert grid.shape == (*plan.size, 3), (grid.shape, plan)
    for i, image in enumerate(previews):
        top, left = (i // plan.columns) * plan.cell_height + plan.label_height, (i % plan.columns) * plan.cell_width
        assert np.array_equal(grid[top: top + SIZE, left: left + SIZE], image), f"grid cell {i}"


def test_cancel_during_a_preview_stops_cleanly(comfy, dataset):
    """POST /interrupt while the first preview samples (400 sampling steps): the prompt is interrupted
    from the sampler's callback, no preview is saved, and ComfyUI trains fine afterwards (the tests below)."""
    websocket = pytest.importorskip("websocket", reason="listening needs websocket-client")
    mark = len(comfy.log())
    graph = training_graph(comfy, "cancel", {"steps": 400})
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"{comfy.url.replace('http', 'ws', 1)}/ws?clientId={client_id}", timeout=300)
    try:
        status, body = comfy.post_prompt(graph, client_id)
        assert status == 200, body
        while True:  # Train LoRA's bar at 0 is sent just before the first preview samples
            message = ws.recv()
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            if event["type"] == "progress" and event["data"].get("node") == TRAIN_NODE:
                break
            assert event["type"] != "execution_error", event
    finally:
        ws.close()
    comfy.interrupt()
    entry = comfy.wait(body["prompt_id"], timeout=300)
    assert "execution_interrupted" in [e for e, _ in entry["status"]["messages"]], entry["status"]
    assert re.search(r"Train LoRA: cancelled after 0 of 6 steps", comfy.log(mark)), comfy.log(mark)[-3000:]
    assert not comfy.output_files("it_previews/cancel_*"), "the interrupted preview was saved"


def test_previews_with_the_checkpoints_vae(comfy, with_vae):
    previews = assert_saved_previews(comfy, with_vae, "vae")
    assert_grid(comfy, with_vae, "vae", previews)
    reference = read_png(comfy, with_vae.entry["outputs"]["r8"]["images"][0])
    assert np.array_equal(previews[0], reference), "the step-0 preview is not KSampler's sample of the base model"
    assert not np.array_equal(previews[-1], previews[0]), "the previews do not follow the LoRA"
    # shown while training: one progress preview per saved preview (no other node sends any here)
    assert len(with_vae.previews_sent) == len(STEPS_PREVIEWED), len(with_vae.previews_sent)
    for sent, saved in zip(with_vae.previews_sent, previews):
        small = np.asarray(sent.resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32)
        assert np.abs(small - saved).mean() < 12, "the progress preview is not the saved preview"


def test_previews_without_a_vae_use_the_latent_previewer(comfy, latent_only):
    previews = assert_saved_previews(comfy, latent_only, "latent")
    assert_grid(comfy, latent_only, "latent", previews)
    assert all(im.std() > 0 for im in previews), "a blank preview"
    assert len(latent_only.previews_sent) == len(STEPS_PREVIEWED)
    log = comfy.log()
    assert "no negative connected, so the previews sample at cfg 1 (not 2.0)" in log


def test_previews_leave_the_lora_bit_identical(comfy, with_vae, latent_only, without_previews):
    plain = lora_tensors(comfy, without_previews)
    plain_losses = without_previews["outputs"][PLOT_NODE]["loss"]
    assert len(plain_losses) == TRAIN["steps"]
    for run in (with_vae, latent_only):
        tensors = lora_tensors(comfy, run.entry)
        assert tensors.keys() == plain.keys()
        different = [k for k in plain if not np.array_equal(tensors[k].numpy(), plain[k].numpy())]
        assert not different, f"{len(different)} tensors differ with previews on, e.g. {different[:3]}"
        assert run.entry["outputs"][PLOT_NODE]["loss"] == plain_losses
    assert any(np.abs(t.numpy()).max() > 0 for k, t in plain.items() if "lora_up" in k), "the LoRA did not train"
