"""Encode Training Clips in a real ComfyUI (CPU): GIF clips written here, decoded by ComfyUI's video reader,
encoded by a tiny Wan 2.1 VAE (make_wan.py: ComfyUI's own WanVAE at width 16), trained on the tiny Wan
2.1 I2V model of test_families_video.py.

1. Two clips of two sizes and lengths (64×64 × 9 frames, 96×64 × 5) train (the node's summary names both
   shapes; every loss finite, the loss falls), each with its own start frame on its caption.
2. The start image reaches the model: the same clip with a still start image of the same name beside it
   starts from another loss than with its own first frame.
3. WanImageToVideo's rule: with the still start image, core's WanImageToVideo (LoadImage of the same
   file, the clip's size and length) gives the captions on which Train LoRA trains the very LoRA, bit for
   bit, that it trains on the node's own captions.
4. The example workflow example_workflows/api/train_i2v_lora.json runs with the tiny files (its text
   encoder swapped for the test conditioning), at 64 px and a few steps.

Skips unless COMFYUI_DIR is set (see conftest.py).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("lora_trainer_it_video", HERE / "test_families_video.py")
video = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = video
_spec.loader.exec_module(video)  # the tiny Wan files and graph helpers

ENCODE_NODE = "e"
ENCODE = {"resolution": 96, "frames": 9, "bucket_step": 16, "min_side": 32, "max_side": 128, "image_to_video": True,
          "default_caption": "", "latent_dtype": "fp32"}


@pytest.fixture(scope="module")
def comfy_clips(tmp_path_factory: pytest.TempPathFactory):
    """A ComfyUI server of its own with the tiny Wan I2V model, the tiny Wan VAE and the test-only nodes."""
    yield from video.wan_server(tmp_path_factory, "comfyui_clips_base",
                                {f"models/diffusion_models/{video.WAN_I2V}": video.WAN_I2V,
                                 f"models/vae/{video.WAN_VAE}": video.WAN_VAE})


def frames(seed: int, count: int, size: tuple[int, int]) -> list[Image.Image]:
    """Smooth colour fields drifting over the frames (a GIF's palette keeps them recognisable)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    a, b, c = rng.uniform(2, 8, 3), rng.uniform(2, 8, 3), rng.uniform(0, 6, 3)
    out = []
    for t in range(count):
        rgb = np.stack([np.sin(x * a[i] + y * b[i] + c[i] + 0.3 * t) for i in range(3)], -1) * 0.5 + 0.5
        out.append(Image.fromarray((rgb * 255).astype(np.uint8)))
    return out


def write_clip(folder: Path, name: str, seed: int, count: int, size: tuple[int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shots = frames(seed, count, size)
    shots[0].save(folder / f"{name}.gif", save_all=True, append_images=shots[1:], duration=100, loop=0)


@pytest.fixture(scope="module")
def folders(comfy_clips) -> dict[str, str]:
    root = comfy_clips.input_dir
    write_clip(root / "it_clips" / "two", "a", 1, 9, (64, 64))
    write_clip(root / "it_clips" / "two", "b", 2, 5, (96, 64))
    write_clip(root / "it_clips" / "one", "a", 1, 9, (64, 64))
    write_clip(root / "it_clips" / "still", "a", 1, 9, (64, 64))
    frames(7, 1, (64, 64))[0].save(root / "it_clips" / "still" / "a.png")  # its start image: another picture
    return {"two": "it_clips/two", "one": "it_clips/one", "still": "it_clips/still"}


def clips_graph(folder: str, prefix: str, steps: int = 4) -> dict:
    """Tiny Wan I2V, its VAE, one test conditioning → Encode Training Clips → Train LoRA → Save, Plot."""
    g = video.train_graph("wan21_t2v", prefix, steps)
    g["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": video.WAN_I2V, "weight_dtype": "default"}}
    g["v"] = {"class_type": "VAELoader", "inputs": {"vae_name": video.WAN_VAE}}
    del g["3"]
    g[ENCODE_NODE] = {"class_type": "LoRATrainer_EncodeTrainingClips",
                      "inputs": {"folder": folder, "vae": ["v", 0], "conditioning": ["4", 0], **ENCODE}}
    g[video.TRAIN_NODE]["inputs"].update(latents=[ENCODE_NODE, 0], positive=[ENCODE_NODE, 1])
    return g


def run(comfy, graph: dict) -> tuple[str | None, list[float], dict]:
    from safetensors.torch import load_file

    entry = comfy.run(graph, timeout=600)
    losses = entry["outputs"][video.PLOT_NODE]["loss"]
    assert all(np.isfinite(losses)), losses
    text = entry["outputs"].get(ENCODE_NODE, {}).get("text")
    lora = load_file(str(comfy.output_dir / entry["outputs"][video.SAVE_NODE]["text"][0]))
    return (text[0] if text else None), losses, lora


def test_clips_of_two_sizes_and_lengths_train_each_with_its_start_frame(comfy_clips, folders):
    summary, losses, _ = run(comfy_clips, clips_graph(folders["two"], "loras/it_clips_two", steps=24))
    assert summary == "2 clips (64×64×9: 1, 96×64×5: 1); start frames set (0 from image files)", summary
    assert len(losses) == 24 and float(np.mean(losses[-6:])) < float(np.mean(losses[:6])), losses


def test_a_still_start_image_reaches_the_model(comfy_clips, folders):
    _, own, _ = run(comfy_clips, clips_graph(folders["one"], "loras/it_clips_own"))
    summary, still, _ = run(comfy_clips, clips_graph(folders["still"], "loras/it_clips_still"))
    assert summary.endswith("start frames set (1 from image files)"), summary
    assert own[0] != still[0], (own[0], still[0])


def test_the_start_frame_input_is_wan_image_to_video_s(comfy_clips, folders):
    ours = run(comfy_clips, clips_graph(folders["still"], "loras/it_clips_ours"))
    g = clips_graph(folders["still"], "loras/it_clips_core")
    g["p"] = {"class_type": "LoadImage", "inputs": {"image": f"{folders['still']}/a.png"}}
    g["w"] = {"class_type": "WanImageToVideo",
              "inputs": {"positive": ["4", 0], "negative": ["4", 0], "vae": ["v", 0], "width": 64, "height": 64,
                         "length": 9, "batch_size": 1, "start_image": ["p", 0]}}
    g[video.TRAIN_NODE]["inputs"]["positive"] = ["w", 0]
    core = run(comfy_clips, g)
    assert ours[1] == core[1], (ours[1], core[1])
    assert ours[2].keys() == core[2].keys() and all(ours[2][k].equal(core[2][k]) for k in ours[2])


def test_the_i2v_example_workflow_runs_on_the_tiny_files(comfy_clips, folders):
    g = json.loads((HERE.parents[1] / "example_workflows" / "api" / "train_i2v_lora.json").read_text("utf-8"))
    g["1"]["inputs"]["unet_name"] = video.WAN_I2V
    g["3"]["inputs"]["vae_name"] = video.WAN_VAE
    del g["2"]  # umT5: no text encoder here; one test conditioning for every clip
    g["c"] = video.conditioning("wan21_t2v", 0)
    g["4"]["inputs"].pop("clip")
    g["4"]["inputs"].update(folder=folders["two"], conditioning=["c", 0], **{
        k: ENCODE[k] for k in ("resolution", "frames", "bucket_step", "min_side", "max_side")})
    g["5"]["inputs"].update(steps=3, training_dtype="fp32", lora_dtype="fp32")
    g["6"]["inputs"]["prefix"] = "loras/it_clips_example"
    entry = comfy_clips.run(g, timeout=600)
    assert entry["outputs"]["4"]["text"][0].startswith("2 clips ("), entry["outputs"]["4"]
    losses = entry["outputs"]["7"]["loss"]
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    assert (comfy_clips.output_dir / entry["outputs"]["6"]["text"][0]).is_file()
