"""Train LoRA trains a Wan 2.1 video model and a Qwen-Image model in a real ComfyUI (CPU, tiny
random-weight models of ComfyUI's own classes).

The server (`comfy_wan`, below) has its own base folder with make_wan.py's file: ComfyUI's own
`WanModel` at the smallest width detection allows (dim 128, 1 head, 1 block), saved so core's
UNETLoader detects it as WAN21_T2V (flow, shift 8). There is no VAE and no text encoder: the
test-only nodes (it_video_nodes.py) give the video latents (two LATENTs of (1, 16, T, 8, 8), T = 3
and 2, smooth drifting patterns standing in for VAE-encoded frames) and an umT5-shaped context.
Train LoRA takes the two video LATENTs unchanged (5-D, different frame counts: same-shape groups).

One training runs for the module; it shows: the loss falls; every layer of the model gets a trained
adapter (the Conv3d patch embedding included); the saved file loads in core's LoraLoaderModelOnly
with every key matched and changes a sample (KSampler on core's EmptyHunyuanLatentVideo, the latent
Wan workflows use); the base model samples bit-identically before and after (the probe trick of
test_flux.py). The step rate (tqdm) and the server's peak RSS go to the console (pytest -s).
Qwen-Image: ComfyUI's detection reads only its layer count and in-channels from a file (every width
full size), so make_qwen_image.py builds ComfyUI's `QwenImageTransformer2DModel` at toy width
in-process (2 heads of 32, 1 block) behind the test-only ITTinyQwenImageLoader node. Its latents
are 5-D too (Wan 2.1's latent format, one frame): one (1, 16, 1, 8, 8) LATENT and one 4-D image
LATENT (1, 16, 8, 8), which Train LoRA gives a frame axis as core's sampler does (one batch then),
a Qwen2.5-VL-shaped (3584-wide) context. The same checks, except that the layer list comes from the
LoRA itself (the model is not a file): every adapter moved from zero and the blocks are covered.
Skips unless COMFYUI_DIR is set.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
WAN_MODEL = "tiny_wan21_t2v.safetensors"  # make_wan.WAN_NAME
WAN_I2V = "tiny_wan21_i2v.safetensors"  # make_wan.I2V_NAME
WAN_VAE = "tiny_wan21_vae.safetensors"  # make_wan.VAE_NAME (test_clips.py uses it)
TRAIN = {"learning_rate": 5e-3, "batch_size": 2, "rank": 8, "optimizer": "AdamW",
         "loss_function": "MSE", "seed": 1, "lora_dtype": "fp32", "training_dtype": "fp32",
         "gradient_checkpointing": False, "existing_lora": "[None]"}
FAMILIES = {  # family -> (loader node, training clips' frames, context width, sampled frames as `length`, lr, steps)
    "wan21_t2v": ({"class_type": "UNETLoader", "inputs": {"unet_name": WAN_MODEL, "weight_dtype": "default"}},
                  "3,2", 4096, 9, 5e-3, 30),
    "qwen_image": ({"class_type": "ITTinyQwenImageLoader", "inputs": {"seed": 0}}, "1,i", 3584, 1, 1e-2, 80),
}
# In a one-block joint (MMDiT) model the block's text-stream outputs are never read again: no gradient
# reaches these Qwen-Image adapters, correctly (with more blocks the next block reads them).
QWEN_DEAD_TEXT_PATH = {"attn_add_q_proj", "attn_norm_added_q", "attn_to_add_out", "txt_mlp_net_0_proj", "txt_mlp_net_2"}
# bf16 autocast with gradient checkpointing: its first steps track the fp32 run's
BF16 = {"training_dtype": "bf16", "gradient_checkpointing": True}
BF16_STEPS = 10
TRAIN_NODE, SAVE_NODE, PLOT_NODE, SAMPLE_LATENT = "5", "6", "7", "9"
LORA_NOT_LOADED = "lora key not loaded"
_probe_ids = itertools.count()


def _server():
    return sys.modules["lora_trainer_it_server"]  # conftest.py loads server.py under this name


def cached_wan(comfy_dir: Path, python: str) -> Path:
    """The folder of the tiny Wan models (T2V, I2V) and VAE, built once per version of make_wan.py (the cache
    of server.cached_flux)."""
    script = HERE / "make_wan.py"
    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:10]
    cache = Path(os.environ.get("COMFYUI_IT_CACHE", "~/.cache/comfyui-lora-trainer-it")).expanduser()
    path = cache / f"tiny_wan-{digest}"
    if not all((path / name).exists() for name in (WAN_MODEL, WAN_I2V, WAN_VAE)):
        done = subprocess.run([python, str(script), str(path)], cwd=comfy_dir,
                              env=dict(os.environ, COMFYUI_DIR=str(comfy_dir)), capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"make_wan.py failed:\n{done.stdout}\n{done.stderr}")
    return path


@pytest.fixture(scope="module")
def comfy_wan(tmp_path_factory: pytest.TempPathFactory):
    """A ComfyUI server of its own with models/diffusion_models/tiny_wan21_t2v.safetensors and the
    test-only nodes of it_video_nodes.py."""
    yield from wan_server(tmp_path_factory, "comfyui_wan_base",
                          {f"models/diffusion_models/{name}": name for name in (WAN_MODEL, WAN_I2V)})


def wan_server(tmp_path_factory: pytest.TempPathFactory, base_name: str, models: dict[str, str]):
    """A fixture's body: a ComfyUI server of its own with `models` ({path in the base dir: file name among
    cached_wan's}) and it_video_nodes.py, stopped when the fixture ends (test_clips.py uses it too)."""
    server = _server()
    comfy_dir, python = server.comfyui_or_skip()
    base = tmp_path_factory.mktemp(base_name)
    built = cached_wan(comfy_dir, python)
    server.make_base_dir(base, None, {**{where: built / name for where, name in models.items()},
                                      "custom_nodes/it_video_nodes.py": HERE / "it_video_nodes.py"})
    started = time.monotonic()
    client = server.start_server(comfy_dir, python, base)
    try:
        print(f"\nComfyUI up at {client.url} after {time.monotonic() - started:.1f} s (base {base})")
        yield client
    finally:
        server.stop(client.process)


# ---- graphs ------------------------------------------------------------------------------
def conditioning(family: str, seed: int) -> dict:
    return {"class_type": "ITWanConditioning", "inputs": {"seed": seed, "tokens": 16, "width": FAMILIES[family][2]}}


def train_graph(family: str, prefix: str, steps: int | None = None, **settings) -> dict:
    """UNETLoader, two video LATENTs (3 and 2 frames) and a Wan-shaped caption → Train LoRA → Save
    LoRA (format full: norms and biases train too, so every weight shows whether gradients reached
    it) and Plot Loss Graph."""
    return {
        "1": FAMILIES[family][0],
        "3": {"class_type": "ITVideoLatents", "inputs": {"seed": 0, "frames": FAMILIES[family][1], "width": 64, "height": 64}},
        "4": conditioning(family, 0),
        TRAIN_NODE: {"class_type": "LoRATrainer_TrainLoRA",
                     "inputs": {"model": ["1", 0], "latents": ["3", 0], "positive": ["4", 0],
                                **TRAIN, "learning_rate": FAMILIES[family][4],
                                "steps": FAMILIES[family][5] if steps is None else steps,
                                "train_norms": True, "train_biases": True, **settings}},
        SAVE_NODE: {"class_type": "LoRATrainer_SaveLoRA",
                    "inputs": {"lora": [TRAIN_NODE, 1], "prefix": prefix, "steps": [TRAIN_NODE, 3], "format": "full"}},
        PLOT_NODE: {"class_type": "LoRATrainer_PlotLossGraph",
                    "inputs": {"loss": [TRAIN_NODE, 2], "filename_prefix": f"it_{family}_loss/graph"}},
    }


def sample_graph(family: str, lora_name: str, strength: float, tag: str) -> dict:
    """Core's LoraLoaderModelOnly on the tiny model, KSampler (2 steps, euler/simple, cfg 1) from
    core's EmptyHunyuanLatentVideo (64×64; Wan 9 frames → (1, 16, 3, 8, 8), Qwen-Image 1 frame);
    saves the latent."""
    return {
        "1": FAMILIES[family][0],
        "2": {"class_type": "LoraLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": strength}},
        "c": conditioning(family, 0),
        "n": conditioning(family, 1),
        "5": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": 64, "height": 64, "length": FAMILIES[family][3], "batch_size": 1}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["2", 0], "positive": ["c", 0], "negative": ["n", 0], "latent_image": ["5", 0],
                         "seed": 7, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                         "denoise": 1.0}},
        SAMPLE_LATENT: {"class_type": "SaveLatent",
                        "inputs": {"samples": ["6", 0], "filename_prefix": f"it_{family}_latents/{tag}"}},
    }


class Sample(NamedTuple):
    latent: np.ndarray  # float32 (1, 16, 3, 8, 8)
    log: str


def sample(comfy, family: str, lora_name: str, strength: float, tag: str) -> Sample:
    from safetensors.numpy import load_file

    mark = len(comfy.log())
    saved = comfy.run(sample_graph(family, lora_name, strength, tag))["outputs"][SAMPLE_LATENT]["latents"][0]
    latent = load_file(str(comfy.output_dir / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    return Sample(latent, comfy.log(mark))


def sample_base(comfy, family: str, tag: str) -> Sample:
    """The cached base model: LoraLoaderModelOnly at strength 0 with a fresh (empty) file re-runs the sampler."""
    probe = f"it_wan_probe_{next(_probe_ids)}.safetensors"
    (comfy.loras_dir / probe).write_bytes(b"")
    return sample(comfy, family, probe, 0.0, f"{tag}_{family}")


def model_loads(comfy) -> int:
    return comfy.log().count("model weight dtype")


# ---- fixture -----------------------------------------------------------------------------
class Trained(NamedTuple):
    baseline: Sample
    loads_before: int  # diffusion-model loads when the baseline was taken
    entry: dict
    saved: str  # loras/it_<family>_<steps>_steps_00001_.safetensors
    losses: list[float]
    log: str
    bf16: list[float]  # the losses of a BF16_STEPS-step training in bf16 with gradient checkpointing
    base_after: Sample
    loads: int  # diffusion-model loads when base_after was taken


@pytest.fixture(scope="module")
def trained(comfy_wan) -> dict[str, Trained]:
    """Per family: a base sample, the training, a base sample after (one family after the other)."""
    runs = {}
    for family in FAMILIES:
        baseline = sample_base(comfy_wan, family, "baseline")
        loads_before = model_loads(comfy_wan)
        steps, what = FAMILIES[family][5], {"clips": FAMILIES[family][1], "batch": 2, "rank": 8}
        run = _server().run_measured(comfy_wan, train_graph(family, f"loras/it_{family}"), steps, f"{family} fp32",
                                     **what, training_dtype="fp32", gradient_checkpointing=False)
        bf16 = _server().run_measured(comfy_wan, train_graph(family, f"loras/it_{family}_bf16", BF16_STEPS, **BF16),
                                      BF16_STEPS, f"{family} bf16+checkpointing", **what, **BF16)
        losses = run.entry["outputs"][PLOT_NODE]["loss"]
        print(f"\n{family}: loss first 10 {np.mean(losses[:10]):.4f} -> last 10 {np.mean(losses[-10:]):.4f}; "
              f"{run.seconds_per_step} s/step, server extra peak RSS {run.extra_peak_mib} MiB; bf16 + checkpointing "
              f"{bf16.seconds_per_step} s/step, {bf16.extra_peak_mib} MiB")
        runs[family] = Trained(baseline, loads_before, run.entry, run.entry["outputs"][SAVE_NODE]["text"][0], losses,
                               run.log, bf16.entry["outputs"][PLOT_NODE]["loss"],
                               sample_base(comfy_wan, family, "base_after"), model_loads(comfy_wan))
    return runs


# ---- tests -------------------------------------------------------------------------------
def test_models_are_the_families_comfyui_says(comfy_wan, trained):
    info = comfy_wan.object_info()
    assert WAN_MODEL in info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert {"ITVideoLatents", "ITTinyQwenImageLoader", "EmptyHunyuanLatentVideo"} <= set(info)
    log = comfy_wan.log()
    assert "model_type FLOW" in log, "UNETLoader did not load the tiny Wan as a flow model"
    assert trained["wan21_t2v"].baseline.latent.shape == (1, 16, 3, 8, 8)
    assert trained["qwen_image"].baseline.latent.shape == (1, 16, 1, 8, 8)


@pytest.mark.parametrize("family", FAMILIES)
def test_video_latents_train_and_the_loss_falls(comfy_wan, trained, family):
    run = trained[family]
    losses = run.losses
    steps = FAMILIES[family][5]
    assert len(losses) == steps and all(np.isfinite(losses)), losses
    # 10-step means: the flow loss (velocity ε − x0) is mostly the noise's own variance, so it falls
    # from about 1.1 towards a floor near 0.85 on these tiny clips; the losses are seeded, so fixed
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    assert last < 0.85 * first, f"{family}: loss did not fall: first 10 mean {first:.4f}, last 10 {last:.4f}: {losses}"
    assert re.fullmatch(rf"loras/it_{family}_{steps}_steps_\d{{5}}_\.safetensors", run.saved), run.saved
    assert "Train LoRA: 2 images, one caption for every image" in run.log


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_with_gradient_checkpointing_tracks_fp32(trained, family):
    run = trained[family]
    assert len(run.bf16) == BF16_STEPS and all(np.isfinite(run.bf16)), run.bf16
    np.testing.assert_allclose(run.bf16, run.losses[:BF16_STEPS], rtol=0.05,
                               err_msg=f"{family}: bf16 autocast with checkpointing strays from fp32")


def test_wan_image_to_video_without_its_image_is_refused_naming_the_node(comfy_wan):
    """Wan 2.1 I2V concatenates a start-frame latent and mask to the noisy latent; captions that carry
    none would train it on blank images, so Train LoRA refuses, naming the node that gives them."""
    graph = train_graph("wan21_t2v", "loras/it_wan_i2v", 2)
    graph["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": WAN_I2V, "weight_dtype": "default"}}
    error = comfy_wan.execution_error(comfy_wan.wait(comfy_wan.queue(graph), 300))
    assert error is not None and error.startswith("LoRATrainer_TrainLoRA: ValueError: positive: this WAN21_I2V model"), error
    assert "(16 + 20 input channels)" in error and "WanImageToVideo" in error, error
    assert not list(comfy_wan.output_dir.glob("loras/it_wan_i2v*")), "a file was written for a refused training"


def _i2v_graph(start_seed: int, steps: int, frames: str = "3") -> dict:
    """The I2V model trained on one 3-frame clip whose caption carries a start frame (ITConcatImage, as
    WanImageToVideo sets it) taken from the clip of seed `start_seed`."""
    graph = train_graph("wan21_t2v", "loras/it_wan_i2v_pairs", steps)
    graph["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": WAN_I2V, "weight_dtype": "default"}}
    graph["3"]["inputs"]["frames"] = frames
    graph["s"] = {"class_type": "ITVideoLatents", "inputs": {"seed": start_seed, "frames": "3", "width": 64, "height": 64}}
    graph["c"] = {"class_type": "ITConcatImage", "inputs": {"conditioning": ["4", 0], "start": ["s", 0]}}
    graph[TRAIN_NODE]["inputs"]["positive"] = ["c", 0]
    return graph


def test_wan_image_to_video_trains_with_its_start_frame_and_the_frame_reaches_the_model(comfy_wan):
    first = comfy_wan.run(_i2v_graph(0, 12), timeout=600)["outputs"][PLOT_NODE]["loss"]
    assert len(first) == 12 and all(np.isfinite(first)), first
    other = comfy_wan.run(_i2v_graph(5, 12), timeout=600)["outputs"][PLOT_NODE]["loss"]
    # the same clip, noise and seed: only the start frame differs, so a different loss means it reached the model
    assert other[0] != first[0], (first[0], other[0])
    assert float(np.mean(first[-4:])) < float(np.mean(first[:4])), first


def test_wan_image_to_video_lora_loads_in_core_changes_a_start_frame_sample_and_leaves_the_base(comfy_wan):
    """The I2V sample graph with the start frame on its captions: base before, trained LoRA, base after."""
    def start_frame(g: dict) -> None:
        g["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": WAN_I2V, "weight_dtype": "default"}}
        g["s"] = {"class_type": "ITVideoLatents", "inputs": {"seed": 0, "frames": "3", "width": 64, "height": 64}}
        for cond in ("c", "n"):  # the start frame on both captions, as WanImageToVideo sets it
            g[f"{cond}i"] = {"class_type": "ITConcatImage", "inputs": {"conditioning": [cond, 0], "start": ["s", 0]}}
        g["6"]["inputs"].update(positive=["ci", 0], negative=["ni", 0])

    graph = _i2v_graph(0, 6)
    graph[SAVE_NODE]["inputs"]["prefix"] = "loras/it_wan_i2v_sampled"
    check_conditioned_lora(comfy_wan, "wan21_t2v", graph, start_frame, "i2v")


def test_wan_image_to_video_control_dropout_1_trains_without_the_start_frame(comfy_wan):
    """control_dropout 1: every image trains without its start frame (the model's blank image channels), so
    two start frames give the very same losses, where at 0 they differ (the test above)."""
    def losses(start_seed: int) -> list[float]:
        graph = _i2v_graph(start_seed, 3)
        graph["o"] = {"class_type": "LoRATrainer_TrainingOptions", "inputs": {"control_dropout": 1.0}}
        graph[TRAIN_NODE]["inputs"]["options"] = ["o", 0]
        return comfy_wan.run(graph, timeout=600)["outputs"][PLOT_NODE]["loss"]

    first, other = losses(0), losses(5)
    assert len(first) == 3 and all(np.isfinite(first)), first
    assert first == other, (first, other)


def test_wan_image_to_video_trains_clips_of_two_sizes_each_with_its_first_frame(comfy_wan):
    """Two clips (3 and 2 frames), each caption carrying its own clip's first frame: ComfyUI prepares the
    guider's captions at one size, so Train LoRA prepares each at its clip's size (nodes/comfy_conds.py)."""
    graph = _i2v_graph(0, 6, frames="3,2")
    graph["c"]["inputs"]["start"] = ["3", 0]  # each clip's own first frame: two captions, one per clip
    mark = len(comfy_wan.log())
    losses = comfy_wan.run(graph, timeout=600)["outputs"][PLOT_NODE]["loss"]
    assert len(losses) == 6 and all(np.isfinite(losses)), losses
    assert "Train LoRA: 2 images, one caption per image" in comfy_wan.log(mark), comfy_wan.log(mark)[-2000:]


def test_wan_image_to_video_start_frame_that_does_not_fit_a_clip_is_refused_naming_positive(comfy_wan):
    """One 3-frame start frame given to clips of 3 and 2 frames: ComfyUI cannot fit it to the 2-frame clip,
    so Train LoRA refuses before training, naming `positive` and the shape, and writes nothing."""
    graph = _i2v_graph(0, 2, frames="3,2")
    graph[SAVE_NODE]["inputs"]["prefix"] = "loras/it_wan_i2v_misfit"
    error = comfy_wan.execution_error(comfy_wan.wait(comfy_wan.queue(graph), 300))
    assert error is not None and error.startswith("LoRATrainer_TrainLoRA: ValueError: positive: conditioning entry 1 "
                                                  "carries concat_latent_image"), error
    assert "[16, 2, 8, 8]" in error and "WanImageToVideo" in error, error
    assert not list(comfy_wan.output_dir.glob("loras/it_wan_i2v_misfit*")), "a file was written for a refused training"


def test_qwen_image_edit_style_reference_latents_train_and_reach_the_model(comfy_wan):
    """Qwen-Image reads `reference_latents` as Qwen-Image-Edit does: a caption through core's ReferenceLatent
    trains, and another reference (the same clips, noise and seed) starts from another loss."""
    def losses(reference_seed: int) -> list[float]:
        graph = train_graph("qwen_image", f"loras/it_qwen_edit_{reference_seed}", 4)
        graph["3"]["inputs"]["frames"] = "1"
        graph["r"] = {"class_type": "ITVideoLatents", "inputs": {"seed": reference_seed, "frames": "1", "width": 64,
                                                                 "height": 64}}
        graph["c"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["4", 0], "latent": ["r", 0]}}
        graph[TRAIN_NODE]["inputs"]["positive"] = ["c", 0]
        return comfy_wan.run(graph, timeout=600)["outputs"][PLOT_NODE]["loss"]

    first, other = losses(7), losses(8)
    assert len(first) == 4 and all(np.isfinite(first)) and all(np.isfinite(other)), (first, other)
    assert first[0] != other[0], (first[0], other[0])


def test_qwen_image_reference_lora_loads_in_core_changes_a_reference_sample_and_leaves_the_base(comfy_wan):
    def reference(g: dict, caption: str = "c") -> None:
        g["r"] = {"class_type": "ITVideoLatents", "inputs": {"seed": 7, "frames": "1", "width": 64, "height": 64}}
        g["cr"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": [caption, 0], "latent": ["r", 0]}}

    graph = train_graph("qwen_image", "loras/it_qwen_ref_sampled", 6)
    graph["3"]["inputs"]["frames"] = "1"
    reference(graph, "4")
    graph[TRAIN_NODE]["inputs"]["positive"] = ["cr", 0]

    def sampled(g: dict) -> None:
        reference(g)
        g["6"]["inputs"]["positive"] = ["cr", 0]

    check_conditioned_lora(comfy_wan, "qwen_image", graph, sampled, "qwen_ref")


def check_conditioned_lora(comfy, family: str, graph: dict, condition, tag: str) -> None:
    """Sample the base (sample_graph with `condition` applied), train `graph`, sample the base again (it must be
    bit-identical) and with the trained LoRA at 1: every key loads, and the conditioned sample changes."""
    from safetensors.numpy import load_file

    def sample(lora: str, strength: float, which: str) -> tuple[np.ndarray, str]:
        g = sample_graph(family, lora, strength, f"{tag}_{which}")
        condition(g)
        mark = len(comfy.log())
        saved = comfy.run(g)["outputs"][SAMPLE_LATENT]["latents"][0]
        latent = load_file(str(comfy.output_dir / saved["subfolder"] / saved["filename"]))["latent_tensor"]
        return latent, comfy.log(mark)

    def base(which: str) -> np.ndarray:
        probe = f"it_{tag}_probe_{which}.safetensors"  # strength 0: never read; the fresh name re-runs the sampler
        (comfy.loras_dir / probe).write_bytes(b"")
        return sample(probe, 0.0, which)[0]

    before = base("before")
    saved = comfy.run(graph, timeout=600)["outputs"][SAVE_NODE]["text"][0]
    np.testing.assert_array_equal(base("after"), before, err_msg=f"{family}: the base model changed")
    with_lora, log = sample(saved[len("loras/"):], 1.0, "with_lora")
    assert LORA_NOT_LOADED not in log, [line for line in log.splitlines() if LORA_NOT_LOADED in line][:5]
    assert not np.array_equal(with_lora, before), f"{family}: the LoRA changed no latent of the conditioned sample"


def test_every_layer_of_the_wan_model_trains(comfy_wan, trained):
    """Every weight has a LoRA (lora_up/down, .diff for other weights, .diff_b for biases) and every
    one moved from zero: gradients reached the Conv3d patch embedding, the attention and the head."""
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(comfy_wan.base_dir / "models" / "diffusion_models" / WAN_MODEL), "np") as f:
        model_keys = list(f.keys())
    lora = load_file(str(comfy_wan.output_dir / trained["wan21_t2v"].saved))
    # Wan's modulation tables (`blocks.N.modulation`, `head.modulation`) are bare parameters of a block,
    # not a layer's weight: adapters wrap layers, so they get none (they stay the base's)
    tables = [k for k in model_keys if k.endswith(".modulation")]
    assert tables == ["blocks.0.modulation", "head.modulation"], tables
    expected = _server().expected_lora_keys(model_keys, lora, skip=tuple(tables))
    missing = [k for k in expected if k not in lora]
    assert not missing, f"no LoRA for {missing}"
    untrained = [k for k in expected if not torch.any(lora[k] != 0)]
    assert not untrained, f"adapters still at zero (no gradient reached them): {untrained}"
    assert not any(k.startswith(("lora_unet_blocks_0.", "lora_unet_head.")) for k in lora)  # no table adapters
    assert lora["lora_unet_patch_embedding.lora_down.weight"].dim() == 5  # the Conv3d's (rank, 16, 1, 2, 2)
    assert "lora_unet_blocks_0_self_attn_q.lora_up.weight" in lora
    assert "lora_unet_blocks_0_cross_attn_k.lora_up.weight" in lora


def test_every_adapter_of_the_qwen_image_model_trains(comfy_wan, trained):
    """The in-process model is no file: every adapter in the LoRA moved from zero, and the joint
    block's image and text attention, its MLPs and the input/output projections have one."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    lora = load_file(str(comfy_wan.output_dir / trained["qwen_image"].saved))
    untrained = {k for k, v in lora.items() if not k.endswith(".alpha") and not torch.any(v != 0)}
    dead = {k for k in lora if k.split(".")[0].removeprefix("lora_unet_transformer_blocks_0_") in QWEN_DEAD_TEXT_PATH
            and not k.endswith((".alpha", ".lora_down.weight"))}  # a down stays random-init, its up at zero
    assert len(dead) == 9 and untrained == dead, f"adapters at zero besides the dead text path: {untrained - dead}"
    for layer in ("img_in", "txt_in", "proj_out", "transformer_blocks_0_attn_to_q", "transformer_blocks_0_attn_add_k_proj",
                  "transformer_blocks_0_img_mlp_net_0_proj", "transformer_blocks_0_txt_mlp_net_2"):
        assert f"lora_unet_{layer}.lora_up.weight" in lora, f"no adapter for {layer}: {sorted(lora)[:8]}…"


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_loads_in_core_with_every_key_and_changes_the_sample(comfy_wan, trained, family):
    run = trained[family]
    with_lora = sample(comfy_wan, family, run.saved[len("loras/"):], 1.0, "with_lora")
    log = with_lora.log + run.log
    assert LORA_NOT_LOADED not in log, [line for line in log.splitlines() if LORA_NOT_LOADED in line][:5]
    assert not np.array_equal(with_lora.latent, run.baseline.latent), f"{family}: the LoRA changed no latent"


@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_is_bit_identical_after_training(comfy_wan, trained, family):
    run = trained[family]
    assert np.array_equal(run.base_after.latent, run.baseline.latent), f"{family}: the base model's sample changed"
    assert run.loads == run.loads_before, f"{family}: the model was reloaded between the samples: the check would prove nothing"
