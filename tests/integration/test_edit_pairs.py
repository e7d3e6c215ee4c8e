"""Edit-model pairs in a real ComfyUI (CPU, the tiny Flux model of test_flux.py, whose ComfyUI model reads
reference latents as Flux Kontext does): Encode Training Folder with a control folder gives each image its
control as a reference latent, as core's ReferenceLatent node sets it.

1. Four images in two buckets (64×64 and 96×64), each with a control of the same name at another size:
   the node says "4 controls as reference latents", Train LoRA trains (every loss finite, the loss falls),
   and the control reaches the model: the same images with other controls start from another loss, and
   so do the same images with no controls at all.
2. The saved LoRA loads in core's LoraLoaderModelOnly with every key matched and changes the sample of a
   conditioned graph (ReferenceLatent on the conditioning).
3. control_dropout 0.5 (the options node) trains and gives another LoRA than 0; without controls it is
   refused naming control_dropout. Images without a control are listed naming control_folder, and no
   LoRA is written.
4. Previews sample with their own condition image: LoRA Training Preview's positive through core's
   ReferenceLatent, two trainings alike but for the preview's reference, give two different previews.
5. The example workflow example_workflows/api/train_edit_lora.json (Flux Kontext) runs with the tiny
   model's files, its text encoder swapped for the test conditioning, at 64 px and a few steps.

One conditioning (ITFluxConditioning → FluxGuidance: the edit instruction) goes to every image through
the node's `conditioning` input, as the tiny model has no text encoder. Skips unless COMFYUI_DIR is set.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_spec = importlib.util.spec_from_file_location("lora_trainer_it_flux", Path(__file__).with_name("test_flux.py"))
flux = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = flux
_spec.loader.exec_module(flux)  # the graphs and samplers of test_flux.py

ENCODE_NODE, OPTIONS_NODE = "e", "o"
SIZES = {"a": (64, 64), "b": (64, 64), "c": (96, 64), "d": (96, 64)}
ENCODE = {"resolution": 96, "bucket_step": 32, "min_side": 32, "max_side": 128, "default_caption": "",
          "masks": "none", "mask_folder": "", "flip": False, "caption_variants": 1, "shuffle_tags": False,
          "tag_dropout": 0.0, "keep_tokens": 0, "seed": 0, "latent_dtype": "fp32", "cache": True, "chunk": 4}
TRAIN = {**flux.TRAIN, "steps": 16, "batch_size": 2, "lora_dtype": "fp32", "training_dtype": "fp32"}


def picture(seed: int, size: tuple[int, int]) -> np.ndarray:
    """Smooth colour fields (a VAE-friendly image), one per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    channels = [np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    return ((np.stack(channels, -1) * 0.5 + 0.5) * 255).astype(np.uint8)


def write(comfy, folder: str, seed: int, scale: int = 1, only: tuple[str, ...] = tuple(SIZES)) -> str:
    """SIZES' pictures (times `scale`) as <name>.png in the input subfolder `folder`."""
    root = comfy.input_dir / folder
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(only):
        width, height = SIZES[name]
        Image.fromarray(picture(seed + i, (width * scale, height * scale))).save(root / f"{name}.png")
    return folder


def pairs_graph(images: str, controls: str, prefix: str, **options) -> dict:
    """Tiny Flux, its VAE, one conditioning → Encode Training Folder (control_folder) → Train LoRA (an
    options node with `options`) → Save LoRA and Plot Loss Graph."""
    g = flux.train_graph("fp32", False, prefix)
    del g["2"], g["3"]  # the image loader and its VAE Encode
    g[ENCODE_NODE] = {"class_type": "LoRATrainer_EncodeTrainingFolder",
                      "inputs": {"folder": images, "vae": ["v", 0], "conditioning": ["4", 0],
                                 "control_folder": controls, **ENCODE}}
    g[OPTIONS_NODE] = {"class_type": "LoRATrainer_TrainingOptions", "inputs": dict(options)}
    g[flux.TRAIN_NODE]["inputs"].update(TRAIN, latents=[ENCODE_NODE, 0], positive=[ENCODE_NODE, 1],
                                        options=[OPTIONS_NODE, 0])
    return g


def train(comfy, graph: dict) -> tuple[str, list[float], str]:
    """(Encode Training Folder's summary, the losses, the saved file)."""
    entry = comfy.run(graph, timeout=600)
    losses = entry["outputs"][flux.PLOT_NODE]["loss"]
    assert len(losses) == TRAIN["steps"] and all(np.isfinite(losses)), losses
    return entry["outputs"][ENCODE_NODE]["text"][0], losses, entry["outputs"][flux.SAVE_NODE]["text"][0]


@pytest.fixture(scope="module")
def folders(comfy_flux) -> dict[str, str]:
    return {"images": write(comfy_flux, "it_pairs/images", 0), "controls": write(comfy_flux, "it_pairs/controls", 10, 2),
            "other": write(comfy_flux, "it_pairs/other_controls", 20, 2)}


@pytest.fixture(scope="module")
def trained(comfy_flux, folders) -> dict:
    return {"pairs": train(comfy_flux, pairs_graph(folders["images"], folders["controls"], "loras/it_pairs")),
            "other": train(comfy_flux, pairs_graph(folders["images"], folders["other"], "loras/it_pairs_other")),
            "none": train(comfy_flux, pairs_graph(folders["images"], "", "loras/it_pairs_none"))}


def test_pairs_train_in_two_buckets_and_the_control_reaches_the_model(trained):
    summary, losses, _ = trained["pairs"]
    assert summary.startswith("4 images in 2 buckets (96×64: 2, 64×64: 2); 4 controls as reference latents"), summary
    assert float(np.mean(losses[-4:])) < float(np.mean(losses[:4])), losses
    # the same images, noise and seed: only the references differ, so another first loss means they reach it
    assert trained["other"][1][0] != losses[0], (losses[0], trained["other"][1][0])
    assert trained["none"][1][0] != losses[0], (losses[0], trained["none"][1][0])
    assert "controls" not in trained["none"][0], trained["none"][0]


def test_the_pairs_lora_loads_in_core_and_changes_a_reference_conditioned_sample(comfy_flux, trained, folders):
    name = flux.lora_name(trained["pairs"][2])

    def sample(lora: str, strength: float, tag: str):
        g = flux.sample_graph(lora, strength, tag)
        g["r1"] = {"class_type": "LoadImage", "inputs": {"image": f"{folders['controls']}/a.png"}}
        g["r2"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["r1", 0], "vae": ["v", 0]}}
        g["r3"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["4", 0], "latent": ["r2", 0]}}
        g["6"]["inputs"]["positive"] = ["r3", 0]
        mark = len(comfy_flux.log())
        outputs = comfy_flux.run(g)["outputs"]
        from safetensors.numpy import load_file
        saved = outputs[flux.SAMPLE_LATENT]["latents"][0]
        latent = load_file(str(comfy_flux.output_dir / saved["subfolder"] / saved["filename"]))["latent_tensor"]
        return latent, comfy_flux.log(mark)

    probe = "it_pairs_probe.safetensors"
    (comfy_flux.loras_dir / probe).write_bytes(b"")
    base, _ = sample(probe, 0.0, "pairs_base")
    with_lora, log = sample(name, 1.0, "pairs_lora")
    assert flux.LORA_NOT_LOADED not in log, [line for line in log.splitlines() if flux.LORA_NOT_LOADED in line][:5]
    assert not np.array_equal(with_lora, base), "the LoRA changed no latent of the reference-conditioned sample"


def test_control_dropout_trains_another_lora_and_needs_controls(comfy_flux, trained, folders):
    from safetensors.torch import load_file

    _, losses, saved = train(comfy_flux, pairs_graph(folders["images"], folders["controls"], "loras/it_pairs_dropout",
                                                     control_dropout=0.5))
    plain, dropped = load_file(str(comfy_flux.output_dir / trained["pairs"][2])), load_file(str(comfy_flux.output_dir / saved))
    assert plain.keys() == dropped.keys()
    assert any(not plain[k].equal(dropped[k]) for k in plain), "control_dropout 0.5 trained the very same LoRA"
    graph = pairs_graph(folders["images"], "", "loras/it_pairs_dropout_refused", control_dropout=0.5)
    error = comfy_flux.execution_error(comfy_flux.wait(comfy_flux.queue(graph), 300))
    assert error is not None and "control_dropout: got 0.5, but no caption carries a condition image" in error, error


def test_images_without_a_control_are_listed_naming_control_folder(comfy_flux, folders):
    partial = write(comfy_flux, "it_pairs/partial_controls", 30, only=("a", "c"))
    graph = pairs_graph(folders["images"], partial, "loras/it_pairs_partial")
    error = comfy_flux.execution_error(comfy_flux.wait(comfy_flux.queue(graph), 300))
    assert error is not None and error.startswith(
        "LoRATrainer_EncodeTrainingFolder: ValueError: control_folder: 2 of 4 images have no control in"), error
    assert "b.png" in error and "d.png" in error, error
    assert not list(comfy_flux.output_dir.glob("loras/it_pairs_partial*")), "a LoRA was written"


def test_the_edit_example_workflow_runs_on_the_tiny_flux(comfy_flux, folders):
    g = json.loads((flux.ROOT / "example_workflows" / "api" / "train_edit_lora.json").read_text("utf-8"))
    g["1"]["inputs"]["unet_name"] = flux.FLUX_MODEL
    g["3"]["inputs"]["vae_name"] = flux.FLUX_VAE
    del g["2"]  # the T5 + CLIP-L loader: no text encoder here; the instruction is the test conditioning
    g["4"] = flux.conditioning(0)
    g["6"]["inputs"].update(folder=folders["images"], control_folder=folders["controls"], **{
        k: ENCODE[k] for k in ("resolution", "bucket_step", "min_side", "max_side")})
    g["7"]["inputs"].update(steps=3, training_dtype="fp32", lora_dtype="fp32")
    g["8"]["inputs"]["prefix"] = "loras/it_pairs_example"
    entry = comfy_flux.run(g, timeout=600)
    assert "4 controls as reference latents" in entry["outputs"]["6"]["text"][0], entry["outputs"]["6"]
    losses = entry["outputs"]["9"]["loss"]
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    assert (comfy_flux.output_dir / entry["outputs"]["8"]["text"][0]).is_file()


def test_previews_sample_with_their_own_reference_image(comfy_flux, folders):
    def preview(control: str, tag: str) -> np.ndarray:
        """A training whose preview's reference is `control`'s a.png; `tag` makes each graph new (no cached run)."""
        g = pairs_graph(folders["images"], folders["controls"], f"loras/it_pairs_preview_{tag}")
        g[flux.TRAIN_NODE]["inputs"]["steps"] = 2
        g["r1"] = {"class_type": "LoadImage", "inputs": {"image": f"{folders[control]}/a.png"}}
        g["r2"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["r1", 0], "vae": ["v", 0]}}
        g["r3"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["4", 0], "latent": ["r2", 0]}}
        g["pv"] = {"class_type": "LoRATrainer_TrainingPreview",
                   "inputs": {"positive": ["r3", 0], "every": 2, "seed": 0, "steps": 2, "cfg": 1.0, "width": 64,
                              "height": 64, "sampler_name": "euler", "scheduler": "simple", "vae": ["v", 0],
                              "filename_prefix": f"it_pairs_previews/{tag}"}}
        g[flux.TRAIN_NODE]["inputs"]["preview"] = ["pv", 0]
        g["si"] = {"class_type": "SaveImage", "inputs": {"images": [flux.TRAIN_NODE, 4],
                                                         "filename_prefix": f"it_pairs_previews/grid_{tag}"}}
        image = comfy_flux.run(g, timeout=600)["outputs"]["si"]["images"][0]
        with Image.open(comfy_flux.output_dir / image["subfolder"] / image["filename"]) as img:
            return np.asarray(img.convert("RGB")).copy()

    one, other, again = preview("controls", "one"), preview("other", "other"), preview("controls", "again")
    assert np.array_equal(one, again), "the same run previewed differently: the comparison below would prove nothing"
    assert one.shape == other.shape and not np.array_equal(one, other), "the preview's reference changed nothing"
