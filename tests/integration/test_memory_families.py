"""`python -m comfyui_lora_trainer estimate --measure` on every tiny family model of the integration suite:
Train LoRA's count of one training step on fake tensors (training/memory.py) is within 5% of the same
two steps run for real, for each family, base weight dtype and gradient-checkpointing setting.

The families are the suite's own tiny models, built by the same cached builders and fed by the same
test-only nodes: SD1.5 (make_checkpoint.py, the checkpoint's CLIP), SDXL (make_sdxl.py through
ITTinySDXLLoader, ITSDXLConditioning), SD3 (make_sd3.py, ITSD3Conditioning), Flux (make_flux.py,
ITFluxConditioning + FluxGuidance), Wan 2.1 T2V (make_wan.py, ITWanConditioning, EmptyHunyuanLatentVideo)
and Qwen-Image (make_qwen_image.py through ITTinyQwenImageLoader, a 3584-wide ITWanConditioning).
Each is trained from two bases: its weights stored in bf16 and in float8_e4m3fn (compute in fp32 on
a CPU, ComfyUI's manual-cast ops). The fp8 base comes from core's UNETLoader (weight_dtype
fp8_e4m3fn) where the family is a file (SD1.5: UNETLoader reads the checkpoint's UNet; SD3, Flux,
Wan), else, and for every bf16 base, from the test-only ITBaseAs (it_memory_nodes.py), which rebuilds
the model as UNETLoader would with that dtype. Each base trains with gradient checkpointing off and on:
four Train LoRA nodes per family (each with a Save LoRA on its LoRA, for ComfyUI's validation), the
families' graphs side by side in one workflow run by one `estimate` process (ComfyUI in-process, no
server, started once; the 24 nodes run one after another). Should that process fail, each family
reruns alone, so that a failure (its traceback in the assertion message) is pinned on its family.
Latents: 64 px, batch 2 (empty latents of core's nodes), rank 8, bf16 autocast.

One base folder serves every family: the models linked in, the test-only nodes in custom_nodes/
(the pack itself is imported through PYTHONPATH, as the command is run by users). The per-node
numbers are printed (pytest -s). Skips unless COMFYUI_DIR is set.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

HERE = Path(__file__).resolve().parent
PACK_ROOT = HERE.parents[1]
TOLERANCE = 0.05  # |estimate / measured - 1| for the step's bytes above the weights
SIZE = 64  # px → 8×8 latents
BATCH = 2
BASES = ("bf16", "fp8_e4m3fn")
CHECKPOINTING = (False, True)
TRAIN = {"batch_size": BATCH, "steps": 4, "learning_rate": 5e-4, "rank": 8, "optimizer": "AdamW",
         "loss_function": "MSE", "seed": 0, "training_dtype": "bf16", "lora_dtype": "bf16", "existing_lora": "[None]"}

SD15 = "tiny_sd15.safetensors"  # server.CHECKPOINT_NAME, also linked into diffusion_models for UNETLoader
SD3 = "tiny_sd3.safetensors"
FLUX = "tiny_flux.safetensors"
WAN = "tiny_wan21_t2v.safetensors"


def _server():
    return sys.modules["lora_trainer_it_server"]  # conftest.py loads server.py under this name


def _sibling(module: str, file: str):
    """Another test module of this folder, loaded once under `module` (for its model builders)."""
    if module not in sys.modules:
        spec = importlib.util.spec_from_file_location(module, HERE / file)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[module] = loaded
        spec.loader.exec_module(loaded)
    return sys.modules[module]


# ---- graphs ------------------------------------------------------------------------------
def _empty(class_type: str, **extra) -> dict:
    return {"class_type": class_type, "inputs": {"width": SIZE, "height": SIZE, "batch_size": BATCH, **extra}}


def _unet(name: str, weight_dtype: str = "default") -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": weight_dtype}}


# family -> (nodes: "m" the model, "lat" the latents, "pos" the conditioning; the fp8 base's node or None
# for ITBaseAs on "m")
FAMILIES = {
    "sd15": ({"m": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
              "lat": _empty("EmptyLatentImage"),
              "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["m", 1]}}},
             _unet(SD15, "fp8_e4m3fn")),
    "sdxl": ({"m": {"class_type": "ITTinySDXLLoader", "inputs": {"seed": 0}},
              "lat": _empty("EmptyLatentImage"),
              "pos": {"class_type": "ITSDXLConditioning",
                      "inputs": {"seed": 0, "pooled_seed": 0, "tokens": 77, "width": SIZE, "height": SIZE,
                                 "crop_w": 0, "crop_h": 0, "target_width": SIZE, "target_height": SIZE}}},
             None),
    "sd3": ({"m": _unet(SD3), "lat": _empty("EmptySD3LatentImage"),
             "pos": {"class_type": "ITSD3Conditioning", "inputs": {"seed": 0, "pooled_seed": 0, "tokens": 77}}},
            _unet(SD3, "fp8_e4m3fn")),
    "flux": ({"m": _unet(FLUX), "lat": _empty("EmptySD3LatentImage"),
              "c": {"class_type": "ITFluxConditioning", "inputs": {"seed": 0, "tokens": 64, "scale": 1.0}},
              "pos": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["c", 0], "guidance": 3.5}}},
             _unet(FLUX, "fp8_e4m3fn")),
    "wan21_t2v": ({"m": _unet(WAN), "lat": _empty("EmptyHunyuanLatentVideo", length=5),  # (2, 16, 2, 8, 8)
                   "pos": {"class_type": "ITWanConditioning", "inputs": {"seed": 0, "tokens": 16, "width": 4096}}},
                  _unet(WAN, "fp8_e4m3fn")),
    "qwen_image": ({"m": {"class_type": "ITTinyQwenImageLoader", "inputs": {"seed": 0}},
                    "lat": _empty("EmptySD3LatentImage"),
                    "pos": {"class_type": "ITWanConditioning", "inputs": {"seed": 0, "tokens": 16, "width": 3584}}},
                   None),
}
CASES = [(family, base, checkpointing) for family in FAMILIES for base in BASES for checkpointing in CHECKPOINTING]


def train_node(family: str, base: str, checkpointing: bool) -> str:
    return f"{family}_train_{base}_{'gc' if checkpointing else 'nogc'}"


def workflow(family: str) -> dict:
    """The family's model, latents and caption; its bf16 and fp8 bases; a Train LoRA per base and
    checkpointing setting, each with a Save LoRA on its LoRA. Node ids start with `<family>_`."""
    nodes, fp8 = FAMILIES[family]
    graph = {**nodes, "base_bf16": {"class_type": "ITBaseAs", "inputs": {"model": ["m", 0], "weight_dtype": "bf16"}},
             "base_fp8_e4m3fn": fp8 or {"class_type": "ITBaseAs",
                                        "inputs": {"model": ["m", 0], "weight_dtype": "fp8_e4m3fn"}}}
    graph = {f"{family}_{node_id}": {"class_type": node["class_type"],
                                     "inputs": {k: [f"{family}_{v[0]}", v[1]] if isinstance(v, list) else v
                                                for k, v in node["inputs"].items()}}
             for node_id, node in graph.items()}
    for base in BASES:
        for checkpointing in CHECKPOINTING:
            node = train_node(family, base, checkpointing)
            graph[node] = {"class_type": "LoRATrainer_TrainLoRA",
                           "inputs": {"model": [f"{family}_base_{base}", 0], "latents": [f"{family}_lat", 0],
                                      "positive": [f"{family}_pos", 0], **TRAIN, "gradient_checkpointing": checkpointing}}
            graph[f"{node}_save"] = {"class_type": "LoRATrainer_SaveLoRA",
                                     "inputs": {"lora": [node, 1], "prefix": f"loras/it_memory_{node}", "format": "portable"}}
    return graph


# ---- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One base folder for every family (models, test-only nodes, no pack: it comes from PYTHONPATH)."""
    server = _server()
    comfy_dir, python = server.comfyui_or_skip()
    root = tmp_path_factory.mktemp("memory_families")
    base = root / "base"
    checkpoint = server.cached_checkpoint(comfy_dir, python)
    flux, _ = server.cached_flux(comfy_dir, python)
    sd3 = _sibling("lora_trainer_it_families", "test_families.py")._cached_sd3(comfy_dir, python)
    wan = _sibling("lora_trainer_it_families_video", "test_families_video.py").cached_wan(comfy_dir, python) / WAN
    links = {f"models/checkpoints/{SD15}": checkpoint, f"models/diffusion_models/{SD15}": checkpoint,
             f"models/diffusion_models/{SD3}": sd3, f"models/diffusion_models/{FLUX}": flux,
             f"models/diffusion_models/{WAN}": wan}
    links.update({f"custom_nodes/{name}": HERE / name
                  for name in ("it_family_nodes.py", "it_flux_nodes.py", "it_video_nodes.py", "it_memory_nodes.py")})
    for sub in ("models/loras", "input", "output", "user", "temp", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for relative, target in links.items():
        (base / relative).parent.mkdir(parents=True, exist_ok=True)
        server._link(target, base / relative)
    # the pack as `comfyui_lora_trainer` on PYTHONPATH, whatever the clone's folder is called
    packages = root / "packages"
    packages.mkdir()
    server._link(PACK_ROOT, packages / "comfyui_lora_trainer")
    return {"comfy_dir": comfy_dir, "python": python, "root": root, "base": base, "pythonpath": packages}


class Estimated(NamedTuple):
    records: dict[str, dict] | None  # Train LoRA node id -> the command's JSON record
    failure: str | None  # the command's exit status and output tails when it failed


def run_estimate(setup: dict, families: list[str], name: str) -> Estimated:
    """`estimate --measure` of the families' workflows merged into one (one ComfyUI start-up)."""
    root, base = setup["root"], setup["base"]
    wf, out = root / f"{name}.json", root / f"{name}.out.json"
    wf.write_text(json.dumps({k: v for family in families for k, v in workflow(family).items()}, indent=1), "utf-8")
    cmd = [setup["python"], "-m", "comfyui_lora_trainer", "estimate", str(wf), "--measure", "--json", str(out), "--",
           "--cpu", "--base-directory", str(base), "--output-directory", str(base / "output"),
           "--input-directory", str(base / "input"), "--user-directory", str(base / "user"),
           "--temp-directory", str(base / "temp"), "--database-url", "sqlite:///:memory:", "--disable-api-nodes"]
    pythonpath = os.pathsep.join(filter(None, [str(setup["pythonpath"]), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath, COMFYUI_DIR=str(setup["comfy_dir"]), PYTHONUNBUFFERED="1")
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    (root / f"{name}.log").write_text(done.stdout + "\n---- stderr ----\n" + done.stderr, "utf-8")
    if done.returncode != 0 or not out.exists():
        return Estimated(None, f"{name}: estimate exited {done.returncode}\n---- stdout (tail) ----\n"
                               f"{done.stdout[-3000:]}\n---- stderr (tail) ----\n{done.stderr[-12000:]}")
    return Estimated({r["node"]: r for r in json.loads(out.read_text("utf-8"))}, None)


@pytest.fixture(scope="module")
def estimates(setup) -> dict[str, Estimated]:
    """Per family, its records: every family in one `estimate` process; when that fails, each family in a
    process of its own, so that each failure is the family's own (with its traceback)."""
    every = run_estimate(setup, list(FAMILIES), "all")
    runs = ({family: every for family in FAMILIES} if every.failure is None else
            {family: run_estimate(setup, [family], family) for family in FAMILIES})
    if every.failure is not None:
        print(f"\nthe run of every family failed, so each ran alone:\n{every.failure[-3000:]}")
    for family, run in runs.items():
        for base in BASES:
            for checkpointing in CHECKPOINTING:
                node = train_node(family, base, checkpointing)
                r = (run.records or {}).get(node)
                if r and r.get("measured"):
                    est, meas = r["estimate"]["step_mib"], r["measured"]["step_mib"]
                    print(f"\n{node}: step estimate {est:.3f} MiB, measured {meas:.3f} MiB, ratio {est / meas:.4f}; "
                          f"weights {r['estimate']['weights_mib']:.2f} MiB")
                else:
                    print(f"\n{node}: no record")
    return runs


# ---- tests -------------------------------------------------------------------------------
@pytest.mark.parametrize("family,base,checkpointing", CASES,
                         ids=[f"{f}-{b}-{'gc' if c else 'nogc'}" for f, b, c in CASES])
def test_estimate_is_within_5_percent_of_the_measured_step(estimates, family, base, checkpointing):
    run = estimates[family]
    assert run.failure is None, run.failure
    node = train_node(family, base, checkpointing)
    assert node in run.records, f"{family}: no record for {node}: {sorted(run.records)}"
    record = run.records[node]
    found, measured = record["estimate"], record["measured"]
    assert measured, f"{family} {node}: --measure gave no measured step: {record}"
    assert measured["step_mib"] > 0, record
    ratio = found["step_mib"] / measured["step_mib"]
    assert abs(ratio - 1) <= TOLERANCE, (
        f"{family} {node}: estimate {found['step_mib']:.3f} MiB vs measured {measured['step_mib']:.3f} MiB "
        f"(ratio {ratio:.4f}); estimate {found}, measured {measured}")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fp8_base_holds_fewer_weight_bytes_than_the_bf16_base(estimates, family):
    """The two bases really differ: the same model's weights in fp8 take fewer bytes than in bf16."""
    run = estimates[family]
    assert run.failure is None, run.failure
    for checkpointing in CHECKPOINTING:
        bf16 = run.records[train_node(family, "bf16", checkpointing)]["estimate"]["weights_mib"]
        fp8 = run.records[train_node(family, "fp8_e4m3fn", checkpointing)]["estimate"]["weights_mib"]
        assert 0 < fp8 < bf16, f"{family}: weights fp8 {fp8:.3f} MiB, bf16 {bf16:.3f} MiB"
