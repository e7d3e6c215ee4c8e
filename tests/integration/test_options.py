"""LoRA Training Options in a real ComfyUI: the node is listed with TrainConfig's option fields, Train
LoRA trains through two chained options nodes (caption dropout with an unconditional input), and an
out-of-range or inconsistent option is ComfyUI's node error naming the field. The graphs and fixtures
are those of test_nodes.py. Skips unless COMFYUI_DIR is set."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from comfyui_lora_trainer.training.config import OPTIONS, settings

_spec = importlib.util.spec_from_file_location("lora_trainer_it_nodes", Path(__file__).with_name("test_nodes.py"))
nodes_it = sys.modules.get(_spec.name) or importlib.util.module_from_spec(_spec)
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = nodes_it
    _spec.loader.exec_module(nodes_it)

dataset = nodes_it.dataset  # the fixture of test_nodes.py
OPTIONS_ID = "LoRATrainer_TrainingOptions"
OPTION_FIELDS = [name for name, (_, spec) in settings().items() if spec.node == OPTIONS]


def with_options(graph: dict, *layers: dict, unconditional: str | None = None) -> dict:
    """Chain one options node per dict of inputs ("o1" → "o2" → …) into Train LoRA's options input;
    `unconditional` (a prompt) is encoded and connected to the last node."""
    previous = None
    for i, inputs in enumerate(layers, 1):
        node = {"class_type": OPTIONS_ID, "inputs": dict(inputs)}
        if previous:
            node["inputs"]["options"] = [previous, 0]
        graph[f"o{i}"] = node
        previous = f"o{i}"
    if unconditional is not None:
        graph["u"] = {"class_type": "CLIPTextEncode", "inputs": {"text": unconditional, "clip": ["1", 1]}}
        graph[previous]["inputs"]["unconditional"] = ["u", 0]
    graph[nodes_it.TRAIN_NODE]["inputs"]["options"] = [previous, 0]
    return graph


def test_object_info_lists_the_options_node(comfy):
    info = comfy.object_info()
    node = info[OPTIONS_ID]
    assert node["display_name"] == "LoRA Training Options (LoRA Trainer)" and node["output"] == ["LORA_TRAINING_OPTIONS"]
    optional = node["input"]["optional"]
    assert list(optional) == ["options", "unconditional", *OPTION_FIELDS]
    assert optional["unconditional"][0] == "CONDITIONING" and optional["options"][0] == "LORA_TRAINING_OPTIONS"
    assert info["LoRATrainer_TrainLoRA"]["input"]["optional"]["options"][0] == "LORA_TRAINING_OPTIONS"


def test_trains_through_chained_options_nodes(comfy, dataset):
    graph = with_options(
        nodes_it.train_graph(comfy, steps=12, prefix="loras/it_options", lr_schedule="cosine_with_restarts"),
        {"timestep_sampling": "logit_normal", "loss_weighting": "min_snr", "noise_offset": 0.05,
         "lora_plus_ratio": 4.0, "lr_restarts": 2},
        {"caption_dropout": 0.5, "rank_dropout": 0.1, "ip_noise_gamma": 0.1, "weight_decay": 0.05},
        unconditional="")
    entry = comfy.run(graph, timeout=600)
    losses = entry["outputs"][nodes_it.PLOT_NODE]["loss"]
    assert len(losses) == 12 and all(np.isfinite(losses))
    saved = entry["outputs"][nodes_it.SAVE_NODE]["text"][0]
    with safe_open(str(comfy.output_dir / saved), "pt") as f:
        settings_used = json.loads(f.metadata()["lora_trainer.settings"])
    assert settings_used["noise_offset"] == 0.05 and settings_used["caption_dropout"] == 0.5
    assert settings_used["loss_weighting"] == "min_snr" and settings_used["lora_plus_ratio"] == 4.0


def test_out_of_range_option_is_refused_naming_the_field(comfy, dataset):
    graph = with_options(nodes_it.train_graph(comfy, steps=1), {"noise_offset": 5.0})
    status, body = comfy.post_prompt(graph)
    assert status == 400 and "noise_offset" in json.dumps(body["node_errors"]), body


@pytest.mark.parametrize(("inputs", "message"), [
    ({"caption_dropout": 0.3}, "caption_dropout: got 0.3, but no unconditional CONDITIONING is connected"),
    ({"flow_shift": "fixed"}, "flow_shift: got 'fixed', but this model is not a flow model"),
    ({"min_timestep": 800, "max_timestep": 200}, "min_timestep: got 800, not below max_timestep 200"),
])
def test_inconsistent_option_is_a_node_error_naming_the_field(comfy, dataset, inputs, message):
    _, error = nodes_it.run_failing(comfy, with_options(nodes_it.train_graph(comfy, steps=1), inputs))
    assert message in error, error
