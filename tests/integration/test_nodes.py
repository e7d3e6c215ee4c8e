"""The pack's nodes inside a real ComfyUI server (CPU, the tiny random-weight SD1.5 checkpoint).

Driven through the HTTP API with the example workflows (example_workflows/api/*.json) adapted to
64×64 images and a few steps. What is checked: the schemas ComfyUI serves (docs/nodes.md), training
runs and the loss falls, the saved file loads in core's LoraLoaderModelOnly with every key matched,
Train LoRA's MODEL output and Load LoRA Model sample exactly like that file, the base model is
bit-identical after training / cancel / error (a base-model sample equals the one taken before this
module trained, and one from a freshly loaded checkpoint), continuing adds up steps, and every bad
input (docs/data.md#bad-input) fails with our message in ComfyUI's `execution_error`. Skips unless COMFYUI_DIR
is set (see conftest.py). The UI-format workflows are checked in test_workflows.py.

Caching note: ComfyUI reuses a node's output when its inputs (and its ancestors') are unchanged, so
each base-model sample goes through core's LoraLoaderModelOnly at strength 0 (which returns the
model untouched, without reading the file) with a fresh probe file name: the KSampler re-runs while
the checkpoint loader stays cached, i.e. the very model object that training patched is sampled.
"""
from __future__ import annotations

import copy
import itertools
import json
import re
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "example_workflows"
DEMO_IMAGES = ROOT / "assets" / "demo_images"

PACK_NODES = {  # id -> (required inputs, optional inputs, output types), as docs/nodes.md lists them
    "LoRATrainer_TrainLoRA": (
        ["model", "latents", "positive"],
        ["batch_size", "steps", "learning_rate", "rank", "optimizer", "loss_function", "seed",
         "training_dtype", "lora_dtype", "existing_lora"],
        ["MODEL", "LORA_MODEL", "LOSS_MAP", "INT"]),
    "LoRATrainer_SaveLoRA": (["lora", "prefix"], ["steps"], None),
    "LoRATrainer_LoadLoRAModel": (["model", "lora", "strength_model"], ["clip", "strength_clip"], ["MODEL", "CLIP"]),
    "LoRATrainer_PlotLossGraph": (["loss", "filename_prefix"], [], None),
    "LoRATrainer_LoadImageSet": (["image"], ["resize_method"], ["IMAGE"]),
    "LoRATrainer_LoadImageSetFromFolder": (["folder"], ["resize_method"], ["IMAGE"]),
    "LoRATrainer_LoadCaptionedImageSet": (["folder", "clip"], ["resize_method"], ["IMAGE", "CONDITIONING"]),
    "LoRATrainer_EncodeTrainingFolder": (["folder", "vae", "resolution"], ["clip", "conditioning", "masks", "flip", "cache",
                                                                          "inpaint", "control_folder"],
                                         ["LATENT", "CONDITIONING", "STRING"]),
    "LoRATrainer_EncodeTrainingClips": (["folder", "vae", "resolution", "frames"], ["clip", "conditioning",
                                                                                     "image_to_video"],
                                        ["LATENT", "CONDITIONING", "STRING"]),
}

SIZE = 64  # px; a Train LoRA step on the tiny UNet takes ~0.1 s on CPU at this size
DATASET = "it_dataset"  # 3 demo images with .txt captions
TRAIN = {"steps": 30, "learning_rate": 2e-3, "training_dtype": "fp32", "seed": 1}
TRAIN_NODE, SAVE_NODE, PLOT_NODE = "5", "6", "7"  # ids in train_lora.json
LORA_NOT_LOADED = "lora key not loaded"
_probe_ids = itertools.count()


# ---- graphs ------------------------------------------------------------------------------
def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / name).read_text())


def train_graph(comfy, folder: str = DATASET, prefix: str = "loras/it_train", **train_inputs) -> dict:
    """train_lora.json at 64 px on the tiny checkpoint; `train_inputs` override Train LoRA's."""
    g = load_api("train_lora.json")
    for branch in ("preview", "validation"):  # the example's extras (test_browser.py runs them); not needed here
        del g[TRAIN_NODE]["inputs"][branch]  # their nodes then feed no output, so ComfyUI skips them
    g["1"]["inputs"]["ckpt_name"] = comfy.checkpoint
    g["2"]["inputs"].update(folder=folder, width=SIZE, height=SIZE)
    g[TRAIN_NODE]["inputs"].update({**TRAIN, **train_inputs})
    g[SAVE_NODE]["inputs"]["prefix"] = prefix
    g[PLOT_NODE]["inputs"]["filename_prefix"] = "it_loss/graph"
    return g


def sample_graph(comfy, lora_name: str, strength: float, prefix: str) -> dict:
    """sample_with_lora.json at 64 px, 2 steps, cfg 2, on the tiny checkpoint."""
    g = load_api("sample_with_lora.json")
    g["1"]["inputs"]["ckpt_name"] = comfy.checkpoint
    g["2"]["inputs"].update(lora_name=lora_name, strength_model=strength)
    g["5"]["inputs"].update(width=SIZE, height=SIZE)
    g["6"]["inputs"].update(steps=2, cfg=2.0, seed=7)
    g["8"]["inputs"]["filename_prefix"] = f"it_samples/{prefix}"
    return g


def pixels(comfy, entry: dict, node: str = "8") -> np.ndarray:
    image = entry["outputs"][node]["images"][0]
    with Image.open(comfy.output_dir / image["subfolder"] / image["filename"]) as img:
        return np.asarray(img.convert("RGB")).copy()


def sample_base(comfy, tag: str) -> np.ndarray:
    """A sample from the cached base model (see the module docstring for the probe trick)."""
    probe = f"it_probe_{next(_probe_ids)}.safetensors"
    (comfy.loras_dir / probe).write_bytes(b"")  # never read: strength 0 returns before loading
    return pixels(comfy, comfy.run(sample_graph(comfy, probe, 0.0, tag)))


def checkpoint_loads(comfy) -> int:
    """How often the server has built a model from a checkpoint so far."""
    return comfy.log().count("model weight dtype")


def run_failing(comfy, graph: dict, timeout: float = 300) -> tuple[dict, str]:
    """Queue a graph that must fail while executing; (history entry, 'Node: Type: message')."""
    entry = comfy.wait(comfy.queue(graph), timeout)
    assert entry["status"]["status_str"] == "error", entry["status"]
    error = comfy.execution_error(entry)
    assert error, entry["status"]
    return entry, error


def listed_name(saved: str) -> str:
    """Save LoRA's path relative to the output folder → its name in the `loras` lists."""
    assert saved.startswith("loras/"), saved
    return saved[len("loras/"):]


# ---- fixtures ----------------------------------------------------------------------------
def _write_dataset(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(DEMO_IMAGES / f"{name}.png", folder / f"{name}.png")
        shutil.copy(DEMO_IMAGES / f"{name}.txt", folder / f"{name}.txt")


@pytest.fixture(scope="module")
def dataset(comfy) -> str:
    _write_dataset(comfy.input_dir / DATASET, ["circle", "stripes", "sunset"])
    return DATASET


@pytest.fixture(scope="module")
def baseline(comfy) -> np.ndarray:
    """A base-model sample taken before this module trains anything."""
    return sample_base(comfy, "baseline")


class Trained(NamedTuple):
    entry: dict
    saved: str  # relative to the output folder, e.g. loras/it_train_30_steps_00001_.safetensors
    losses: list[float]
    log: str
    loads: int  # checkpoint loads when training finished


def with_samplers(comfy, graph: dict) -> dict:
    """Add to a training graph two samples: from Train LoRA's MODEL output (saved by node "s8") and
    from our Load LoRA Model applying its LORA_MODEL to the base model ("t8")."""
    sample = sample_graph(comfy, "unused", 1.0, "train_output")
    refs = {"1": "1", "2": TRAIN_NODE}  # the checkpoint is shared; "the model" is Train LoRA's output
    for node_id in ("3", "4", "5", "6", "7", "8"):
        node = copy.deepcopy(sample[node_id])
        node["inputs"] = {k: [refs.get(v[0], "s" + v[0]), v[1]] if isinstance(v, list) else v
                          for k, v in node["inputs"].items()}
        graph["s" + node_id] = node
    graph["t2"] = {"class_type": "LoRATrainer_LoadLoRAModel",
                   "inputs": {"model": ["1", 0], "lora": [TRAIN_NODE, 1], "strength_model": 1.0}}
    graph["t6"] = {"class_type": "KSampler", "inputs": {**graph["s6"]["inputs"], "model": ["t2", 0]}}
    graph["t7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["t6", 0], "vae": ["1", 2]}}
    graph["t8"] = {"class_type": "SaveImage", "inputs": {"images": ["t7", 0], "filename_prefix": "it_samples/load_lora_model"}}
    return graph


@pytest.fixture(scope="module")
def trained(comfy, dataset, baseline) -> Trained:
    mark = len(comfy.log())
    entry = comfy.run(with_samplers(comfy, train_graph(comfy)), timeout=600)
    saved = entry["outputs"][SAVE_NODE]["text"][0]
    return Trained(entry, saved, entry["outputs"][PLOT_NODE]["loss"], comfy.log(mark), checkpoint_loads(comfy))


def assert_base_model_restored(comfy, baseline: np.ndarray, loads: int, tag: str) -> np.ndarray:
    """Sample the cached base model (the object training used: no checkpoint load since `loads`)."""
    image = sample_base(comfy, tag)
    assert checkpoint_loads(comfy) == loads, "the checkpoint was reloaded; the check would prove nothing"
    assert np.array_equal(image, baseline), f"base-model sample changed ({tag}): the model was not restored"
    return image


# ---- schemas -----------------------------------------------------------------------------
def test_object_info_lists_every_node_with_spec_inputs(comfy):
    info = comfy.object_info()
    for node_id, (required, optional, outputs) in PACK_NODES.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        node = info[node_id]
        assert node["python_module"].startswith("custom_nodes."), node["python_module"]
        assert list(node["input"]["required"])[: len(required)] == required, node_id
        missing = [n for n in optional if n not in node["input"].get("optional", {})]
        assert not missing, f"{node_id}: optional inputs {missing} missing"
        if outputs is not None:
            assert node["output"][: len(outputs)] == outputs, node_id

    train = info["LoRATrainer_TrainLoRA"]
    # core's four outputs first, so links to them stay valid; then the previews grid (docs/long-runs.md#sample-previews)
    assert train["output"] == ["MODEL", "LORA_MODEL", "LOSS_MAP", "INT", "IMAGE"]
    assert list(train["input"]["optional"])[:10] == PACK_NODES["LoRATrainer_TrainLoRA"][1]
    opt = train["input"]["optional"]
    assert opt["batch_size"][0] == "INT" and opt["batch_size"][1]["default"] == 1
    assert (opt["batch_size"][1]["min"], opt["batch_size"][1]["max"]) == (1, 10000)
    assert opt["steps"][1]["default"] == 16 and (opt["steps"][1]["min"], opt["steps"][1]["max"]) == (1, 100000)
    assert opt["learning_rate"][0] == "FLOAT" and opt["learning_rate"][1]["default"] == 0.0005
    assert (opt["learning_rate"][1]["min"], opt["learning_rate"][1]["max"]) == (1e-7, 1.0)
    assert opt["rank"][1]["default"] == 8 and (opt["rank"][1]["min"], opt["rank"][1]["max"]) == (1, 128)
    assert opt["optimizer"][0][:4] == ["AdamW", "Adam", "SGD", "RMSprop"] and opt["optimizer"][1]["default"] == "AdamW"
    assert opt["loss_function"][0] == ["MSE", "L1", "Huber", "SmoothL1"]
    assert opt["seed"][1]["default"] == 0 and opt["seed"][1]["max"] == 2**64 - 1
    assert opt["training_dtype"][0] == ["bf16", "fp32"] and opt["training_dtype"][1]["default"] == "bf16"
    assert opt["lora_dtype"][0] == ["bf16", "fp32"] and opt["lora_dtype"][1]["default"] == "bf16"
    assert opt["existing_lora"][0][0] == "[None]" and opt["existing_lora"][1]["default"] == "[None]"
    assert [train["input"]["required"][k][0] for k in ("model", "latents", "positive")] == ["MODEL", "LATENT", "CONDITIONING"]

    save = info["LoRATrainer_SaveLoRA"]["input"]
    assert save["required"]["lora"][0] == "LORA_MODEL"
    assert save["required"]["prefix"][1]["default"].startswith("loras/")
    assert save["optional"]["steps"][0] == "INT"
    load = info["LoRATrainer_LoadLoRAModel"]["input"]["required"]
    assert load["lora"][0] == "LORA_MODEL" and load["strength_model"][1]["min"] < 0
    assert info["LoRATrainer_PlotLossGraph"]["input"]["required"]["loss"][0] == "LOSS_MAP"
    for node_id in ("LoRATrainer_LoadImageSet", "LoRATrainer_LoadImageSetFromFolder", "LoRATrainer_LoadCaptionedImageSet"):
        assert info[node_id]["input"]["optional"]["resize_method"][0] == ["None", "Stretch", "Crop", "Pad"]


# ---- training and inference --------------------------------------------------------------
def test_training_workflow_runs_and_the_loss_falls(comfy, trained):
    losses = trained.losses
    assert len(losses) == TRAIN["steps"] and all(np.isfinite(losses))
    first, last = float(np.mean(losses[:8])), float(np.mean(losses[-8:]))
    assert last < 0.8 * first, f"loss did not fall: first 8 mean {first:.4f}, last 8 mean {last:.4f}: {losses}"
    assert re.fullmatch(r"loras/it_train_30_steps_\d{5}_\.safetensors", trained.saved), trained.saved
    assert (comfy.output_dir / trained.saved).is_file()
    graph = trained.entry["outputs"][PLOT_NODE]["images"][0]
    assert (comfy.output_dir / graph["subfolder"] / graph["filename"]).is_file()
    assert re.search(r"Train LoRA:.*30/30.*loss=\d", trained.log), "no loss on the console progress bar"


def test_saved_lora_is_listed_and_loads_in_core_with_every_key(comfy, trained, baseline):
    name = listed_name(trained.saved)
    info = comfy.object_info()
    assert name in info["LoraLoaderModelOnly"]["input"]["required"]["lora_name"][0]
    assert name in info["LoRATrainer_TrainLoRA"]["input"]["optional"]["existing_lora"][0]

    mark = len(comfy.log())
    with_lora = pixels(comfy, comfy.run(sample_graph(comfy, name, 1.0, "with_lora")))
    log = comfy.log(mark) + trained.log
    assert LORA_NOT_LOADED not in log, [l for l in log.splitlines() if LORA_NOT_LOADED in l][:5]
    assert not np.array_equal(with_lora, baseline), "the LoRA changed nothing"
    # The file, Train LoRA's MODEL output and Load LoRA Model all apply the same LoRA the same way.
    assert np.array_equal(with_lora, pixels(comfy, trained.entry, "s8")), "model_with_lora differs from the saved file"
    assert np.array_equal(with_lora, pixels(comfy, trained.entry, "t8")), "Load LoRA Model differs from the saved file"


def test_base_model_is_restored_after_training(comfy, trained, baseline):
    image = assert_base_model_restored(comfy, baseline, trained.loads, "after_training")
    # The baseline may postdate other modules' training: compare with a freshly loaded checkpoint too.
    for attempt in range(5):  # the worker applies /free when it next wakes, which can race a prompt
        comfy.free()  # drops ComfyUI's cached outputs: the next prompt loads the checkpoint again
        time.sleep(1.0)
        fresh = sample_base(comfy, f"fresh_checkpoint_{attempt}")
        if checkpoint_loads(comfy) > trained.loads:
            break
    assert checkpoint_loads(comfy) > trained.loads, "the checkpoint was not reloaded"
    assert np.array_equal(image, fresh), "the model differs from a freshly loaded checkpoint"


def test_continuing_a_saved_lora_counts_its_steps(comfy, trained):
    entry = comfy.run(train_graph(comfy, steps=4, existing_lora=listed_name(trained.saved), seed=2))
    saved = entry["outputs"][SAVE_NODE]["text"][0]
    assert re.fullmatch(rf"loras/it_train_{TRAIN['steps'] + 4}_steps_\d{{5}}_\.safetensors", saved), saved
    assert len(entry["outputs"][PLOT_NODE]["loss"]) == 4


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def test_saved_file_carries_the_run_as_kohya_writes_it(comfy, trained):
    """Save LoRA's file: output name, start and end, epochs (3 images, batch 1: 3 steps an epoch),
    the trained images' size in pixels (the latents × 8), and ModelSpec's resolution."""
    meta = _metadata(comfy.output_dir / trained.saved)
    assert meta["ss_output_name"] == "it_train" and meta["modelspec.title"] == "it_train"
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"]) <= time.time()
    assert meta["ss_session_id"].isdigit() and meta["ss_steps"] == "30"
    assert (meta["ss_num_batches_per_epoch"], meta["ss_num_epochs"], meta["ss_epoch"]) == ("3", "10", "10")
    assert meta["ss_resolution"] == f"({SIZE}, {SIZE})" and meta["modelspec.resolution"] == f"{SIZE}x{SIZE}"
    assert json.loads(meta["ss_bucket_info"])["buckets"] == {"0": {"resolution": [SIZE, SIZE], "count": 3}}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_continuing_reads_the_steps_from_the_metadata(comfy, trained):
    """A file whose metadata says 7 steps and whose name says 30: the metadata counts."""
    from safetensors.torch import load_file, save_file
    meta = _metadata(comfy.output_dir / trained.saved)
    name = "it_meta7_30_steps_.safetensors"
    save_file(load_file(str(comfy.output_dir / trained.saved)), str(comfy.output_dir / "loras" / name),
              {**meta, "ss_steps": "7"})
    entry = comfy.run(train_graph(comfy, steps=2, existing_lora=name, seed=4))
    saved = entry["outputs"][SAVE_NODE]["text"][0]
    assert re.fullmatch(r"loras/it_train_9_steps_\d{5}_\.safetensors", saved), saved
    assert _metadata(comfy.output_dir / saved)["ss_steps"] == "9"


def test_captioned_loader_gives_one_conditioning_per_image(comfy, dataset):
    g = train_graph(comfy, steps=2, seed=3)
    g["2"] = {"class_type": "LoRATrainer_LoadCaptionedImageSet",
              "inputs": {"folder": dataset, "clip": ["1", 1], "resize_method": "Crop", "width": SIZE, "height": SIZE}}
    g[TRAIN_NODE]["inputs"]["positive"] = ["2", 1]
    del g["4"]
    entry = comfy.run(g)
    assert len(entry["outputs"][PLOT_NODE]["loss"]) == 2
    # The same 3 captions against 2 images must be refused: they reach Train LoRA as 3 conditionings.
    _write_dataset(comfy.input_dir / "it_two", ["dots", "rings"])
    g["8"] = {"class_type": "LoRATrainer_LoadImageSetFromFolder", "inputs": {"folder": "it_two"}}
    g["3"]["inputs"]["pixels"] = ["8", 0]
    _, error = run_failing(comfy, g)
    assert "positive: got 3 captions for 2 images" in error, error


def test_latents_of_different_sizes_train_together(comfy):
    # Core's list loader keeps each image's size; VAEEncode then runs once per image, so Train LoRA
    # receives several LATENTs (8×8 and 12×8) and batches of 2 mix them.
    folder = comfy.input_dir / "it_multires"
    _write_dataset(folder, ["circle", "stripes"])
    Image.new("RGB", (64, 96), (30, 90, 200)).save(folder / "tall.png")
    g = train_graph(comfy, steps=4, batch_size=2, seed=5)
    g["2"] = {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": "it_multires"}}
    entry = comfy.run(g)
    losses = entry["outputs"][PLOT_NODE]["loss"]
    assert len(losses) == 4 and all(np.isfinite(losses)), losses


def test_cancel_leaves_comfyui_healthy_and_the_model_restored(comfy, trained, baseline):
    mark = len(comfy.log())
    prompt_id = comfy.queue(train_graph(comfy, steps=100000, seed=4, prefix="loras/it_cancel"))
    deadline = time.monotonic() + 180
    while not re.search(r"Train LoRA:.*\s[1-9]\d*/100000", comfy.log(mark)):
        assert time.monotonic() < deadline, f"training never started:\n{comfy.log(mark)[-3000:]}"
        time.sleep(0.2)
    comfy.interrupt()
    entry = comfy.wait(prompt_id, timeout=120)
    events = [event for event, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in events, entry["status"]
    assert re.search(r"Train LoRA: cancelled after [1-9]\d* of 100000 steps; the model is restored", comfy.log(mark)), \
        comfy.log(mark)[-3000:]
    assert not list(comfy.output_dir.glob("loras/it_cancel*")), "a cancelled run wrote a LoRA"
    assert_base_model_restored(comfy, baseline, checkpoint_loads(comfy), "after_cancel")


def test_load_image_set_resizes_or_names_the_size_mismatch(comfy):
    shutil.copy(DEMO_IMAGES / "circle.png", comfy.input_dir / "it_square.png")
    Image.new("RGB", (96, 64), (200, 30, 30)).save(comfy.input_dir / "it_wide.png")
    graph = {
        "1": {"class_type": "LoRATrainer_LoadImageSet",
              "inputs": {"image": "it_square.png", "more_images": "it_wide.png", "resize_method": "Crop",
                         "width": 48, "height": 32}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "it_imageset/crop"}},
    }
    images = comfy.run(graph)["outputs"]["2"]["images"]
    assert len(images) == 2
    for image in images:
        with Image.open(comfy.output_dir / image["subfolder"] / image["filename"]) as img:
            assert img.size == (48, 32)
    graph["1"]["inputs"].update(resize_method="None", width=0, height=0)
    _, error = run_failing(comfy, graph)
    assert "it_wide.png" in error and "96x64" in error and "resize_method" in error, error


# ---- bad input ---------------------------------------------------------------------------
def test_empty_dataset_folder_is_an_error(comfy):
    (comfy.input_dir / "it_empty").mkdir(exist_ok=True)
    _, error = run_failing(comfy, train_graph(comfy, folder="it_empty", steps=1))
    assert "holds no images" in error and "it_empty" in error, error


def test_unreadable_image_is_an_error(comfy):
    folder = comfy.input_dir / "it_broken"
    _write_dataset(folder, ["circle"])
    (folder / "broken.png").write_bytes(b"this is not a PNG")
    _, error = run_failing(comfy, train_graph(comfy, folder="it_broken", steps=1))
    assert "broken.png" in error and "cannot be read" in error, error


def test_unknown_existing_lora_is_refused_by_validation(comfy, dataset):
    # ComfyUI validates combo values before running: HTTP 400, our node never runs.
    with pytest.raises(comfy.PromptError) as refused:
        comfy.queue(train_graph(comfy, existing_lora="no_such_lora.safetensors"))
    errors = refused.value.body["node_errors"][TRAIN_NODE]["errors"]
    assert errors[0]["type"] == "value_not_in_list" and "existing_lora" in json.dumps(errors), errors


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path))


def test_lora_that_does_not_fit_the_model_is_an_error(comfy, dataset, baseline):
    # input_blocks.0.0 is Conv2d(4 → 320, 3×3); this down projection expects 7 input channels.
    _write_safetensors(comfy.loras_dir / "it_wrong_shape.safetensors", {
        "lora_unet_input_blocks_0_0.lora_down.weight": np.zeros((4, 7, 3, 3), np.float32),
        "lora_unet_input_blocks_0_0.lora_up.weight": np.zeros((320, 4, 1, 1), np.float32),
    })
    _, error = run_failing(comfy, train_graph(comfy, steps=1, existing_lora="it_wrong_shape.safetensors"))
    assert "existing_lora 'it_wrong_shape.safetensors': LoRA key 'lora_unet_input_blocks_0_0.lora_down.weight' " \
           "does not fit layer 'input_blocks.0.0'" in error and "(4, 7, 3, 3)" in error, error
    assert "likely trained for another base model" in error, error


def test_diverging_loss_is_an_error_and_the_model_is_restored(comfy, dataset, baseline):
    # SGD at learning_rate 1.0 blows up on the tiny model after a few good steps (seeded: reproducible).
    _, error = run_failing(comfy, train_graph(comfy, steps=40, learning_rate=1.0, optimizer="SGD", seed=9,
                                              prefix="loras/it_diverged"))
    said = re.search(r"the loss became (nan|inf) at step (\d+); lower learning_rate.*; the last good LoRA and "
                     r"training state are in (loras/checkpoints/lora_(\d+)_steps_\d+_\.safetensors)", error)
    assert said and int(said.group(4)) == int(said.group(2)) - 1, error
    assert (comfy.output_dir / said.group(3)).is_file()  # the last good step's checkpoint, to continue from
    assert not list(comfy.output_dir.glob("loras/it_diverged*"))
    assert_base_model_restored(comfy, baseline, checkpoint_loads(comfy), "after_divergence")


def test_nan_lora_weights_are_refused_when_loading(comfy, trained, baseline):
    # A LoRA from a run that diverged: refused before training, naming the file and the first bad key.
    torch = pytest.importorskip("torch")  # the saved file is bf16, which numpy cannot hold
    from safetensors.torch import load_file, save_file

    weights = load_file(str(comfy.output_dir / trained.saved))
    poisoned = {k: torch.full_like(v, float("nan")) if k.endswith("lora_up.weight") else v for k, v in weights.items()}
    save_file(poisoned, str(comfy.loras_dir / "it_nan_5_steps_.safetensors"))
    _, error = run_failing(comfy, train_graph(comfy, steps=3, existing_lora="it_nan_5_steps_.safetensors",
                                              prefix="loras/it_nan"))
    first_bad = min(k for k in poisoned if k.endswith("lora_up.weight"))  # safetensors lists keys sorted
    assert "existing_lora:" in error and "it_nan_5_steps_.safetensors holds NaN/inf values" in error, error
    assert f"(first in {first_bad!r})" in error, error
    assert not list(comfy.output_dir.glob("loras/it_nan*"))
    assert_base_model_restored(comfy, baseline, checkpoint_loads(comfy), "after_nan")


def test_save_prefix_outside_the_output_folder_is_an_error(comfy, dataset):
    _, error = run_failing(comfy, train_graph(comfy, steps=1, prefix="../x"))
    assert "SaveLoRA" in error and "points outside the output folder" in error, error
    assert not list(comfy.output_dir.parent.glob("x_*")), "a file was written outside the output folder"
    assert not list(comfy.output_dir.rglob("*.tmp")), "a half-written file was left behind"
