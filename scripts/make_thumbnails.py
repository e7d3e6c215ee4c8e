"""Make example_workflows/<name>.jpg: the template-card thumbnail of each UI example workflow.

ComfyUI's template browser asks for `/api/workflow_templates/<pack>/<name>.jpg` beside each example.
This script opens every example in ComfyUI's real frontend (a throw-away server from
tests/integration/server.py, headless Chromium through tests/integration/browser.py), draws it at
zoom 1 in the middle of a large window, where no panel of the UI covers it, crops the screenshot to
the nodes, pads it to a square with the canvas colour and saves a 400x400 JPEG (the size of core's
template thumbnails).

The server gets zero-byte stand-ins named like the files the examples pick (checkpoint, LoRA) and
the input folders they read, so that the frontend marks nothing as missing; nothing is loaded.

Usage: COMFYUI_DIR=/path/to/ComfyUI $COMFYUI_DIR/venv/bin/python scripts/make_thumbnails.py [--out DIR]
Needs selenium, Chromium and chromedriver (Debian: chromium, chromium-driver).
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "example_workflows"
INTEGRATION = ROOT / "tests" / "integration"
SIDE = 400  # px, square
WINDOW = (2600, 1800)  # large enough that the graph at zoom 1 sits clear of the sidebar, bars and minimap
MARGIN = 24  # graph units around the nodes
PLACEHOLDERS = {  # what the examples pick, so that nothing shows as missing
    "models/checkpoints": ["v1-5-pruned-emaonly.safetensors", "sd-v1-5-inpainting.safetensors"],
    "models/loras": ["lrtstyle_200_steps_00001_.safetensors"],
    "input/lora_dataset": ["placeholder.png"],
    "input/lora_validation": ["placeholder.png"],
    "models/diffusion_models": ["flux1-dev-kontext_fp8_scaled.safetensors", "wan2.1_i2v_480p_14B_fp8_e4m3fn.safetensors"],
    "models/text_encoders": ["clip_l.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors",
                             "umt5_xxl_fp8_e4m3fn_scaled.safetensors"],
    "models/vae": ["ae.safetensors", "wan_2.1_vae.safetensors"],
    "input/i2v_clips": ["placeholder.png"],
    "input/edit_pairs/targets": ["placeholder.png"],
    "input/edit_pairs/controls": ["placeholder.png"],
    "input/inpaint_set/images": ["placeholder.png"],
    "input/inpaint_set/masks": ["placeholder.png"],
}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _stand_ins(folder: Path) -> dict[str, Path]:
    """{path in the ComfyUI base dir: a stand-in file} for make_base_dir's `extra`."""
    empty, image = folder / "empty", folder / "placeholder.png"
    empty.write_bytes(b"")
    Image.new("RGB", (8, 8), (128, 128, 128)).save(image)
    return {f"{where}/{name}": image if name.endswith(".png") else empty
            for where, names in PLACEHOLDERS.items() for name in names}


def thumbnail(driver, browser, workflow: dict) -> Image.Image:
    """The workflow drawn at zoom 1, cropped to its nodes, padded square, SIDE x SIDE."""
    nodes = workflow["nodes"]
    left = min(n["pos"][0] for n in nodes) - MARGIN
    top = min(n["pos"][1] for n in nodes) - 30 - MARGIN  # the title bar sits above pos
    workflow = {**workflow, "extra": {**workflow.get("extra", {}), "ds": {"scale": 1.0, "offset": [300 - left, 200 - top]}}}
    browser.load_workflow(driver, workflow)
    boxes = driver.execute_script(browser.NODE_BOXES_JS)
    x0 = min(b["box"][0] for b in boxes) - MARGIN
    y0 = min(b["box"][1] for b in boxes) - MARGIN
    x1 = max(b["box"][2] for b in boxes) + MARGIN
    y1 = max(b["box"][3] for b in boxes) + MARGIN
    hidden = {b["title"]: b["hidden"] for b in boxes if b["hidden"]}
    if hidden:
        raise RuntimeError(f"nodes under the UI's panels; make WINDOW larger: {hidden}")
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    crop = shot.crop((x0, y0, x1, y1))
    side = max(crop.size)
    square = Image.new("RGB", (side, side), shot.getpixel((x0, y0)))  # the canvas colour beside the nodes
    square.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
    return square.resize((SIDE, SIDE), Image.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WORKFLOWS, help="where the JPEGs go (default: example_workflows)")
    args = parser.parse_args(argv)
    server = _load("lora_trainer_it_server", INTEGRATION / "server.py")
    browser = _load("lora_trainer_it_browser", INTEGRATION / "browser.py")
    comfy_dir = server.comfyui_dir()
    with tempfile.TemporaryDirectory(prefix="lora-trainer-thumbnails-") as tmp:
        base, stand_ins = Path(tmp) / "base", Path(tmp) / "stand_ins"
        stand_ins.mkdir()
        server.make_base_dir(base, None, _stand_ins(stand_ins))
        client = server.start_server(comfy_dir, server.comfyui_python(comfy_dir), base)
        driver = None
        try:
            driver = browser.start_chromium(WINDOW)
            browser.open_comfyui(driver, client.url)
            for path in sorted(WORKFLOWS.glob("*.json")):
                image = thumbnail(driver, browser, json.loads(path.read_text("utf-8")))
                out = args.out / f"{path.stem}.jpg"
                image.save(out, "JPEG", quality=85, optimize=True)
                print(f"{out} ({out.stat().st_size // 1024} KiB)")
        finally:
            if driver is not None:
                browser.quit_chromium(driver)
            server.stop(client.process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
