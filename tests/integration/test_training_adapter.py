"""LoRA Training Adapter in a real ComfyUI (CPU, the tiny SD1.5 checkpoint; docs/nodes.md#lora-training-adapter-loratrainer_trainingadapter).

The adapter is a LoRA this module trains first (4 steps at a high rate, so it changes samples clearly),
found in the loras list like any file. The training example at 64 px, 6 steps, is then run:
- with the adapter chained into Train LoRA's options and previews every 3 steps: the step-0 preview
  (the LoRA starts at zero) is exactly core's KSampler sample of the base model, not of the base with
  the adapter (which differs): previews sample the deployed model;
- the same without previews: LoRA and losses bit-identical to the run with previews (training's copy
  of the model is loaded back with the adapter after each preview);
- on the base with the adapter applied by core's LoraLoaderModelOnly instead: LoRA and losses
  bit-identical (the adapter is on while training, exactly as core applies it);
- without the adapter: another first loss (so the comparisons above can fail).
The saved file holds the same keys as the run without the adapter (the adapter is not in it) and
says in its metadata which adapter it trained with; the base model samples bit-identically after
all of it. A file none of whose keys fit the model stops the run with an error naming training_adapter.
Skips unless COMFYUI_DIR is set (see conftest.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DEMO_IMAGES = ROOT / "assets" / "demo_images"
SIZE = 64
DATASET = "it_adapter_dataset"
TRAIN = {"steps": 6, "learning_rate": 5e-3, "training_dtype": "fp32", "lora_dtype": "fp32", "seed": 3}
PREVIEW = {"every": 3, "seed": 5, "steps": 2, "cfg": 2.0, "width": SIZE, "height": SIZE, "sampler_name": "euler",
           "scheduler": "normal"}
TRAIN_NODE, SAVE_NODE, PLOT_NODE, PREVIEW_NODE, GRID_NODE, OPTIONS_NODE = "5", "6", "7", "15", "16", "17"


def graph(comfy, name: str, *, adapter: str | None = None, preview: bool = False, loaded: str | None = None,
          steps: int | None = None, lr: float | None = None) -> dict:
    """The example at 64 px: `adapter` chained as LoRA Training Adapter, `loaded` applied to the model by core's
    LoraLoaderModelOnly instead, previews with a reference sample of the base (r8) and of the base with the
    adapter (a8)."""
    g = json.loads((ROOT / "example_workflows" / "api" / "train_lora.json").read_text())
    del g[TRAIN_NODE]["inputs"]["validation"]
    g["1"]["inputs"]["ckpt_name"] = comfy.checkpoint
    g["2"]["inputs"].update(folder=DATASET, width=SIZE, height=SIZE)
    g[TRAIN_NODE]["inputs"].update(TRAIN)
    if steps is not None:
        g[TRAIN_NODE]["inputs"].update(steps=steps, learning_rate=lr)
    g[SAVE_NODE]["inputs"]["prefix"] = f"loras/it_adapter_{name}"
    g[PLOT_NODE]["inputs"]["filename_prefix"] = f"it_adapter/{name}_loss"
    if adapter is not None:
        g["a"] = {"class_type": "LoRATrainer_TrainingAdapter",
                  "inputs": {"lora_name": adapter, "strength": 1.0, "options": [OPTIONS_NODE, 0]}}
        g[TRAIN_NODE]["inputs"]["options"] = ["a", 0]
    if loaded is not None:
        g["l"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": loaded,
                                                                  "strength_model": 1.0}}
        g[TRAIN_NODE]["inputs"]["model"] = ["l", 0]
    if not preview:
        del g[TRAIN_NODE]["inputs"]["preview"], g[GRID_NODE]
        return g
    g[PREVIEW_NODE]["inputs"].update(PREVIEW, filename_prefix=f"it_adapter/{name}")
    g[GRID_NODE] = {"class_type": "SaveImage", "inputs": {"images": [TRAIN_NODE, 4],
                                                         "filename_prefix": f"it_adapter/{name}_grid"}}
    g.update(reference(g, "r", ["1", 0], f"{name}_base"))
    if adapter is not None:
        g["al"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": adapter,
                                                                   "strength_model": 1.0}}
        g.update(reference(g, "a", ["al", 0], f"{name}_adapted"))
    return g


def reference(g: dict, tag: str, model: list, name: str) -> dict:
    """Core's EmptyLatentImage → KSampler → VAE Decode → Save Image of `model` with the preview's settings."""
    p = g[PREVIEW_NODE]["inputs"]
    return {
        f"{tag}5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        f"{tag}6": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": p["seed"], "steps": p["steps"], "cfg": p["cfg"], "sampler_name": p["sampler_name"],
            "scheduler": p["scheduler"], "positive": p["positive"], "negative": p["negative"],
            "latent_image": [f"{tag}5", 0], "denoise": 1.0}},
        f"{tag}7": {"class_type": "VAEDecode", "inputs": {"samples": [f"{tag}6", 0], "vae": ["1", 2]}},
        f"{tag}8": {"class_type": "SaveImage", "inputs": {"images": [f"{tag}7", 0],
                                                         "filename_prefix": f"it_adapter/{name}_ref"}},
    }


def png(comfy, entry: dict, node: str, index: int = 0) -> np.ndarray:
    image = entry["outputs"][node]["images"][index]
    with Image.open(comfy.output_dir / image["subfolder"] / image["filename"]) as img:
        return np.asarray(img.convert("RGB")).copy()


def saved(comfy, entry: dict) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = comfy.output_dir / entry["outputs"][SAVE_NODE]["text"][0]
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return load_file(path), metadata


@pytest.fixture(scope="module")
def runs(comfy) -> dict[str, dict]:
    folder = comfy.input_dir / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("circle", "stripes", "sunset"):
        shutil.copy(DEMO_IMAGES / f"{name}.png", folder / f"{name}.png")
    made = comfy.run(graph(comfy, "source", steps=4, lr=5e-2), timeout=600)
    adapter = made["outputs"][SAVE_NODE]["text"][0].removeprefix("loras/")  # Save LoRA's folder is in the list
    found = {"adapter": adapter}
    found["previews"] = comfy.run(graph(comfy, "previews", adapter=adapter, preview=True), timeout=600)
    found["plain_adapted"] = comfy.run(graph(comfy, "plain_adapted", adapter=adapter), timeout=600)
    found["loaded"] = comfy.run(graph(comfy, "loaded", loaded=adapter), timeout=600)
    found["without"] = comfy.run(graph(comfy, "without"), timeout=600)
    found["base_after"] = comfy.run({k: v for k, v in graph(comfy, "after", preview=True).items()
                                     if k in ("1", "4", "13", "14", "15") or k.startswith("r")}, timeout=600)
    return found


def test_previews_sample_the_deployed_model_without_the_adapter(comfy, runs):
    run = runs["previews"]
    steps = [int(e["filename"].split("_steps_")[0].rsplit("_", 1)[-1]) for e in run["outputs"][TRAIN_NODE]["images"]]
    assert steps == [0, 3, 6], run["outputs"][TRAIN_NODE]["images"]
    first = png(comfy, run, TRAIN_NODE)  # Train LoRA's UI entry lists its previews, oldest first
    base, adapted = png(comfy, run, "r8"), png(comfy, run, "a8")
    assert not np.array_equal(base, adapted), "the adapter does not change samples: the test would prove nothing"
    assert np.array_equal(first, base), "the step-0 preview is not the base model's sample (the adapter leaked in)"


def test_training_is_the_same_with_previews_and_with_the_adapter_applied_by_core(comfy, runs):
    with_previews, _ = saved(comfy, runs["previews"])
    plain, metadata = saved(comfy, runs["plain_adapted"])
    loaded, _ = saved(comfy, runs["loaded"])
    losses = runs["plain_adapted"]["outputs"][PLOT_NODE]["loss"]
    assert len(losses) == TRAIN["steps"]
    for other, run in ((with_previews, "previews"), (loaded, "loaded")):
        assert other.keys() == plain.keys(), run
        differ = [k for k in plain if not np.array_equal(other[k].numpy(), plain[k].numpy())]
        assert not differ, f"{run}: {len(differ)} tensors differ, e.g. {differ[:3]}"
        assert runs[run]["outputs"][PLOT_NODE]["loss"] == losses, run
    without = runs["without"]["outputs"][PLOT_NODE]["loss"]
    assert without[0] != losses[0], "the first loss is the same without the adapter: it was not on while training"
    assert json.loads(metadata["lora_trainer.training_adapter"]) == {"name": runs["adapter"], "strength": 1.0}


def test_the_saved_lora_leaves_the_adapter_out_and_the_base_is_unchanged(comfy, runs):
    plain, _ = saved(comfy, runs["plain_adapted"])
    without, metadata = saved(comfy, runs["without"])
    assert plain.keys() == without.keys() and "lora_trainer.training_adapter" not in metadata
    from safetensors.torch import load_file

    adapter = load_file(comfy.output_dir / "loras" / runs["adapter"])
    assert not any(np.array_equal(plain[k].numpy(), adapter[k].numpy()) for k in plain if "lora_up" in k)
    assert np.array_equal(png(comfy, runs["base_after"], "r8"), png(comfy, runs["previews"], "r8")), \
        "the base model samples differently after training with the adapter"


def test_an_adapter_that_fits_nothing_is_refused_naming_it(comfy, runs):
    import torch
    from safetensors.torch import save_file

    name = "it_adapter_for_another_model.safetensors"
    save_file({"lora_unet_not_a_layer.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_not_a_layer.lora_down.weight": torch.zeros(2, 4)}, str(comfy.loras_dir / name))
    status, body = comfy.post_prompt(graph(comfy, "refused", adapter=name))
    assert status == 200, body
    entry = comfy.wait(body["prompt_id"], 600)
    message = comfy.execution_error(entry) or ""
    assert "training_adapter: none of 'it_adapter_for_another_model.safetensors'" in message, message


# ---- a step-distilled base: Flux.1 schnell ------------------------------------------------------
SCHNELL = "tiny_flux_schnell.safetensors"


@pytest.fixture(scope="module")
def comfy_schnell(tmp_path_factory: pytest.TempPathFactory):
    """A server of its own with make_flux.py's tiny Flux without its guidance embedder, which core's UNETLoader
    detects as FluxSchnell (Flux.1 schnell has none), its VAE and the test-only ITFluxConditioning node."""
    import sys

    from safetensors.torch import load_file, save_file

    server = sys.modules["lora_trainer_it_server"]
    comfy_dir, python = server.comfyui_or_skip()
    model, vae = server.cached_flux(comfy_dir, python)
    folder = tmp_path_factory.mktemp("schnell_model")
    save_file({k: v for k, v in load_file(model).items() if not k.startswith("guidance_in.")}, str(folder / SCHNELL))
    base = tmp_path_factory.mktemp("comfyui_schnell_base")
    server.make_base_dir(base, None, {
        f"models/diffusion_models/{SCHNELL}": folder / SCHNELL,
        f"models/vae/{server.FLUX_VAE_NAME}": vae,
        "custom_nodes/it_flux_nodes.py": Path(__file__).with_name("it_flux_nodes.py"),
    })
    client = server.start_server(comfy_dir, python, base)
    try:
        folder = client.input_dir / DATASET
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("circle", "stripes", "sunset"):
            shutil.copy(DEMO_IMAGES / f"{name}.png", folder / f"{name}.png")
        yield client
    finally:
        server.stop(client.process)


def schnell_graph(name: str, adapter: str | None = None) -> dict:
    """Tiny schnell, the demo images at 64 px, 4 fp32 steps, a preview at step 0 (and 4) beside core's
    KSampler sample of the base with the preview's settings (r8)."""
    vae = ["v", 0]
    cond = {"class_type": "ITFluxConditioning", "inputs": {"seed": 0, "tokens": 16, "scale": 1.0}}
    preview = {"positive": ["c", 0], "negative": ["n", 0], "vae": vae, "seed": 5, "steps": 2, "cfg": 1.0,
               "width": SIZE, "height": SIZE, "sampler_name": "euler", "scheduler": "simple", "every": 4,
               "filename_prefix": f"it_schnell/{name}"}
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": SCHNELL, "weight_dtype": "default"}},
        "v": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_flux_vae.safetensors"}},
        "2": {"class_type": "LoRATrainer_LoadImageSetFromFolder",
              "inputs": {"folder": DATASET, "resize_method": "Crop", "width": SIZE, "height": SIZE}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": vae}},
        "c": cond, "n": {**cond, "inputs": {**cond["inputs"], "seed": 1}},
        PREVIEW_NODE: {"class_type": "LoRATrainer_TrainingPreview", "inputs": preview},
        TRAIN_NODE: {"class_type": "LoRATrainer_TrainLoRA",
                     "inputs": {"model": ["1", 0], "latents": ["3", 0], "positive": ["c", 0], "steps": 4,
                                "learning_rate": 5e-2, "rank": 4, "training_dtype": "fp32", "lora_dtype": "fp32",
                                "batch_size": 1, "seed": 2, "preview": [PREVIEW_NODE, 0]}},
        SAVE_NODE: {"class_type": "LoRATrainer_SaveLoRA", "inputs": {"lora": [TRAIN_NODE, 1],
                                                                   "prefix": f"loras/it_schnell_{name}",
                                                                   "steps": [TRAIN_NODE, 3]}},
        "r5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "r6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["c", 0], "negative": ["n", 0], "latent_image": ["r5", 0], "seed": 5,
            "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "r7": {"class_type": "VAEDecode", "inputs": {"samples": ["r6", 0], "vae": vae}},
        "r8": {"class_type": "SaveImage", "inputs": {"images": ["r7", 0], "filename_prefix": f"it_schnell/{name}_ref"}},
    }
    if adapter is not None:
        g["a"] = {"class_type": "LoRATrainer_TrainingAdapter", "inputs": {"lora_name": adapter, "strength": 1.0}}
        g[TRAIN_NODE]["inputs"]["options"] = ["a", 0]
        g["al"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": adapter,
                                                                   "strength_model": 1.0}}
        g["a6"] = {**g["r6"], "inputs": {**g["r6"]["inputs"], "model": ["al", 0]}}
        g["a7"] = {**g["r7"], "inputs": {**g["r7"]["inputs"], "samples": ["a6", 0]}}
        g["a8"] = {**g["r8"], "inputs": {"images": ["a7", 0], "filename_prefix": f"it_schnell/{name}_adapted"}}
    return g


def test_a_step_distilled_base_trains_with_and_without_an_adapter_and_the_log_says_which(comfy_schnell):
    """Without an adapter the schnell base trains and the log says what to expect; with one (here the LoRA of
    that first run, standing in for a de-distillation adapter) the log says it is on, and the step-0 preview is
    the base's own sample."""
    comfy = comfy_schnell
    mark = len(comfy.log())
    first = comfy.run(schnell_graph("without"), timeout=900)
    log = comfy.log(mark)
    assert "Train LoRA: Flux.1 schnell is step-distilled and trains here without a training adapter" in log, log[-3000:]
    adapter = first["outputs"][SAVE_NODE]["text"][0].removeprefix("loras/")
    mark = len(comfy.log())
    second = comfy.run(schnell_graph("with", adapter), timeout=900)
    log = comfy.log(mark)
    assert f"the training adapter {adapter!r} keeps the objective" in log, log[-3000:]
    assert "trains here without a training adapter" not in log
    assert not np.array_equal(png(comfy, second, "a8"), png(comfy, second, "r8")), "the adapter changes nothing"
    assert np.array_equal(png(comfy, second, TRAIN_NODE), png(comfy, second, "r8")), \
        "the step-0 preview is not the schnell base's sample: the adapter leaked into the preview"
