"""Every adapter algorithm in a real ComfyUI: core's loader agrees with our training forward, and
each algorithm trains, saves, loads in LoraLoaderModelOnly with every key and changes a sample.

Skips unless COMFYUI_DIR is set (conftest.py). The loader check (core_loader_check.py) runs in
ComfyUI's Python without a server: `comfy.lora.load_lora` + `calculate_weight` on our file against
our training-time forward, for a Linear, a 3×3 conv and a 1×1 conv. The graph helpers and fixtures
are those of test_nodes.py.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

_spec = importlib.util.spec_from_file_location("lora_trainer_it_nodes", Path(__file__).with_name("test_nodes.py"))
nodes_it = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = nodes_it
_spec.loader.exec_module(nodes_it)

ROOT = Path(__file__).resolve().parents[2]
ALGORITHMS = ("lora", "loha", "lokr", "dora")
dataset, baseline = nodes_it.dataset, nodes_it.baseline  # the fixtures of test_nodes.py


def test_core_loader_equals_our_training_forward(comfy):
    server = sys.modules["lora_trainer_it_server"]
    comfy_dir = server.comfyui_dir()
    run = subprocess.run([server.comfyui_python(comfy_dir), str(Path(__file__).with_name("core_loader_check.py")),
                          str(comfy_dir), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == len(ALGORITHMS) * 3
    for case, r in results.items():
        assert not r["not_loaded"], (case, r["not_loaded"])
        assert r["max_abs"] < 1e-4, (case, r)
        assert r["base_abs"] > 1e-2, (case, r)  # the adapter is not zero, so the check can fail


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_trains_loads_in_core_and_changes_a_sample(comfy, dataset, baseline, algorithm):
    mark = len(comfy.log())
    target = "attention+conv" if algorithm == "lokr" else "all"  # one run also tries a preset
    entry = comfy.run(nodes_it.train_graph(comfy, prefix=f"loras/it_{algorithm}", algorithm=algorithm,
                                           target=target), timeout=600)
    losses = entry["outputs"][nodes_it.PLOT_NODE]["loss"]
    assert len(losses) == nodes_it.TRAIN["steps"] and all(np.isfinite(losses))
    saved = entry["outputs"][nodes_it.SAVE_NODE]["text"][0]
    with safe_open(str(comfy.output_dir / saved), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    expected_module = "networks.lora" if algorithm == "lora" else "lycoris.kohya"
    assert meta["ss_network_module"] == expected_module, meta
    marker = {"lora": ".lora_down.weight", "loha": ".hada_w1_a", "lokr": ".lokr_w1", "dora": ".dora_scale"}[algorithm]
    assert any(k.endswith(marker) for k in keys), keys[:10]

    name = nodes_it.listed_name(saved)
    image = nodes_it.pixels(comfy, comfy.run(nodes_it.sample_graph(comfy, name, 1.0, f"with_{algorithm}")))
    log = comfy.log(mark)
    assert nodes_it.LORA_NOT_LOADED not in log, [line for line in log.splitlines() if nodes_it.LORA_NOT_LOADED in line][:5]
    assert not np.array_equal(image, baseline), f"the {algorithm} file changed nothing"

    # Continuing from the file (the node's algorithm left at its default) resumes it: same keys, steps add up.
    again = comfy.run(nodes_it.train_graph(comfy, prefix=f"loras/it_{algorithm}_more", steps=2, existing_lora=name,
                                           target=target))
    more = again["outputs"][nodes_it.SAVE_NODE]["text"][0]
    with safe_open(str(comfy.output_dir / more), framework="pt") as f:
        assert sorted(f.keys()) == sorted(keys)
    assert f"_{nodes_it.TRAIN['steps'] + 2}_steps_" in more, more
