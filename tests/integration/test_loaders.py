"""One file for every loader (docs/files.md#which-loaders-the-tests-run), proven by the loaders: a LoRA trained by Train LoRA on the tiny
SD1.x checkpoint and saved by Save LoRA loads in ComfyUI, in diffusers and under A1111's key rules.

Skips unless COMFYUI_DIR is set (conftest.py); the diffusers part needs `diffusers` and `peft` in
ComfyUI's Python (`pip install diffusers peft`) and skips, saying so, without them. The loader
check (loader_check.py) runs in ComfyUI's Python without a server; see its docstring. The graph
helpers and fixtures are those of test_nodes.py.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

_spec = importlib.util.spec_from_file_location("lora_trainer_it_nodes", Path(__file__).with_name("test_nodes.py"))
nodes_it = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = nodes_it
_spec.loader.exec_module(nodes_it)

ROOT = Path(__file__).resolve().parents[2]
dataset, baseline = nodes_it.dataset, nodes_it.baseline  # the fixtures of test_nodes.py


def has_diffusers(python: str) -> bool:
    return subprocess.run([python, "-c", "import diffusers, peft"], capture_output=True).returncode == 0


def comfyui() -> tuple[Path, str]:
    """(ComfyUI folder, its Python), as the conftest's server module finds them."""
    return sys.modules["lora_trainer_it_server"].comfyui_or_skip()


def check(comfy, lora: Path) -> dict:
    comfy_dir, python = comfyui()
    if not has_diffusers(python):
        pytest.skip(f"diffusers and peft are not installed in ComfyUI's Python ({python}); "
                    "`pip install diffusers peft` there to run the diffusers loader test")
    checkpoint = comfy.base_dir / "models" / "checkpoints" / comfy.checkpoint
    done = subprocess.run([python, str(Path(__file__).with_name("loader_check.py")), str(comfy_dir), str(ROOT),
                           str(checkpoint.resolve()), str(lora)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_and_save(comfy, prefix: str, **inputs) -> Path:
    entry = comfy.run(nodes_it.train_graph(comfy, prefix=prefix, **inputs), timeout=600)
    return comfy.output_dir / entry["outputs"][nodes_it.SAVE_NODE]["text"][0]


@pytest.fixture(scope="module")
def portable_file(comfy, dataset) -> Path:
    """Train LoRA at its defaults, saved by Save LoRA at its default format (portable)."""
    return train_and_save(comfy, "loras/it_portable")


def test_a_portable_file_loads_in_comfyui_diffusers_and_a1111_alike(comfy, portable_file):
    with safe_open(str(portable_file), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["lora_trainer.format"] == "portable" and meta["lora_trainer.naming"] == "kohya-diffusers"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_steps"] == str(nodes_it.TRAIN["steps"])
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in keys), keys[:5]
    assert not any(k.startswith("lora_unet_input_blocks_") for k in keys), "kohya names SD1.x the diffusers way"
    assert not any(k.endswith((".diff", ".diff_b")) for k in keys)

    r = check(comfy, portable_file)
    assert r["comfy"]["not_loaded"] == [] and r["comfy"]["effect"] > 1e-3, r["comfy"]
    d = r["diffusers"]
    assert d["convert_missing"] == [] and d["convert_unexpected"] == [], d
    assert d["base_vs_comfy"] < 1e-4, d  # the same base model in both
    assert d["log"] == [], d["log"]  # nothing refused, nothing dropped with a warning
    assert d["adapted_layers"] == r["layers"], (d["adapted_layers"], r["layers"])  # every layer got its adapter
    assert d["lora_vs_comfy"] < 1e-4 * max(1.0, r["comfy"]["effect"]), d
    a = r["a1111"]
    assert a["loads"] and a["unmatched"] == [] and a["unclaimed"] == {} and a["unread"] == {} and a["errors"] == {}, a
    assert a["claimed"] == r["layers"]


def test_a_full_file_keeps_the_differences_that_only_comfyui_reads(comfy, dataset):
    """With norm and bias differences trained, `full` keeps them; portable leaves them out with a warning."""
    mark = len(comfy.log())
    graph = nodes_it.train_graph(comfy, prefix="loras/it_full", train_norms=True, train_biases=True)
    graph[nodes_it.SAVE_NODE]["inputs"]["format"] = "full"
    graph["p"] = {"class_type": "LoRATrainer_SaveLoRA",
                  "inputs": {**graph[nodes_it.SAVE_NODE]["inputs"], "prefix": "loras/it_full_portable",
                             "format": "portable"}}
    entry = comfy.run(graph, timeout=600)
    full = load_file(comfy.output_dir / entry["outputs"][nodes_it.SAVE_NODE]["text"][0])
    part = load_file(comfy.output_dir / entry["outputs"]["p"]["text"][0])
    differences = {k for k in full if k.endswith((".diff", ".diff_b"))}
    assert differences and set(part) == set(full) - differences
    assert f"format portable leaves out {len(differences)} weight/bias differences" in comfy.log(mark)


def test_files_in_comfyuis_module_naming_still_continue(comfy, portable_file):
    """A file as this pack wrote it before kohya's naming (lora_unet_ + ComfyUI's module path) continues."""
    sd = load_file(portable_file)
    comfy_dir, python = comfyui()
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from comfy.cli_args import args; args.cpu = True\n"
            "import comfy.utils\n"
            "from make_checkpoint import UNET_CONFIG\n"
            "m = comfy.utils.unet_to_diffusers(UNET_CONFIG)\n"
            "print(json.dumps({'lora_unet_' + k[:-7].replace('.', '_'): 'lora_unet_' + v[:-7].replace('.', '_')"
            " for k, v in m.items() if k.endswith('.weight')}))")
    done = subprocess.run([python, "-c", code, str(comfy_dir)], capture_output=True, text=True,
                          cwd=Path(__file__).parent, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    to_module_names = json.loads(done.stdout.strip().splitlines()[-1])
    old = {}
    for key, tensor in sd.items():
        name, suffix = key.split(".", 1)
        old[f"{to_module_names[name]}.{suffix}"] = tensor
    assert set(old) != set(sd)
    name = f"it_old_naming_{nodes_it.TRAIN['steps']}_steps_00001_.safetensors"
    save_file(old, str(comfy.loras_dir / name))
    mark = len(comfy.log())
    entry = comfy.run(nodes_it.train_graph(comfy, prefix="loras/it_old_more", steps=2, existing_lora=name))
    more = load_file(comfy.output_dir / entry["outputs"][nodes_it.SAVE_NODE]["text"][0])
    assert set(more) == set(sd)  # continued, and written in kohya's naming
    assert nodes_it.LORA_NOT_LOADED not in comfy.log(mark)
    ups = [k for k in sd if k.endswith("lora_up.weight")]
    moved = max(float((more[k].float() - sd[k].float()).abs().max()) for k in ups)
    size = max(float(sd[k].float().abs().max()) for k in ups)
    assert 0 < moved < 0.5 * size, (moved, size)  # trained on from the file's weights, not from zero-init ups
    assert all(torch.equal(more[k], sd[k]) for k in sd if k.endswith(".alpha"))


def flux_check(tmp_path: Path, target: str) -> dict:
    comfy_dir, python = comfyui()
    if not has_diffusers(python):
        pytest.skip(f"diffusers and peft are not installed in ComfyUI's Python ({python})")
    done = subprocess.run([python, str(Path(__file__).with_name("flux_loader_check.py")), str(comfy_dir), str(ROOT),
                           str(tmp_path / f"flux_{target}.safetensors"), target],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_flux_lora_of_the_blocks_loads_in_diffusers_and_matches_comfyui(tmp_path):
    """kohya's Flux naming (BFL module paths), target attention (the double and single blocks)."""
    r = flux_check(tmp_path, "attention")
    assert r["comfy"]["not_loaded"] == [] and r["comfy"]["effect"] > 1e-3, r["comfy"]
    d = r["diffusers"]
    assert d["convert_missing"] == [] and d["convert_unexpected"] == [] and d["base_vs_comfy"] < 1e-5, d
    assert d["log"] == [] and d["adapted_layers"] == 20, d  # qkv and linear1 split: 13 layers of ours → 20
    assert d["lora_vs_comfy"] < 1e-3 * r["comfy"]["effect"], d


def test_diffusers_drops_a_flux_loras_embedders_and_final_layer_without_a_word(tmp_path):
    """A known diffusers 0.42 limit (docs/files.md): its kohya-Flux converter leaves the 10 layers outside the
    blocks (img_in, txt_in, time/vector/guidance_in, final_layer) without the `transformer.` prefix,
    so `load_lora_into_transformer` skips them silently. ComfyUI loads them. If this test fails,
    diffusers has changed: update docs/files.md."""
    r = flux_check(tmp_path, "all")
    assert r["comfy"]["not_loaded"] == [] and r["layers"] - r["block_layers"] == 10, r
    d = r["diffusers"]
    assert d["log"] == [] and d["adapted_layers"] == 20, d  # only the blocks' layers
    assert d["lora_vs_comfy"] > 0.1 * r["comfy"]["effect"], d
