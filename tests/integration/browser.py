"""ComfyUI's real frontend in headless Chromium, driven by selenium (test_browser.py, scripts/make_thumbnails.py).

Uses the system's Chromium and chromedriver (Debian: packages chromium and chromium-driver), never a
client that downloads its own browser. Environment: CHROMIUM (default: chromium on PATH, else
/usr/bin/chromium) and CHROMEDRIVER (default: chromedriver on PATH, else /usr/bin/chromedriver).

The page is ComfyUI's own: `window.app` (ComfyApp: loadGraphData, graph, canvas, nodeOutputs) and
`window.LiteGraph` (registered_node_types) are what the frontend itself exposes to extensions.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

WINDOW = (1280, 800)  # a laptop-sized window: the examples must open with every node in view here
READY_JS = "return !!(window.app && window.app.graph && window.app.canvas && window.app.vueAppReady)"

# Every node's box (title bar included) in page pixels, and which of 9 points on it (corners, edge
# middles, centre) are hidden by a panel of the UI (sidebar, top bar, Run bar, minimap, ...) or lie
# outside the window. A point is in view when the topmost element there is the graph canvas or a DOM
# widget drawn over the canvas (text boxes, the markdown note).
# nodeBox(node): the node's box in window pixels and the points of it (corners, edges' middles, centre)
# that something other than the canvas covers (its own DOM widgets aside)
NODE_BOX_FUNCTION = """
const app = window.app, canvas = app.canvas, el = canvas.canvas, r = el.getBoundingClientRect();
function nodeBox(node) {
  const b = node.boundingRect;
  const [x0, y0] = canvas.ds.convertOffsetToCanvas([b[0], b[1]]);
  const [x1, y1] = canvas.ds.convertOffsetToCanvas([b[0] + b[2], b[1] + b[3]]);
  const box = [r.left + x0, r.top + y0, r.left + x1, r.top + y1];
  const hidden = [];
  for (const fx of [0.01, 0.5, 0.99]) for (const fy of [0.01, 0.5, 0.99]) {
    const x = box[0] + fx * (box[2] - box[0]), y = box[1] + fy * (box[3] - box[1]);
    const hit = document.elementFromPoint(x, y);
    if (hit === el || (hit && hit.closest('.dom-widget, textarea'))) continue;
    hidden.push([Math.round(x), Math.round(y), hit ? hit.tagName + '.' + String(hit.className).slice(0, 60) : 'outside the window']);
  }
  return {box: box.map(Math.round), hidden};
}
"""
NODE_BOXES_JS = NODE_BOX_FUNCTION + """
return app.graph._nodes.map(node => ({id: String(node.id), type: node.type, title: node.title, ...nodeBox(node),
                                      registered: !!LiteGraph.registered_node_types[node.type]}));
"""

# The text of the error overlay the frontend shows after loading a workflow (missing node types,
# missing models), or null.
ERROR_OVERLAY_JS = """
const button = document.querySelector('[data-testid=error-overlay-see-errors]');
if (!button) return null;
let box = button;
for (let i = 0; i < 4 && box.parentElement; i++) box = box.parentElement;
return box.innerText;
"""


class NoBrowser(Exception):
    """selenium, Chromium or chromedriver is missing (the browser tests skip)."""


def _find(env: str, name: str) -> str:
    path = os.environ.get(env) or shutil.which(name) or f"/usr/bin/{name}"
    if not Path(path).is_file():
        raise NoBrowser(f"no {name} (set {env}, or install Debian's chromium and chromium-driver)")
    return path


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths; raises NoBrowser naming what is missing (selenium too)."""
    try:
        import selenium  # noqa: F401
    except ImportError as why:
        raise NoBrowser(f"selenium is not installed ({why}); pip install selenium") from why
    return _find("CHROMIUM", "chromium"), _find("CHROMEDRIVER", "chromedriver")


def start_chromium(size: tuple[int, int] = WINDOW) -> Any:
    """A headless Chromium with a fresh profile and a `size` viewport; the caller quits it."""
    chromium, chromedriver = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="lora-trainer-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    # --window-size counts the window frame; the viewport is what a user's page gets
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False})
    driver.lora_trainer_profile = profile
    return driver


def quit_chromium(driver: Any) -> None:
    try:
        driver.quit()
    finally:
        shutil.rmtree(driver.lora_trainer_profile, ignore_errors=True)


def open_comfyui(driver: Any, url: str, timeout: float = 120) -> None:
    """Load the frontend and close what a first visit opens (the templates browser)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    wait_for(lambda: driver.execute_script(READY_JS), timeout, "ComfyUI's frontend did not start")
    time.sleep(1)  # the templates dialog opens right after the app is ready
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    time.sleep(0.5)


def load_workflow(driver: Any, workflow: dict) -> None:
    """Open a UI-format workflow as the frontend opens a file or template (view restored from extra.ds)."""
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.app.loadGraphData(arguments[0]).then(() => done(null), e => done(String(e)));", workflow)
    time.sleep(1)  # a few frames: DOM widgets and overlays settle


def set_widget(driver: Any, node_id: int | str, name: str, value: Any) -> None:
    """Set a widget as a user would (the value a queued prompt reads); raises on a missing one."""
    found = driver.execute_script(
        "const n = window.app.graph.getNodeById(arguments[0]);"
        "const w = n && n.widgets && n.widgets.find(w => w.name === arguments[1]);"
        "if (!w) return false; w.value = arguments[2]; if (w.callback) w.callback(w.value); return true;",
        int(node_id), name, value)
    if not found:
        raise KeyError(f"node {node_id} has no widget {name!r}")


def wait_for(condition, timeout: float, message: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{message} within {timeout} s")
