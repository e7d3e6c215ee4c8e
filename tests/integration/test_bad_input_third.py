"""Bad input, third round, in a real ComfyUI: the parts that need a server. The rest (states, keep_last,
layer selection, temp files, the headless commands) is tested offline in tests/test_bad_input_third.py.

- A preview VAE that does not belong to the model (VAELoader's `pixel_space`, a 16-channel VAE on the
  SD1.5 model) is refused naming the preview's vae, and the server lives on and trains the next prompt.
- ComfyUI core's LoadImageTextDataSetFromFolder → MakeTrainingDataset → ResolutionBucket → Train LoRA
  pairs every image with its own caption: with one bucket the LoRA is bit-identical to the one trained
  without ResolutionBucket; with two buckets it trains (it was refused before).
- A LoRA that core's TrainLoraNode and SaveLoRA wrote (conv downs flattened to 2-D, norm and bias
  differences) continues, and a full-format save keeps every diff / diff_b tensor it had.
Skips unless COMFYUI_DIR is set.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

_spec = importlib.util.spec_from_file_location("lora_trainer_it_nodes", Path(__file__).with_name("test_nodes.py"))
it = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = it
_spec.loader.exec_module(it)  # the graph helpers of test_nodes.py

FOLDER = "it_third_round"
TRAIN = {"steps": 3, "learning_rate": 2e-3, "training_dtype": "fp32", "lora_dtype": "fp32", "seed": 5}


@pytest.fixture(scope="module")
def dataset(comfy) -> str:
    it._write_dataset(comfy.input_dir / FOLDER, ["circle", "stripes", "sunset"])
    return FOLDER


def _alive_and_training(comfy, dataset: str) -> None:
    """The server answers and still trains a prompt end to end."""
    assert comfy.process.poll() is None, comfy.log()[-3000:]
    entry = comfy.run(it.train_graph(comfy, folder=dataset, steps=1, seed=99, prefix="loras/it_third_alive"))
    assert len(entry["outputs"][it.PLOT_NODE]["loss"]) == 1


def _preview_graph(comfy, dataset: str, vae: list) -> dict:
    g = it.train_graph(comfy, folder=dataset, steps=2, prefix="loras/it_third_preview")
    g["p1"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a circle", "clip": ["1", 1]}}
    g["p2"] = {"class_type": "LoRATrainer_TrainingPreview", "inputs": {
        "positive": ["p1", 0], "vae": vae, "every": 1, "seed": 0, "steps": 1, "cfg": 1.0, "width": it.SIZE,
        "height": it.SIZE, "sampler_name": "euler", "scheduler": "normal", "filename_prefix": "it_third/preview"}}
    g[it.TRAIN_NODE]["inputs"]["preview"] = ["p2", 0]
    return g


def test_a_pixel_space_preview_vae_is_refused_and_the_server_lives(comfy, dataset):
    g = _preview_graph(comfy, dataset, ["pv", 0])
    g["pv"] = {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}}
    _, error = it.run_failing(comfy, g)
    assert ("vae: LoRA Training Preview's VAE decodes 3-channel latents (pixel_space: it treats pixels as latents), "
            "but this model (SD15) makes 4-channel latents") in error, error
    _alive_and_training(comfy, dataset)


def test_a_preview_vae_of_another_family_names_both(comfy, dataset):
    vae_file = _flux_vae(comfy)
    g = _preview_graph(comfy, dataset, ["pv", 0])
    g["pv"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae_file}}
    _, error = it.run_failing(comfy, g)
    assert "vae: LoRA Training Preview's VAE decodes 16-channel latents, but this model (SD15) makes 4-channel" in error
    _alive_and_training(comfy, dataset)


def _flux_vae(comfy) -> str:
    """The tiny 16-channel Flux VAE of make_flux.py, put into this server's models/vae."""
    spec = importlib.util.spec_from_file_location("lora_trainer_it_server_third", Path(__file__).with_name("server.py"))
    server = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(server)
    comfy_dir, python = server.comfyui_or_skip()
    _, vae = server.cached_flux(comfy_dir, python)
    target = comfy.base_dir / "models" / "vae" / "it_third_16ch_vae.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(vae, target)
    return target.name


# ---- core's dataset nodes and ResolutionBucket ---------------------------------------------------
def _sized_folder(comfy, name: str, sizes: dict[str, tuple[int, int]]) -> str:
    """Demo images resized to `sizes` (name → (width, height)), each with its own caption."""
    folder = comfy.input_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    for image, size in sizes.items():
        with Image.open(it.DEMO_IMAGES / f"{image}.png") as img:
            img.convert("RGB").resize(size).save(folder / f"{image}.png")
        shutil.copy(it.DEMO_IMAGES / f"{image}.txt", folder / f"{image}.txt")
    return name


def _core_dataset_graph(comfy, folder: str, bucket: bool, prefix: str) -> dict:
    g = it.train_graph(comfy, folder=folder, prefix=prefix, **TRAIN)
    g[it.SAVE_NODE]["inputs"]["format"] = "full"
    for node in ("2", "3", "4"):
        del g[node]
    g["d1"] = {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": folder}}
    g["d2"] = {"class_type": "MakeTrainingDataset",
               "inputs": {"images": ["d1", 0], "texts": ["d1", 1], "vae": ["1", 2], "clip": ["1", 1]}}
    source = "d2"
    if bucket:
        g["d3"] = {"class_type": "ResolutionBucket", "inputs": {"latents": ["d2", 0], "conditioning": ["d2", 1]}}
        source = "d3"
    g[it.TRAIN_NODE]["inputs"].update(latents=[source, 0], positive=[source, 1])
    return g


def _saved(comfy, entry: dict) -> dict:
    name = entry["outputs"][it.SAVE_NODE]["text"][0]
    return _tensors(comfy.output_dir / name)


def _tensors(path: Path) -> dict:
    pytest.importorskip("torch")
    from safetensors.torch import load_file

    return load_file(str(path))


def test_one_resolution_bucket_trains_each_image_under_its_own_caption(comfy):
    folder = _sized_folder(comfy, "it_third_one_bucket", {n: (64, 64) for n in ("circle", "stripes", "sunset", "dots")})
    plain = _saved(comfy, comfy.run(_core_dataset_graph(comfy, folder, False, "loras/it_third_plain")))
    mark = len(comfy.log())
    bucketed = _saved(comfy, comfy.run(_core_dataset_graph(comfy, folder, True, "loras/it_third_bucket1")))
    assert "Train LoRA: 4 images, one caption per image" in comfy.log(mark), comfy.log(mark)[-3000:]
    assert plain.keys() == bucketed.keys()
    assert all(plain[k].equal(bucketed[k]) for k in plain)  # the same pairs, the same LoRA


def test_two_resolution_buckets_train_each_image_under_its_own_caption(comfy):
    sizes = {"circle": (64, 64), "stripes": (64, 96), "sunset": (64, 64), "dots": (64, 96)}
    folder = _sized_folder(comfy, "it_third_two_buckets", sizes)
    mark = len(comfy.log())
    entry = comfy.run(_core_dataset_graph(comfy, folder, True, "loras/it_third_bucket2"))
    log = comfy.log(mark)
    assert "Created 2 resolution buckets from 4 samples" in log, log[-3000:]
    assert "Train LoRA: 4 images, one caption per image" in log, log[-3000:]
    assert len(entry["outputs"][it.PLOT_NODE]["loss"]) == TRAIN["steps"]


# ---- a LoRA of core's TrainLoraNode, continued ---------------------------------------------------
def _core_training(comfy, dataset: str) -> str:
    """Core's TrainLoraNode (its defaults, 2 fp32 steps) and SaveLoRA; the file's name in the loras list."""
    spec = comfy.object_info("TrainLoraNode")["input"]
    inputs = {name: options[1]["default"] for group in ("required", "optional") for name, options in
              spec.get(group, {}).items() if isinstance(options[1], dict) and "default" in options[1]}
    g = it.train_graph(comfy, folder=dataset, steps=1, prefix="loras/unused")
    inputs.update(model=["1", 0], latents=["3", 0], positive=["4", 0], steps=2, training_dtype="fp32",
                  lora_dtype="fp32", seed=3, learning_rate=1e-3)
    g[it.TRAIN_NODE] = {"class_type": "TrainLoraNode", "inputs": inputs}
    g[it.SAVE_NODE] = {"class_type": "SaveLoRA", "inputs": {"lora": [it.TRAIN_NODE, 0], "prefix": "loras/it_third_core",
                                                           "steps": [it.TRAIN_NODE, 2]}}  # core's outputs: lora, loss, steps
    for node in [n for n in g if n not in ("1", "2", "3", "4", it.TRAIN_NODE, it.SAVE_NODE)]:
        del g[node]
    comfy.run(g)
    found = sorted((comfy.output_dir / "loras").glob("it_third_core_2_steps_*_.safetensors"))
    assert found, list((comfy.output_dir / "loras").iterdir())
    return found[-1].name


def test_a_lora_of_core_continues_with_its_differences_kept(comfy, dataset):
    name = _core_training(comfy, dataset)
    core = _tensors(comfy.output_dir / "loras" / name)
    flat_downs = [k for k, t in core.items() if k.endswith("lora_down.weight") and t.dim() == 2
                  and "input_blocks.0.0" in k]
    assert flat_downs, sorted(core)[:20]  # core flattens conv downs: what the file reader must take
    diffs = sorted(k for k in core if k.endswith((".diff", ".diff_b")))
    assert diffs, "core's file has no norm/bias differences to keep"
    g = it.train_graph(comfy, folder=dataset, prefix="loras/it_third_continued", existing_lora=name, **TRAIN)
    g[it.SAVE_NODE]["inputs"]["format"] = "full"
    mark = len(comfy.log())
    ours = _saved(comfy, comfy.run(g))
    assert "they are trained on with it" in comfy.log(mark)
    kept = sorted(k for k in ours if k.endswith((".diff", ".diff_b")))
    assert len(kept) == len(diffs), (len(kept), len(diffs))
    assert sorted(t.numel() for k, t in ours.items() if k.endswith("lora_down.weight")) == \
        sorted(t.numel() for k, t in core.items() if k.endswith("lora_down.weight"))  # every layer continued
    core_in = core[flat_downs[0]]  # input_blocks.0.0 is the UNet's conv_in: kohya's lora_unet_conv_in
    assert core_in.shape[1] == 4 * 3 * 3 and ours["lora_unet_conv_in.lora_down.weight"].shape == (core_in.shape[0], 4, 3, 3)


# ---- temp files a killed server left ---------------------------------------------------------------
def test_the_next_save_removes_a_killed_servers_temp_files(comfy, dataset):
    """What `kill -9` during a Save LoRA leaves (a hidden temp beside the finished files, older than the
    running server) goes at the next save into that folder; a temp written after the server started
    (another process's write in progress) and other files stay."""
    import os
    import time

    folder = comfy.output_dir / "loras" / "it_third_temps"
    folder.mkdir(parents=True, exist_ok=True)
    stale = folder / ".lora_2_steps_00001_.safetensors.0123abcd.tmp"
    fresh = folder / ".lora_3_steps_00001_.safetensors.4567cdef.tmp"
    keep = folder / "notes.txt"
    for path in (stale, fresh, keep):
        path.write_bytes(b"partial")
    long_ago = time.time() - 10 * 24 * 3600  # before this session's server started
    os.utime(stale, (long_ago, long_ago))
    os.utime(keep, (long_ago, long_ago))
    try:
        comfy.run(it.train_graph(comfy, folder=dataset, steps=1, seed=21, prefix="loras/it_third_temps/lora"))
        assert not stale.exists() and fresh.exists() and keep.exists()
        assert "removed 1 temp file(s) left in" in comfy.log()
    finally:  # other tests check that no temp file is left in the output folder
        fresh.unlink(missing_ok=True)
        stale.unlink(missing_ok=True)
