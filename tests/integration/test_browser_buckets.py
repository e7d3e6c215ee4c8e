"""web/buckets.js in ComfyUI's real frontend: headless Chromium driven by selenium (browser.py).

A graph built on the page with the frontend's own LiteGraph (Load Checkpoint with the tiny SD1.5
checkpoint → Encode Training Folder on two 64×64 and two 64×96 PNGs → core's Preview as Text on its
captions) is queued with the page's Run button. Once it has run, the node's `loraTrainerBuckets` (the
node's executed message, `ui.text`) is the summary the server kept in the history for that node, and
it names both buckets; drawing the canvas writes that line (the node's onDrawForeground). A
screenshot is kept under $LORA_TRAINER_ARTIFACTS (default tests/integration/artifacts/, git-ignored).

Runs when COMFYUI_DIR is set and selenium, Chromium and chromedriver are found (Debian: chromium,
chromium-driver); skips otherwise, as test_browser.py does.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
ARTIFACTS = Path(os.environ.get("LORA_TRAINER_ARTIFACTS") or HERE / "artifacts")

_spec = importlib.util.spec_from_file_location("lora_trainer_it_browser", HERE / "browser.py")
browser = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = browser
_spec.loader.exec_module(browser)
try:  # before the server fixture starts anything
    browser.find_browser()
except browser.NoBrowser as _why:
    pytest.skip(str(_why), allow_module_level=True)

FOLDER = "it_browser_buckets"  # input subfolder: 2 squares, 2 tall images
SIZES = {"square_a": (64, 64), "square_b": (64, 64), "tall_a": (64, 96), "tall_b": (64, 96)}
# resolution 128 at step 32 with sides 64..96 (as test_datasets.py): a 64×96 image takes the 64×96
# bucket, a 64×64 one fits none and keeps its own size (never upscaled)
ENCODE = {"resolution": 128, "bucket_step": 32, "min_side": 64, "max_side": 96, "latent_dtype": "fp32"}
BUCKETS = ("64×64: 2", "64×96: 2")

# The graph, made as a user makes it: nodes added from the frontend's registry and wired by slot name;
# returns {role: node id}. Placed inside a 1280×800 window, so that the canvas draws them.
BUILD_JS = """
const [encodeType] = arguments;
const app = window.app, graph = app.graph;
graph.clear();
app.canvas.ds.offset = [0, 0];
app.canvas.ds.scale = 1;
const add = (type, pos) => {
  const node = LiteGraph.createNode(type);
  if (!node) throw new Error(`the frontend does not know ${type}`);
  node.pos = pos;
  graph.add(node);
  return node;
};
const wire = (source, output, target, input) => {
  const out = source.findOutputSlot(output), inp = target.findInputSlot(input);
  if (out < 0 || inp < 0) throw new Error(`no ${output} → ${input}`);
  source.connect(out, target, inp);
};
const checkpoint = add("CheckpointLoaderSimple", [90, 250]);
const encode = add(encodeType, [400, 250]);
const preview = add("PreviewAny", [800, 250]);
wire(checkpoint, "VAE", encode, "vae");
wire(checkpoint, "CLIP", encode, "clip");
wire(encode, "captions", preview, "source");
app.canvas.setDirty(true, true);
return {checkpoint: checkpoint.id, encode: encode.id, preview: preview.id};
"""

# Draw the canvas once and collect what was written with fillText.
DRAWN_TEXT_JS = """
const canvas = window.app.canvas, ctx = canvas.ctx, fillText = ctx.fillText, drawn = [];
ctx.fillText = function (text, ...rest) { drawn.push(String(text)); return fillText.call(this, text, ...rest); };
try { canvas.draw(true, true); } finally { ctx.fillText = fillText; }
return drawn;
"""


def picture(seed: int, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8 noise, different for every seed (so the latent cache never answers)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(comfy) -> str:
    """The input folder Encode Training Folder reads; made before the page loads (its folder list)."""
    path = comfy.input_dir / FOLDER
    path.mkdir(parents=True, exist_ok=True)
    seed = time.time_ns() % 2**32
    for i, (stem, (width, height)) in enumerate(SIZES.items()):
        Image.fromarray(picture(seed + i, width, height), "RGB").save(path / f"{stem}.png")
        (path / f"{stem}.txt").write_text(f"lrtstyle, {stem}", encoding="utf-8")
    return FOLDER


@pytest.fixture(scope="module")
def page(comfy, folder):
    driver = browser.start_chromium()
    try:
        browser.open_comfyui(driver, comfy.url)
        yield driver
    finally:
        browser.quit_chromium(driver)


def test_encode_training_folder_shows_its_buckets_on_the_page(comfy, page, folder):
    from selenium.webdriver.common.by import By

    ids = page.execute_script(BUILD_JS, "LoRATrainer_EncodeTrainingFolder")
    encode = ids["encode"]
    browser.set_widget(page, ids["checkpoint"], "ckpt_name", comfy.checkpoint)
    browser.set_widget(page, encode, "folder", folder)
    for widget, value in ENCODE.items():
        browser.set_widget(page, encode, widget, value)
    assert page.execute_script(
        "return window.app.graph.getNodeById(arguments[0]).loraTrainerBuckets ?? null;", encode) is None

    before = set(comfy.get("/history"))
    started = time.monotonic()
    page.find_element(By.CSS_SELECTOR, "[data-testid=queue-button]").click()
    prompt_id = browser.wait_for(lambda: next(iter(set(comfy.get("/history")) - before), None)
                                 or next(iter(_queued(comfy) - before), None), 60, "the Run button queued nothing")
    entry = comfy.wait(prompt_id, timeout=300)
    print(f"\nran from the page in {time.monotonic() - started:.1f} s")
    assert entry["status"]["status_str"] == "success", comfy.execution_error(entry) or entry["status"]
    queued = entry["prompt"][2]
    assert queued[str(encode)]["class_type"] == "LoRATrainer_EncodeTrainingFolder"
    assert {k: queued[str(encode)]["inputs"][k] for k in ENCODE} == ENCODE  # the widgets as set on the page

    summary = entry["outputs"][str(encode)]["text"][0]
    print(f"history: {summary!r}")
    assert summary.startswith("4 images in 2 buckets (") and all(b in summary for b in BUCKETS), summary
    shown = browser.wait_for(lambda: page.execute_script(
        "return window.app.graph.getNodeById(arguments[0]).loraTrainerBuckets ?? null;", encode), 30,
        "Encode Training Folder's summary did not reach its node on the page")
    print(f"page:    {shown!r}")
    assert shown == summary
    drawn = page.execute_script(DRAWN_TEXT_JS)
    assert summary in drawn, f"the canvas did not draw the summary; it drew {drawn}"
    screenshot(page, "encode_training_folder_buckets")


def _queued(comfy) -> set[str]:
    queue = comfy.get("/queue")
    return {item[1] for item in queue.get("queue_running", []) + queue.get("queue_pending", [])}


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path
