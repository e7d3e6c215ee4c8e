"""Wan 2.2 A14B's two experts train in a real ComfyUI (CPU, tiny random-weight models of ComfyUI's own
classes): the high-noise expert alone and the low-noise expert alone (the options' `expert`), and both in
one run (Train LoRA's `high_noise_model`).

Wan 2.2 A14B's experts are Wan 2.1-architecture models that core's UNETLoader detects as WAN21_T2V (flow,
shift 8). The server has two tiny ones: make_wan.py's file as the low-noise expert, and the same builder
with another seed (other random weights) as the high-noise expert (`cached_high`), plus make_wan.py's I2V
file for the refusal of a mismatched pair. Latents and captions come from the test-only nodes of
it_video_nodes.py (as in test_families_video.py).

It shows: each run's loss falls (per expert in the run of both: the loss map says each step's expert);
each saved file is named and marked for its expert and loads in core's LoraLoaderModelOnly with every key
matched; a two-stage KSamplerAdvanced sample (the high-noise model for the first 2 of 4 steps, σ ≥ 0.89 with
shift 8, then the low-noise model, as ComfyUI's Wan 2.2 workflows sample) changes with each expert's LoRA;
both bases sample bit-identically before and after; in the run of both, ComfyUI loads one expert at a time
(its log's "Requested to load" lines at every switch). Skips unless COMFYUI_DIR is set.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("lora_trainer_it_video", HERE / "test_families_video.py")
video = sys.modules.get(_spec.name) or importlib.util.module_from_spec(_spec)
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = video
    _spec.loader.exec_module(video)  # the tiny Wan files and graph helpers

LOW = video.WAN_MODEL  # make_wan.py's T2V file: the low-noise expert
HIGH = "tiny_wan22_high_noise.safetensors"  # the same architecture, seed 1
HIGH_SEED = 1
STEPS, BOTH_STEPS = 30, 40
PLOT, SAVE, TRAIN = video.PLOT_NODE, video.SAVE_NODE, video.TRAIN_NODE
SAMPLE_LATENT = "s"
EXPERT_RANGE = {"high_noise": ("875", "1000"), "low_noise": ("0", "875")}
_BUILD_HIGH = """
import os, sys
sys.path[:0] = [os.environ["COMFYUI_DIR"], {here!r}]
from comfy.cli_args import args
args.cpu = True  # before comfy.model_management is imported
import make_wan
make_wan.SEED = {seed}
sd = make_wan.build_wan(make_wan.WAN_CONFIG)
print("detected:", make_wan.detect_as(sd, make_wan.WAN_CONFIG, "WAN21_T2V"))
make_wan._save(sd, {out!r})
"""


def cached_high(comfy_dir: Path, python: str) -> Path:
    """The high-noise expert: make_wan.py's T2V model with seed HIGH_SEED, built once per version of make_wan.py."""
    digest = hashlib.sha256((HERE / "make_wan.py").read_bytes()).hexdigest()[:10]
    cache = Path(os.environ.get("COMFYUI_IT_CACHE", "~/.cache/comfyui-lora-trainer-it")).expanduser()
    path = cache / f"tiny_wan22-{digest}-seed{HIGH_SEED}" / HIGH
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        script = _BUILD_HIGH.format(here=str(HERE), seed=HIGH_SEED, out=str(path))
        done = subprocess.run([python, "-c", script], cwd=comfy_dir, env=dict(os.environ, COMFYUI_DIR=str(comfy_dir)),
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"building the high-noise expert failed:\n{done.stdout}\n{done.stderr}")
    return path


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory):
    server = video._server()
    comfy_dir, python = server.comfyui_or_skip()
    built = video.cached_wan(comfy_dir, python)
    high = cached_high(comfy_dir, python)
    base = tmp_path_factory.mktemp("comfyui_wan22_base")
    server.make_base_dir(base, None, {f"models/diffusion_models/{LOW}": built / LOW,
                                      f"models/diffusion_models/{video.WAN_I2V}": built / video.WAN_I2V,
                                      f"models/diffusion_models/{HIGH}": high,
                                      "custom_nodes/it_video_nodes.py": HERE / "it_video_nodes.py"})
    client = server.start_server(comfy_dir, python, base)
    try:
        yield client
    finally:
        server.stop(client.process)


# ---- graphs ------------------------------------------------------------------------------
def loader(name: str) -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def train_graph(prefix: str, steps: int, model: str = LOW, expert: str | None = None,
                high_noise_model: str | None = None) -> dict:
    """test_families_video's Wan training graph (two clips, format full) on `model`; with `expert`, an options
    node sets it; with `high_noise_model`, that file is Train LoRA's high_noise_model."""
    graph = video.train_graph("wan21_t2v", prefix, steps)
    graph["1"] = loader(model)
    if expert is not None:
        graph["o"] = {"class_type": "LoRATrainer_TrainingOptions", "inputs": {"expert": expert}}
        graph[TRAIN]["inputs"]["options"] = ["o", 0]
    if high_noise_model is not None:
        graph["h"] = loader(high_noise_model)
        graph[TRAIN]["inputs"]["high_noise_model"] = ["h", 0]
    return graph


def two_stage_graph(high_lora: str, high_strength: float, low_lora: str, low_strength: float, tag: str) -> dict:
    """ComfyUI's Wan 2.2 A14B sampling: KSamplerAdvanced with the high-noise model (and its LoRA) for steps 0–2
    of 4, its leftover noise into a second KSamplerAdvanced with the low-noise model for the rest; saves the
    latent."""
    advanced = {"noise_seed": 7, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                "positive": ["c", 0], "negative": ["n", 0]}
    return {
        "hm": loader(HIGH), "lm": loader(LOW),
        "hl": {"class_type": "LoraLoaderModelOnly",
               "inputs": {"model": ["hm", 0], "lora_name": high_lora, "strength_model": high_strength}},
        "ll": {"class_type": "LoraLoaderModelOnly",
               "inputs": {"model": ["lm", 0], "lora_name": low_lora, "strength_model": low_strength}},
        "c": video.conditioning("wan21_t2v", 0), "n": video.conditioning("wan21_t2v", 1),
        "e": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9,
                                                                   "batch_size": 1}},
        "k1": {"class_type": "KSamplerAdvanced",
               "inputs": {**advanced, "model": ["hl", 0], "add_noise": "enable", "latent_image": ["e", 0],
                          "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"}},
        "k2": {"class_type": "KSamplerAdvanced",
               "inputs": {**advanced, "model": ["ll", 0], "add_noise": "disable", "latent_image": ["k1", 0],
                          "start_at_step": 2, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
        SAMPLE_LATENT: {"class_type": "SaveLatent", "inputs": {"samples": ["k2", 0],
                                                               "filename_prefix": f"it_wan22_latents/{tag}"}},
    }


def sample(comfy, high_lora: str | None, low_lora: str | None, tag: str) -> tuple[np.ndarray, str]:
    """The two-stage sample with these LoRA files (None: the base, through a fresh empty file at strength 0,
    which re-runs the sampler without reading it); the latent and the log of the run."""
    from safetensors.numpy import load_file

    def lora(name: str | None, which: str) -> tuple[str, float]:
        if name is not None:
            return name[len("loras/"):], 1.0
        probe = f"it_wan22_probe_{tag}_{which}.safetensors"
        (comfy.loras_dir / probe).write_bytes(b"")
        return probe, 0.0

    mark = len(comfy.log())
    graph = two_stage_graph(*lora(high_lora, "high"), *lora(low_lora, "low"), tag)
    saved = comfy.run(graph)["outputs"][SAMPLE_LATENT]["latents"][0]
    latent = load_file(str(comfy.output_dir / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    return latent, comfy.log(mark)


def metadata(comfy, saved: str) -> dict:
    from safetensors import safe_open

    with safe_open(str(comfy.output_dir / saved), "np") as f:
        return f.metadata()


def loss_fell(losses: list[float], what: str, window: int = 5) -> tuple[float, float]:
    first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    assert all(np.isfinite(losses)) and last < 0.9 * first, f"{what}: loss did not fall: {first:.4f} -> {last:.4f}: {losses}"
    return first, last


# ---- fixture: the base sample, the three trainings, the base sample after ---------------
@pytest.fixture(scope="module")
def trained(comfy) -> dict:
    runs = {"base_before": sample(comfy, None, None, "base_before")[0]}
    for name, graph in (("high_alone", train_graph("loras/it_wan22_alone", STEPS, HIGH, expert="high_noise")),
                        ("low_alone", train_graph("loras/it_wan22_alone", STEPS, LOW, expert="low_noise")),
                        ("both", train_graph("loras/it_wan22_both", BOTH_STEPS, LOW, high_noise_model=HIGH))):
        mark = len(comfy.log())
        entry = comfy.run(graph, timeout=900)
        runs[name] = {"files": entry["outputs"][SAVE]["text"], "plot": entry["outputs"][PLOT], "log": comfy.log(mark)}
    runs["base_after"] = sample(comfy, None, None, "base_after")[0]
    return runs


# ---- tests -------------------------------------------------------------------------------
def test_both_experts_are_wan_models_comfyui_detects(comfy, trained):
    log = comfy.log()
    assert "model_type FLOW" in log
    assert trained["base_before"].shape == (1, 16, 3, 8, 8)


@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_one_expert_alone_trains_and_its_file_says_which(comfy, trained, expert):
    run = trained[f"{expert.split('_')[0]}_alone"]
    losses = run["plot"]["loss"]
    assert len(losses) == STEPS
    first, last = loss_fell(losses, expert)
    print(f"\n{expert} alone: loss first 5 {first:.4f} -> last 5 {last:.4f}")
    saved, = run["files"]
    assert re.fullmatch(rf"loras/it_wan22_alone_{expert}_{STEPS}_steps_\d{{5}}_\.safetensors", saved), saved
    meta = metadata(comfy, saved)
    assert meta["lora_trainer.expert"] == expert and meta["lora_trainer.expert_boundary"] == "0.875"
    assert (meta["ss_min_timestep"], meta["ss_max_timestep"]) == EXPERT_RANGE[expert]
    assert meta["ss_output_name"] == f"it_wan22_alone_{expert}"


def test_both_experts_train_in_one_run_one_loaded_at_a_time(comfy, trained):
    run = trained["both"]
    losses, experts = run["plot"]["loss"], run["plot"]["expert"]
    assert len(losses) == len(experts) == BOTH_STEPS and set(experts) == {"high_noise", "low_noise"}
    for name in ("high_noise", "low_noise"):
        mine = [v for v, e in zip(losses, experts) if e == name]
        first, last = loss_fell(mine, f"{name} in the run of both", window=4)
        print(f"\n{name} in the run of both: {len(mine)} steps, loss first 4 {first:.4f} -> last 4 {last:.4f}")
    switches = 1 + sum(1 for a, b in zip(experts, experts[1:]) if a != b)
    counts = ", ".join(f"{n} {experts.count(n)} steps" for n in ("high_noise", "low_noise"))
    assert f"Train LoRA: experts: {counts}; {switches} switches" in run["log"], run["log"][-3000:]
    # ComfyUI loads the step's expert at each switch (the other was unloaded, so it is requested anew)
    loads = run["log"].count("Requested to load WAN21")
    print(f"\nrun of both: {counts}, {switches} switches, ComfyUI's 'Requested to load WAN21' lines: {loads}")
    assert loads >= switches, run["log"][-3000:]
    files = sorted(run["files"])
    assert len(files) == 2, files
    for saved, expert in zip(files, ("high_noise", "low_noise")):
        assert re.fullmatch(rf"loras/it_wan22_both_{expert}_{BOTH_STEPS}_steps_\d{{5}}_\.safetensors", saved), saved
        meta = metadata(comfy, saved)
        assert meta["lora_trainer.expert"] == expert and meta["ss_steps"] == str(BOTH_STEPS)
        assert (meta["ss_min_timestep"], meta["ss_max_timestep"]) == EXPERT_RANGE[expert]
        assert meta["lora_trainer.expert_steps"] == str(experts.count(expert))


@pytest.mark.parametrize("run_name", ["alone", "both"])
def test_each_file_loads_in_core_and_the_two_stage_sample_changes(comfy, trained, run_name):
    """Every key of each expert's file is one core reads (no 'lora key not loaded'), and each expert's LoRA
    changes the two-stage sample on its own stage."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if run_name == "alone":
        high, = trained["high_alone"]["files"]
        low, = trained["low_alone"]["files"]
    else:
        high, low = sorted(trained["both"]["files"])
    with safe_open(str(comfy.base_dir / "models" / "diffusion_models" / LOW), "np") as f:
        model_keys = list(f.keys())
    tables = tuple(k for k in model_keys if k.endswith(".modulation"))  # bare parameters, no layer: no adapter
    for saved in (high, low):
        lora = load_file(str(comfy.output_dir / saved))
        expected = video._server().expected_lora_keys(model_keys, lora, skip=tables)
        assert sorted(lora) == sorted(expected + [k for k in lora if k.endswith(".alpha")]), saved
        untrained = [k for k in expected if not bool((lora[k] != 0).any())]
        assert not untrained, f"{saved}: adapters still at zero (no gradient reached them): {untrained}"
    base = trained["base_before"]
    both, log = sample(comfy, high, low, f"{run_name}_both")
    assert video.LORA_NOT_LOADED not in log, [line for line in log.splitlines() if video.LORA_NOT_LOADED in line][:5]
    assert not np.array_equal(both, base)
    only_high, _ = sample(comfy, high, None, f"{run_name}_high")
    only_low, _ = sample(comfy, None, low, f"{run_name}_low")
    assert not np.array_equal(only_high, base) and not np.array_equal(only_low, base)


def test_both_bases_are_bit_identical_after_training(trained):
    np.testing.assert_array_equal(trained["base_after"], trained["base_before"],
                                  err_msg="a base model changed: the two-stage base sample differs after training")


def test_a_mismatched_pair_and_a_clash_are_refused_naming_the_input(comfy):
    cases = [(train_graph("loras/it_wan22_bad", 2, LOW, high_noise_model=video.WAN_I2V),
              "LoRATrainer_TrainLoRA: ValueError: high_noise_model: a WAN21_I2V model, but model is a WAN21_T2V"),
             (train_graph("loras/it_wan22_bad", 2, LOW, expert="high_noise", high_noise_model=HIGH),
              "LoRATrainer_TrainLoRA: ValueError: expert: got high_noise, but high_noise_model is connected"),
             (train_graph("loras/it_wan22_bad", 2, LOW),
              "LoRATrainer_TrainLoRA: ValueError: high_noise_model: is the same model as model")]
    cases[2][0][TRAIN]["inputs"]["high_noise_model"] = ["1", 0]  # the very model output connected twice
    for graph, message in cases:
        error = comfy.execution_error(comfy.wait(comfy.queue(graph), 300))
        assert error is not None and error.startswith(message), error
    assert not list(comfy.output_dir.glob("loras/it_wan22_bad*")), "a file was written for a refused training"
