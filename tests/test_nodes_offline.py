"""Everything of the node layer that needs no ComfyUI: the schemas users rely on, the import boundary,
image-set loading, the loss graph, and the demo end to end."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comfyui_lora_trainer as pack
from comfyui_lora_trainer.lora import load_lora_file
from comfyui_lora_trainer.tiny.demo import GRID_ROWS, run_demo
from comfyui_lora_trainer.training.images import load_image_folder, load_images
from comfyui_lora_trainer.training.plot import plot_losses, smooth

ROOT = Path(pack.__file__).resolve().parent
CORE_IDS = {"TrainLoraNode", "SaveLoRA", "LoraModelLoader", "LossGraphNode", "LoadImageSetNode",
            "LoadImageSetFromFolderNode", "LoadImageTextSetFromFolderNode"}


def test_node_ids_unique_and_tooltips_everywhere():
    assert len(pack.NODE_CLASS_MAPPINGS) == 21 and not CORE_IDS & set(pack.NODE_CLASS_MAPPINGS)
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for kind, section in spec.items():
            if kind == "hidden":  # "PROMPT", "UNIQUE_ID": ComfyUI fills them, the user never sees them
                assert set(section.values()) <= {"PROMPT", "UNIQUE_ID"}, node_id
                continue
            for name, (_, options) in section.items():
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES), node_id
        assert cls.FUNCTION == "execute" and cls.DESCRIPTION and cls.CATEGORY


def test_display_names_carry_the_pack_marker():
    """Core's Train LoRA, Load LoRA Model and Plot Loss Graph share our plain names (nodes_train.py)."""
    core_names = {"Train LoRA", "Load LoRA Model", "Plot Loss Graph", "Save LoRA Weights"}
    names = pack.NODE_DISPLAY_NAME_MAPPINGS
    assert names["LoRATrainer_TrainLoRA"] == "Train LoRA (LoRA Trainer)"
    assert all(name.endswith(" (LoRA Trainer)") for name in names.values()), names
    assert len(set(names.values())) == len(names) and not core_names & set(names.values())


def test_train_lora_schema_matches_spec():
    cls = pack.NODE_CLASS_MAPPINGS["LoRATrainer_TrainLoRA"]
    spec = cls.INPUT_TYPES()
    assert {k: v[0] for k, v in spec["required"].items()} == {
        "model": "MODEL", "latents": "LATENT", "positive": "CONDITIONING"}
    opt = spec["optional"]
    expect = {"batch_size": (1, 1, 10000), "steps": (16, 1, 100000), "learning_rate": (0.0005, 1e-7, 1.0),
              "rank": (8, 1, 128), "seed": (0, 0, 18446744073709551615)}
    for name, (default, low, high) in expect.items():
        assert (opt[name][1]["default"], opt[name][1]["min"], opt[name][1]["max"]) == (default, low, high), name
    assert opt["optimizer"][0][:4] == ["AdamW", "Adam", "SGD", "RMSprop"]  # core's four, then the extras
    combos = {"optimizer": (opt["optimizer"][0], "AdamW"),
              "loss_function": (["MSE", "L1", "Huber", "SmoothL1"], "MSE"),
              "training_dtype": (["bf16", "fp32"], "bf16"), "lora_dtype": (["bf16", "fp32"], "bf16")}
    for name, (choices, default) in combos.items():
        assert opt[name][0] == choices and opt[name][1]["default"] == default, name
    assert opt["existing_lora"][0] == ["[None]"] and opt["existing_lora"][1]["default"] == "[None]"
    # core's four outputs first (links to them stay valid), then the preview grid (docs/long-runs.md#sample-previews)
    assert cls.RETURN_TYPES == ("MODEL", "LORA_MODEL", "LOSS_MAP", "INT", "IMAGE")
    assert cls.RETURN_NAMES == ("model_with_lora", "lora", "loss", "steps", "previews") and cls.INPUT_IS_LIST
    assert (opt["preview"][0], opt["validation"][0]) == ("LORA_PREVIEW", "LORA_VALIDATION")


def test_other_schemas_match_spec():
    m = pack.NODE_CLASS_MAPPINGS
    save = m["LoRATrainer_SaveLoRA"].INPUT_TYPES()
    assert save["required"]["lora"][0] == "LORA_MODEL" and save["required"]["prefix"][1]["default"].startswith("loras/")
    assert save["optional"]["steps"][0] == "INT"
    assert save["optional"]["format"][0] == ["portable", "full"] and save["optional"]["format"][1]["default"] == "portable"
    load = m["LoRATrainer_LoadLoRAModel"].INPUT_TYPES()["required"]
    assert [v[0] for v in load.values()] == ["MODEL", "LORA_MODEL", "FLOAT"] and load["strength_model"][1]["min"] < 0
    plot = m["LoRATrainer_PlotLossGraph"].INPUT_TYPES()["required"]
    assert plot["loss"][0] == "LOSS_MAP" and plot["filename_prefix"][0] == "STRING"
    for node_id in ("LoRATrainer_LoadImageSet", "LoRATrainer_LoadImageSetFromFolder"):
        assert m[node_id].INPUT_TYPES()["optional"]["resize_method"][0] == ["None", "Stretch", "Crop", "Pad"]
        assert m[node_id].RETURN_TYPES == ("IMAGE",)


def _pack_imports(path: Path, tree: ast.AST) -> set[str]:
    """The pack's top-level packages (`lora`, `training`, …) that a module's relative imports reach."""
    package = path.relative_to(ROOT).parts[:-1]  # ("lora", "algos") for lora/algos/lora.py
    reached = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        target = package[:len(package) - node.level + 1] + (tuple(node.module.split(".")) if node.module else ())
        reached.update([target[0]] if target else [a.name for a in node.names])  # `from .. import x`
    return reached


def test_import_boundary():
    """training/, lora/ and tiny/ never import ComfyUI; nodes/ only inside functions (or in glue
    modules that the node classes import lazily). nodes/ → training/, lora/; training/ → lora/;
    never back: lora/ imports neither training/ nor nodes/, training/ not nodes/. The tiny host
    (tiny/) imports the engine and nothing of the pack imports it."""
    comfy = ("comfy", "comfy_extras", "comfy_api", "folder_paths", "node_helpers", "server")
    glue = {"comfy_train.py", "comfy_io.py", "comfy_preview.py", "comfy_dataset.py", "comfy_conds.py", "comfy_clips.py",
            "comfy_text_encoder.py", "comfy_adapter.py", "comfy_experts.py"}
    never_imports = {"lora": {"training", "nodes", "tiny"}, "training": {"nodes", "tiny"}, "nodes": {"tiny"},
                     "tiny": set()}
    for top, never in never_imports.items():
        paths = sorted((ROOT / top).rglob("*.py"))
        assert paths, top
        for path in paths:
            tree = ast.parse(path.read_text())
            module_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
            every = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
            for node in every if top != "nodes" else (module_level if path.name not in glue else []):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in comfy for n in names), f"{path} imports {names}"
            assert not _pack_imports(path, tree) & never, f"{path} imports {_pack_imports(path, tree) & never}"
    root = ROOT / "__init__.py"  # what ComfyUI loads; __main__.py (the demo's command) may import tiny/
    assert "tiny" not in _pack_imports(root, ast.parse(root.read_text()))


def _module_graph() -> dict[str, set[str]]:
    """The pack's modules (dotted, from the root) → the pack's modules they import, at module level or
    inside functions (a lazy import closes a circle as surely as a top-level one)."""
    files = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[0] in (".venv", "tests", "scripts", "build", "output") or parts == ("setup",):
            continue
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = [p for p in package if p]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
                for alias in node.names:
                    sub = ".".join(target + [alias.name])
                    deps.add(sub if sub in files else ".".join(target))
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_circle():
    graph = _module_graph()
    assert "nodes.comfy_train" in graph and "nodes.loss_map" in graph["nodes.plot"]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            assert state.get(dep) != 1, " -> ".join(path[path.index(dep):] + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _save(path: Path, img: Image.Image, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_image_modes_and_exif(tmp_path):
    rgb = Image.new("RGB", (8, 4), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    paths = [_save(tmp_path / "a.jpg", rgb, exif=exif, quality=100),
             _save(tmp_path / "b.png", Image.new("L", (4, 8), 128)),
             _save(tmp_path / "c.png", Image.fromarray(np.full((8, 4), 65535, dtype=np.uint16))),
             _save(tmp_path / "d.png", Image.new("RGB", (4, 8), (0, 0, 255)).convert("P")),
             _save(tmp_path / "e.png", Image.new("RGBA", (4, 8), (0, 0, 0, 0)))]
    images = load_images(paths)
    assert images.shape == (5, 8, 4, 3) and images.dtype == torch.float32
    assert images[0, ..., 0].mean() > 0.9  # EXIF applied: 8×4 became 4 wide, 8 high
    assert torch.allclose(images[1], torch.full((8, 4, 3), 128 / 255))
    assert torch.allclose(images[2], torch.ones(8, 4, 3))  # 16-bit white stays white
    assert torch.allclose(images[3, ..., 2], torch.ones(8, 4))
    assert torch.allclose(images[4], torch.ones(8, 4, 3))  # transparent → white


def test_resize_methods(tmp_path):
    wide = _save(tmp_path / "wide.png", Image.new("RGB", (16, 8), (255, 255, 255)))
    square = _save(tmp_path / "sq.png", Image.new("RGB", (8, 8), (255, 255, 255)))
    with pytest.raises(ValueError, match=r"wide.png: size 16x8 differs from 8x8 \(sq.png\); set resize_method"):
        load_images([square, wide])
    assert load_images([square, wide], "Stretch").shape == (2, 8, 8, 3)
    assert torch.allclose(load_images([square, wide], "Crop")[1], torch.ones(8, 8, 3))
    padded = load_images([square, wide], "Pad")[1]
    assert torch.allclose(padded[2:6], torch.ones(4, 8, 3)) and padded[0].max() == 0 and padded[7].max() == 0


def test_folder_captions_repeats_and_errors(tmp_path):
    (tmp_path / "3_subject").mkdir()
    _save(tmp_path / "3_subject" / "x.png", Image.new("RGB", (4, 4)))
    (tmp_path / "3_subject" / "x.txt").write_text("a photo of sks\n")
    _save(tmp_path / "y.png", Image.new("RGB", (4, 4)))
    (tmp_path / "notes.md").write_text("not an image")
    image_set = load_image_folder(tmp_path)
    assert image_set.images.shape[0] == 4 and image_set.captions == ["a photo of sks"] * 3 + [""]
    (tmp_path / "z.png").write_bytes(b"not really a png")
    with pytest.raises(ValueError, match=r"image .*z.png: cannot be read"):
        load_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"folder: .*empty holds no images"):
        load_image_folder(tmp_path / "empty")


@pytest.mark.parametrize("losses", [[0.5], [0.2] * 30, list(np.exp(-np.arange(100) / 10.0))])
def test_plot_draws_single_flat_and_decaying(losses):
    image = plot_losses(losses)
    assert image.shape == (450, 800, 3) and image.dtype == np.uint8 and image.std() > 0
    with pytest.raises(ValueError, match="loss history is empty"):
        plot_losses([])
    assert np.allclose(smooth([1.0, 2.0, 3.0, 4.0, 5.0], 4), [1, 2, 3, 4, 5])  # a line stays a line


def test_demo_end_to_end(tmp_path):
    result = run_demo(tmp_path, steps=40)
    sd, meta = load_lora_file(result.paths["lora"])
    assert meta["ss_steps"] == "40" and meta["lora_trainer.format"] == "full" and any(k.endswith(".lora_down.weight") for k in sd)
    for key, path in result.paths.items():
        if key != "lora":
            assert Image.open(path).size[0] > 100
    assert Image.open(result.paths[f"samples ({GRID_ROWS})"]).size == (6 * 32 * 4, 4 * 32 * 4)  # 4 rows of 6
    base, lora, half = (result.scores[name] for name in ("base", "LoRA", "LoRA at 0.5"))
    # Even a short run moves the numbers the right way: closer to the six images, their colours
    # nearer (the full strength nearer than half), and further from the procedural pictures.
    assert lora.images_loss < base.images_loss
    assert lora.colour_distance < half.colour_distance < base.colour_distance
    assert lora.procedural_loss > base.procedural_loss
