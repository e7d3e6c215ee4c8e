"""The UI-format example workflows: they match /object_info, convert to their API twins, and
ComfyUI serves them as templates. Skips unless COMFYUI_DIR is set (see conftest.py)."""
from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WORKFLOWS = Path(__file__).resolve().parents[2] / "example_workflows"


def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / name).read_text())


# ---- UI-format workflows -----------------------------------------------------------------
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # nodes the browser draws; the server never sees them
FILE_COMBOS = {"ckpt_name", "lora_name", "folder", "existing_lora", "image", "unet_name", "clip_name1", "clip_name2",
               "vae_name", "clip_name"}  # lists depend on the user's files
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def widget_slots(node_info: dict) -> list[tuple[str, dict | None]]:
    """The frontend's widgets_values layout: (input name, its spec) per widget, in INPUT_TYPES order
    (required, then optional); (name, None) for the extra widgets the frontend adds: the
    "control after generate" combo after a seed, the upload button after an image_upload combo."""
    slots = []
    for section in ("required", "optional"):
        for name, spec in node_info["input"].get(section, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if not (isinstance(kind, list) or kind in WIDGET_TYPES) or opts.get("forceInput"):
                continue  # a socket, not a widget
            slots.append((name, {"type": kind, **opts}))
            if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                slots.append((name, None))
            if opts.get("image_upload"):
                slots.append((name, None))
    return slots


def check_widget(node_type: str, name: str, spec: dict, value) -> None:
    where = f"{node_type}.{name} = {value!r}"
    kind = spec["type"]
    if isinstance(kind, list) or kind == "COMBO":
        options = kind if isinstance(kind, list) else spec.get("options", [])
        assert name in FILE_COMBOS or value in options, f"{where}: not one of {options}"
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert spec.get("min", -np.inf) <= value <= spec.get("max", np.inf), where
        assert kind == "FLOAT" or float(value).is_integer(), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    else:
        assert isinstance(value, str), where


def ui_to_api(ui: dict, info: dict) -> dict:
    """What the frontend queues for a UI workflow: links → [node id, slot], widgets by name."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        inputs = {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]] for i in node["inputs"] if i.get("link") is not None}
        slots = widget_slots(info[node["type"]])
        assert len(node["widgets_values"]) == len(slots), (node["type"], node["widgets_values"], [n for n, _ in slots])
        for (name, spec), value in zip(slots, node["widgets_values"]):
            if spec is not None:
                check_widget(node["type"], name, spec, value)
                inputs.setdefault(name, value)
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def check_ui_structure(ui: dict, info: dict) -> None:
    assert ui["version"] == 0.4 and isinstance(ui["links"], list)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] >= max(nodes)
    assert ui["last_link_id"] >= max((link[0] for link in ui["links"]), default=0)
    for node in ui["nodes"]:
        assert {"id", "type", "pos", "size", "inputs", "outputs", "widgets_values", "mode", "order"} <= set(node), node
        assert node["type"] in FRONTEND_ONLY or node["type"] in info, f"{node['type']} is not in /object_info"
        if node["type"] in info:
            names = info[node["type"]]["output"]
            assert [o["type"] for o in node["outputs"]] == names, node["type"]
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id, link_id
        assert out["type"] == kind and inp["type"] in (kind, "*"), (link_id, out, inp)
    linked = {link[0] for link in ui["links"]}
    for node in ui["nodes"]:
        assert all(i.get("link") in linked | {None} for i in node["inputs"]), node["type"]


@pytest.mark.parametrize("name", ["train_lora", "sample_with_lora", "train_edit_lora", "train_inpaint_lora", "train_i2v_lora"])
def test_ui_workflow_matches_object_info_and_its_api_twin(comfy, name):
    info = comfy.object_info()
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    check_ui_structure(ui, info)
    converted, twin = ui_to_api(ui, info), load_api(f"{name}.json")
    assert set(converted) == set(twin)
    for node_id, node in twin.items():
        got = converted[node_id]
        assert got["class_type"] == node["class_type"]
        for key, value in node["inputs"].items():
            assert got["inputs"].get(key) == value, (node_id, key, got["inputs"].get(key), value)
        for key in set(got["inputs"]) - set(node["inputs"]):  # widgets the API twin leaves at their default
            spec = dict(widget_slots(info[node["class_type"]]))[key]
            assert got["inputs"][key] == spec.get("default"), (node_id, key)


def test_ui_workflows_are_served_as_templates(comfy):
    templates = comfy.get("/workflow_templates")
    ours = {folder: names for folder, names in templates.items() if "lora" in folder.lower() and "trainer" in folder.lower()}
    assert len(ours) == 1, templates
    (folder, names), = ours.items()
    assert sorted(names) == ["sample_with_lora", "train_edit_lora", "train_i2v_lora", "train_inpaint_lora",
                            "train_lora"], names
    served = comfy.get(f"/api/workflow_templates/{folder}/train_lora.json")
    assert served == json.loads((WORKFLOWS / "train_lora.json").read_text())
    for name in names:  # the template card's thumbnail (scripts/make_thumbnails.py)
        with urllib.request.urlopen(f"{comfy.url}/api/workflow_templates/{folder}/{name}.jpg", timeout=60) as response:
            assert response.headers["Content-Type"] == "image/jpeg", name
            with Image.open(io.BytesIO(response.read())) as image:
                assert image.format == "JPEG" and image.size == (400, 400), (name, image.format, image.size)


def test_display_names_are_not_core_names(comfy):
    """Node search and the canvas tell ours from core's Train LoRA, Load LoRA Model, Plot Loss Graph."""
    info = comfy.object_info()
    ours = {k: v["display_name"] for k, v in info.items() if k.startswith("LoRATrainer_")}
    others = {v["display_name"] for k, v in info.items() if not k.startswith("LoRATrainer_")}
    assert len(ours) >= 10 and all(name.endswith(" (LoRA Trainer)") for name in ours.values()), ours
    assert not others & set(ours.values()) and {"Train LoRA", "Plot Loss Graph"} <= others
