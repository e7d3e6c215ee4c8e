"""The example workflows in ComfyUI's real frontend: headless Chromium driven by selenium (browser.py).

Runs when COMFYUI_DIR is set and selenium, Chromium and chromedriver are found (Debian: chromium,
chromium-driver); skips otherwise. Checks that the examples open with every node type registered, no
error overlay (missing nodes or models) and every node in view in a 1280x800 window; that
train_lora.json, adapted to the test server (tiny checkpoint, 64 px, 2 fp32 steps), trains when
queued with the page's Run button; and that the previews grid and the loss graph then show on the
page. A screenshot of that page is kept: under $LORA_TRAINER_ARTIFACTS (default
tests/integration/artifacts/, git-ignored); its path is printed.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKFLOWS = ROOT / "example_workflows"
DEMO_IMAGES = ROOT / "assets" / "demo_images"
ARTIFACTS = Path(os.environ.get("LORA_TRAINER_ARTIFACTS") or HERE / "artifacts")

_spec = importlib.util.spec_from_file_location("lora_trainer_it_browser", HERE / "browser.py")
browser = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = browser
_spec.loader.exec_module(browser)
try:  # before the server fixture starts anything
    browser.find_browser()
except browser.NoBrowser as _why:
    pytest.skip(str(_why), allow_module_level=True)

FRONTEND_ONLY = {"MarkdownNote", "Note"}
DATASET, HELD_OUT = "it_browser_set", "it_browser_val"  # input subfolders: 3 demo images, 1 held-out
# train_lora.json's node ids
CHECKPOINT, IMAGES, VAL_IMAGES, TRAIN, SAVE, PLOT, PREVIEW, VALIDATION, PREVIEWS = 1, 2, 10, 5, 6, 7, 15, 12, 16
STEPS = 2
# What a user of the test server would change on the page: node id -> {widget: value}.
ADAPT = {
    IMAGES: {"folder": DATASET, "width": 64, "height": 64},
    VAL_IMAGES: {"folder": HELD_OUT, "width": 64, "height": 64},
    TRAIN: {"steps": STEPS, "learning_rate": 2e-3, "training_dtype": "fp32", "lora_dtype": "fp32"},
    PREVIEW: {"every": 2, "steps": 1, "cfg": 2.0, "width": 64, "height": 64, "filename_prefix": "it_browser/preview"},
    VALIDATION: {"every": 2, "noise_levels": 1},
    SAVE: {"prefix": "loras/it_browser"},
    PLOT: {"filename_prefix": "it_browser/loss"},
}


@pytest.fixture(scope="module")
def folders(comfy) -> None:
    """The input folders the adapted workflow reads; made before the page loads (its folder lists)."""
    for folder, names in ((DATASET, ["circle", "stripes", "sunset"]), (HELD_OUT, ["dots"])):
        (comfy.input_dir / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(DEMO_IMAGES / f"{name}.png", comfy.input_dir / folder / f"{name}.png")


@pytest.fixture(scope="module")
def page(comfy, folders):
    driver = browser.start_chromium()
    try:
        browser.open_comfyui(driver, comfy.url)
        yield driver
    finally:
        browser.quit_chromium(driver)


def open_example(page, name: str, checkpoint: str) -> dict:
    """Load an example as it is shipped, with only the checkpoint set to the server's; its JSON."""
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["widgets_values"][0] = checkpoint
    browser.load_workflow(page, workflow)
    return workflow


def check_opened(page, workflow: dict) -> list[dict]:
    """Every node of `workflow` on the canvas, each type registered, in view; no error overlay."""
    boxes = page.execute_script(browser.NODE_BOXES_JS)
    assert sorted(b["id"] for b in boxes) == sorted(str(n["id"]) for n in workflow["nodes"])
    assert [b["type"] for b in boxes if not b["registered"]] == [], "node types the frontend does not know"
    hidden = {f'{b["id"]} {b["title"]} {b["box"]}': b["hidden"] for b in boxes if b["hidden"]}
    assert not hidden, f"nodes not fully in view in a {browser.WINDOW} window: {hidden}"
    return boxes


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.save_screenshot(str(path))
    print(f"\nscreenshot: {path}")
    return path


@pytest.mark.parametrize("name", ["train_lora", "sample_with_lora"])
def test_example_opens_with_every_node_in_view(comfy, page, name):
    stand_in = comfy.loras_dir / "lrtstyle_200_steps_00001_.safetensors"  # sample_with_lora's LoRA
    if name == "sample_with_lora":  # listed (never read), so that no "missing model" overlay shows
        stand_in.write_bytes(b"")
        browser.open_comfyui(page, comfy.url)  # a reload: the frontend reads the file lists on start
    try:
        workflow = open_example(page, name, comfy.checkpoint)
    finally:
        stand_in.unlink(missing_ok=True)
    overlay = page.execute_script(browser.ERROR_OVERLAY_JS)
    assert overlay is None, f"the frontend reports errors on opening {name}.json: {overlay}"
    boxes = check_opened(page, workflow)
    assert {b["type"] for b in boxes} - FRONTEND_ONLY <= set(comfy.object_info())
    screenshot(page, f"opened_{name}")


def test_train_lora_example_trains_from_the_page(comfy, page):
    workflow = open_example(page, "train_lora", comfy.checkpoint)
    assert page.execute_script(browser.ERROR_OVERLAY_JS) is None
    check_opened(page, workflow)
    for node_id, widgets in ADAPT.items():
        for widget, value in widgets.items():
            browser.set_widget(page, node_id, widget, value)
    browser.set_widget(page, TRAIN, "seed", int(time.time()) % 2**31)  # a new prompt, never a cached result

    from selenium.webdriver.common.by import By

    # every line web/progress.js shows on Train LoRA, in order (its listener runs first: registered first)
    page.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('/scripts/api.js').then(({api}) => {"
        "  window.loraTrainerLines = [];"
        "  api.addEventListener('lora_trainer.progress', ({detail}) => {"
        "    const n = window.app.graph.getNodeById(Number(detail.node));"
        "    window.loraTrainerLines.push({event: detail.event, step: detail.step, line: n && n.loraTrainerStatus});"
        "  });"
        "  done();"
        "});")
    before = set(comfy.get("/history"))
    started = time.monotonic()
    page.find_element(By.CSS_SELECTOR, "[data-testid=queue-button]").click()
    prompt_id = browser.wait_for(lambda: next(iter(set(comfy.get("/history")) - before), None)
                                 or next(iter(_queued(comfy) - before), None), 60, "the Run button queued nothing")
    entry = comfy.wait(prompt_id, timeout=600)
    print(f"\ntrained from the page in {time.monotonic() - started:.1f} s")
    assert entry["status"]["status_str"] == "success", comfy.execution_error(entry) or entry["status"]
    queued = entry["prompt"][2]
    assert queued[str(TRAIN)]["inputs"]["steps"] == STEPS and str(PREVIEW) in queued and str(VALIDATION) in queued
    assert any(f.name.startswith(f"it_browser_{STEPS}_steps_") for f in comfy.output_files("loras/*.safetensors"))

    # The previews grid (Preview Image on Train LoRA's previews) and the loss graph show on their nodes.
    shown = browser.wait_for(lambda: _shown_images(page, [PREVIEWS, PLOT]), 60,
                             "the previews grid and the loss graph did not show on the page")
    for node_id in (PREVIEWS, PLOT):
        served = entry["outputs"][str(node_id)]["images"]
        assert [img["filename"] for img in shown[str(node_id)]] == [s["filename"] for s in served], node_id
    grid, = entry["outputs"][str(PREVIEWS)]["images"]
    query = urllib.parse.urlencode({k: grid[k] for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{comfy.url}/view?{query}", timeout=60) as response:  # what the page shows
        pixels = np.asarray(Image.open(io.BytesIO(response.read())).convert("L"))
    # previews at steps 0 and 2, 64 px each: wider or taller than one, and not the black stand-in
    # Train LoRA returns without a preview input
    assert max(pixels.shape) > 64 and pixels.std() > 0, pixels.shape
    loss = entry["outputs"][str(PLOT)]
    assert len(loss["loss"]) == STEPS
    assert sorted(p.name for p in comfy.output_files("it_browser/preview*.png")), "no preview files saved"
    # web/progress.js: Train LoRA's progress event reached the page and shows on the node
    progress = browser.wait_for(lambda: page.execute_script(
        "const n = window.app.graph.getNodeById(arguments[0]);"
        "const p = n && n.loraTrainerProgress;"
        "return p && p.step === p.total ? {p: p, line: n.loraTrainerStatus} : null;", TRAIN), 30,
        "Train LoRA's progress event did not reach its node on the page")
    assert progress["p"]["total"] == STEPS and progress["p"]["validation_loss"] is not None, progress
    assert progress["line"].startswith(f"step {STEPS}/{STEPS} · loss ") and " val " in progress["line"], progress
    # before step 1 the node said what ran: loading, the step-0 validation and preview, with their progress
    lines = page.execute_script("return window.loraTrainerLines;")
    first = next(i for i, seen in enumerate(lines) if seen["event"] == "step")
    assert lines[first]["step"] == 1, lines[first]
    shown = [seen["line"] for seen in lines[:first] if seen["event"] == "phase"]
    assert "loading the model…" in shown, shown
    measured = [re.fullmatch(r"validation at step 0: (\d+) of (\d+)", line) for line in shown]
    assert [m.groups() for m in measured if m][-1] == ("1", "1"), shown  # 1 held-out image × 1 noise level
    assert f"preview at step 0: {ADAPT[PREVIEW]['steps']} of {ADAPT[PREVIEW]['steps']}" in shown, shown
    screenshot(page, "trained_train_lora")


# Each LoRA Options node alone on the canvas at the example's zoom, its box in window pixels and what covers it
OPTIONS_NODE_BOX_JS = browser.NODE_BOX_FUNCTION + """
const [type, zoom] = arguments;
const node = LiteGraph.createNode(type);
app.graph.add(node);
canvas.ds.scale = zoom;
const [w, h] = node.computeSize();
node.size = [Math.max(node.size[0], w), Math.max(node.size[1], h)];
// the node's top-left clear of the side bar and the menu and tab bars above the canvas
const [gx, gy] = canvas.ds.convertCanvasToOffset([140, 160]);
node.pos = [gx, gy];
canvas.setDirty(true, true);
canvas.draw(true, true);
return {...nodeBox(node), widgets: node.widgets.length, window: [innerWidth, innerHeight]};
"""


def test_every_options_node_fits_the_window_at_the_examples_zoom(comfy, page):
    """Each grouped LoRA Options node, expanded, fits a 1280×800 window at train_lora.json's zoom in less than
    half its height; the one-column node they replace (38 widgets) takes more than half."""
    from comfyui_lora_trainer.nodes.options import GROUPS

    zoom = json.loads((WORKFLOWS / "train_lora.json").read_text())["extra"]["ds"]["scale"]
    for group in (*GROUPS, None):
        node_type = group.node_id if group else "LoRATrainer_TrainingOptions"
        browser.load_workflow(page, {"last_node_id": 0, "last_link_id": 0, "nodes": [], "links": [], "groups": [],
                                     "config": {}, "extra": {}, "version": 0.4})  # an empty canvas
        seen = page.execute_script(OPTIONS_NODE_BOX_JS, node_type, zoom)
        x0, y0, x1, y1 = seen["box"]
        print(f"\n{node_type}: {seen['widgets']} widgets, {x1 - x0}×{y1 - y0} px at zoom {zoom}")
        if group is None:
            assert y1 - y0 > seen["window"][1] / 2, seen  # why the groups exist
            continue
        assert seen["widgets"] == len(group.fields), seen
        assert not seen["hidden"] and y1 - y0 < seen["window"][1] / 2, f"{node_type} does not fit: {seen}"
        screenshot(page, f"options_{group.node_id.removeprefix('LoRATrainer_')}")


def test_a_workflow_saved_with_the_one_column_options_node_opens_with_its_values(comfy, page):
    """train_lora.json as shipped before the groups: the one-column options node opens with no error overlay and
    every widget holds its saved value (stored by position), so the workflow queues as it did."""
    workflow = json.loads((HERE / "legacy_train_lora.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["widgets_values"][0] = comfy.checkpoint
    browser.load_workflow(page, workflow)
    assert page.execute_script(browser.ERROR_OVERLAY_JS) is None
    saved = next(n for n in workflow["nodes"] if n["type"] == "LoRATrainer_TrainingOptions")
    shown = page.execute_script(
        "const n = window.app.graph.getNodeById(arguments[0]);"
        "return n.widgets.map(w => [w.name, w.value]);", saved["id"])
    from comfyui_lora_trainer.nodes.options import LEGACY_ORDER

    assert [name for name, _ in shown][:len(LEGACY_ORDER)] == list(LEGACY_ORDER)
    assert [value for _, value in shown][:len(saved["widgets_values"])] == saved["widgets_values"]
    prompt = page.execute_async_script("const done = arguments[arguments.length - 1];"
                                       "window.app.graphToPrompt().then(p => done(p.output));")
    inputs = prompt[str(saved["id"])]["inputs"]
    assert prompt[str(saved["id"])]["class_type"] == "LoRATrainer_TrainingOptions"
    assert {k: inputs[k] for k in LEGACY_ORDER} == dict(zip(LEGACY_ORDER, saved["widgets_values"]))


def _queued(comfy) -> set[str]:
    queue = comfy.get("/queue")
    return {item[1] for item in queue.get("queue_running", []) + queue.get("queue_pending", [])}


def _shown_images(page, node_ids: list[int]) -> dict | None:
    """{node id: [{filename, width, height}]} for nodes whose output images have loaded on the page."""
    shown = page.execute_script(
        "const out = {};"
        "for (const id of arguments[0]) {"
        "  const node = window.app.graph.getNodeById(id);"
        "  const imgs = (node && node.imgs) || [];"
        "  if (!imgs.length || !imgs.every(i => i.complete && i.naturalWidth > 0)) return null;"
        "  out[id] = imgs.map(i => ({filename: new URL(i.src).searchParams.get('filename'),"
        "                            width: i.naturalWidth, height: i.naturalHeight}));"
        "}"
        "return out;", node_ids)
    return shown
