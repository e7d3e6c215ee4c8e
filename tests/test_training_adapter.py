"""LoRA Training Adapter's node and the step-distilled bases' log line, without ComfyUI (the adapter on the
model is tests/integration/test_training_adapter.py)."""
from __future__ import annotations

import pytest

from comfyui_lora_trainer.nodes.adapter import LoRATrainingAdapter
from comfyui_lora_trainer.nodes.families import STEP_DISTILLED, distilled_note
from comfyui_lora_trainer.nodes.options import GROUP_NODES, TrainingAdapter, TrainingOptions


def test_the_node_chains_the_adapter_with_the_other_options():
    upstream, = GROUP_NODES["LoRATrainer_OptionsNoise"][0]().execute(timestep_sampling="logit_normal")
    out, = LoRATrainingAdapter().execute("turbo_adapter.safetensors", 1.0, options=upstream)
    assert out == TrainingOptions({"timestep_sampling": "logit_normal"},
                                  training_adapter=TrainingAdapter("turbo_adapter.safetensors", 1.0))
    after, = GROUP_NODES["LoRATrainer_OptionsEMA"][0]().execute(options=out, ema_decay=0.99)
    assert after.training_adapter == out.training_adapter and after.values["ema_decay"] == 0.99
    none, = LoRATrainingAdapter().execute("[None]", 1.0, options=upstream)
    assert none == upstream and none.training_adapter is None


def test_a_zero_strength_is_refused_naming_strength():
    with pytest.raises(ValueError, match=r"^strength: got 0, which applies nothing of 'a.safetensors'"):
        LoRATrainingAdapter().execute("a.safetensors", 0.0)


def test_the_log_says_what_to_expect_from_a_step_distilled_base():
    without = distilled_note("FluxSchnell", None)
    assert without.startswith("Train LoRA: Flux.1 schnell is step-distilled and trains here without a training "
                              "adapter") and "LoRA Training Adapter" in without
    assert "keeps the objective" in distilled_note("FluxSchnell", "schnell_adapter.safetensors")
    assert "if this is Turbo" in distilled_note("ZImage", None)
    assert distilled_note("SD15", None) is None and distilled_note("Flux", None) is None
    assert set(STEP_DISTILLED) == {"FluxSchnell", "ZImage"}
