"""The one field table: TrainConfig and both nodes' inputs come from it (names, defaults, ranges), the
options node merges and checks, and Train LoRA builds its config from widgets + options."""
from __future__ import annotations

from dataclasses import fields

import pytest

from comfyui_lora_trainer.nodes.options import GROUP_NODES, GROUPS, LEGACY_ORDER, OPTIONS_TYPE
from comfyui_lora_trainer.nodes.options import TrainingOptions, TrainingOptionsNode, merged
from comfyui_lora_trainer.nodes.preservation import LoRAPreservation
from comfyui_lora_trainer.nodes.text_encoder import DEFAULT_TEXT_ENCODER_LR, LoRATextEncoder
from comfyui_lora_trainer.nodes.train import TrainLoRA
from comfyui_lora_trainer.training.config import MAIN, OPTIONS, PRESERVATION, TEXT_ENCODER, TrainConfig, settings

NOT_FIELDS = {"model", "latents", "positive", "existing_lora", "options", "unconditional", "preview", "validation",
              "high_noise_model", "clip", "captions", "regularization_latents", "regularization_positive"}


def node_inputs(cls) -> dict[str, tuple]:
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def test_every_field_is_an_input_of_exactly_one_node_with_its_default_and_range():
    main, options, preservation = (node_inputs(TrainLoRA), node_inputs(TrainingOptionsNode),
                                   node_inputs(LoRAPreservation))
    text_encoder = node_inputs(LoRATextEncoder)
    assert not (set(main) & set(options)) - {"options"} and not (set(preservation) & set(options)) - {"options"}
    for f in fields(TrainConfig):
        spec = f.metadata["setting"]
        node = {MAIN: main, OPTIONS: options, PRESERVATION: preservation, TEXT_ENCODER: text_encoder}[spec.node]
        assert f.name in node, f.name
        kind, widget = node[f.name]
        default = DEFAULT_TEXT_ENCODER_LR if f.name == "text_encoder_lr" else f.default  # the node's, to train
        assert widget["default"] == default and widget["tooltip"] == spec.tooltip, f.name
        if spec.choices:
            assert kind == list(spec.choices) and f.default in spec.choices, f.name
        else:
            assert kind == {bool: "BOOLEAN", int: "INT", float: "FLOAT", str: "STRING"}[type(f.default)], f.name
        if spec.low is not None:
            assert (widget["min"], widget["max"]) == (spec.low, spec.high), f.name
            assert spec.low <= f.default <= spec.high, f.name
    for name in (*main, *options, *preservation, *text_encoder):
        assert name in NOT_FIELDS or name in settings(), f"input {name} is no TrainConfig field"
    assert main["options"][0] == OPTIONS_TYPE and options["options"][0] == OPTIONS_TYPE
    assert TrainingOptionsNode.RETURN_TYPES == LoRAPreservation.RETURN_TYPES == (OPTIONS_TYPE,)
    assert preservation["options"][0] == OPTIONS_TYPE


def test_out_of_range_values_name_the_field():
    for name, (default, spec) in settings().items():
        if spec.low is None or isinstance(default, bool):
            continue
        too_big = spec.high + (1 if isinstance(default, int) else spec.high * 0.5 + 1)
        with pytest.raises(ValueError, match=rf"^{name}: got "):
            TrainConfig(**{name: too_big})
    with pytest.raises(TypeError, match=r"steps: got 'many'; give a int"):
        TrainConfig(steps="many")


def test_main_node_keeps_spec_order_and_extras():
    names = list(TrainLoRA.INPUT_TYPES()["optional"])
    assert names[:10] == ["batch_size", "steps", "learning_rate", "rank", "optimizer", "loss_function", "seed",
                          "training_dtype", "lora_dtype", "existing_lora"]
    assert names[10:18] == ["network_alpha", "gradient_accumulation", "lr_schedule", "warmup_steps",
                            "gradient_checkpointing", "loss_space", "batch_order", "max_grad_norm"]
    assert names[-4:] == ["options", "preview", "validation", "high_noise_model"]


def test_merged_keeps_upstream_fields_left_at_default():
    assert merged(None, {}, None) == TrainingOptions({}, None)
    upstream = TrainingOptions({"max_grad_norm": 1.0}, ["uncond"])
    # a field left at its default does not undo the upstream one; the unconditional is inherited
    assert merged(upstream, {"max_grad_norm": 0.0}, None) == TrainingOptions({"max_grad_norm": 1.0}, ["uncond"])
    assert merged(upstream, {"max_grad_norm": 2.0}, ["u2"]) == TrainingOptions({"max_grad_norm": 2.0}, ["u2"])


def test_options_node_outputs_non_default_fields_and_chains():
    node = TrainingOptionsNode()
    first, = node.execute(noise_offset=0.05, loss_weighting="min_snr", min_snr_gamma=5.0)
    assert first == TrainingOptions({"noise_offset": 0.05, "loss_weighting": "min_snr"}, None)
    second, = node.execute(options=first, noise_offset=0.0, timestep_sampling="logit_normal", unconditional=["u"])
    assert second.values == {"noise_offset": 0.05, "loss_weighting": "min_snr", "timestep_sampling": "logit_normal"}
    assert second.unconditional == ["u"]
    config = TrainConfig(steps=3, **second.values)
    assert config.noise_offset == 0.05 and config.timestep_sampling == "logit_normal" and config.steps == 3


def test_options_node_errors_name_the_field():
    node = TrainingOptionsNode()
    with pytest.raises(ValueError, match="caption_dropout: got 0.1, but no unconditional CONDITIONING is connected"):
        node.execute(caption_dropout=0.1)
    assert node.execute(caption_dropout=0.1, unconditional=["u"])[0].values == {"caption_dropout": 0.1}
    with pytest.raises(ValueError, match=r"noise_offset: got 2.0; give a value from 0 to 1"):
        node.execute(noise_offset=2.0)
    with pytest.raises(ValueError, match="min_timestep: got 900, not below max_timestep 500"):
        node.execute(min_timestep=900, max_timestep=500)


def test_the_preservation_node_chains_and_carries_its_regularisation_set():
    upstream, = TrainingOptionsNode().execute(ema_decay=0.99, unconditional=[["empty", {}]])
    latents, positive = [{"samples": "latents"}], [[["a picture", {}]]]
    # INPUT_IS_LIST: every input arrives as a list
    out, = LoRAPreservation().execute(options=[upstream], regularization_latents=latents,
                                      regularization_positive=positive, prior_ratio=[0.25], prior_loss_weight=[1.0])
    assert out.values == {"ema_decay": 0.99, "prior_ratio": 0.25} and out.unconditional == [["empty", {}]]
    assert out.regularization.latents == latents and out.regularization.positive == positive
    assert out.preservation is None


@pytest.mark.parametrize(("inputs", "message"), [
    ({"dop_multiplier": [1.0], "trigger_word": ["ohwx"]}, "^clip: no text encoder connected, but dop_multiplier"),
    ({"dop_multiplier": [1.0]}, "^trigger_word: is empty, but dop_multiplier is 1.0"),
    ({"regularization_latents": [{"samples": "x"}]}, "^regularization_positive: not connected, but "
                                                     "regularization_latents is"),
])
def test_the_preservation_node_names_what_is_missing(inputs, message):
    with pytest.raises(ValueError, match=message):
        LoRAPreservation().execute(**inputs)


def test_the_option_groups_split_the_options_and_the_one_column_node_keeps_its_widgets():
    """Every option is on exactly one grouped node, with the spec of the one-column node; that node keeps
    its shipped widgets in their order (a UI workflow stores values by position), new options after."""
    options = [name for name, (_, spec) in settings().items() if spec.node == OPTIONS]
    grouped = [name for group in GROUPS for name in group.fields]
    assert sorted(grouped) == sorted(options) and len(set(grouped)) == len(grouped)
    legacy = node_inputs(TrainingOptionsNode)
    assert [name for name in legacy if name not in NOT_FIELDS][:len(LEGACY_ORDER)] == list(LEGACY_ORDER)
    assert set(legacy) - NOT_FIELDS == set(options) and TrainingOptionsNode.DEPRECATED
    for group in GROUPS:
        cls, name = GROUP_NODES[group.node_id]
        inputs = node_inputs(cls)
        assert [n for n in inputs if n not in NOT_FIELDS] == list(group.fields), group.node_id
        assert all(inputs[n] == legacy[n] for n in inputs), group.node_id  # same widgets as before
        assert ("unconditional" in inputs) == group.unconditional and inputs["options"][0] == OPTIONS_TYPE
        assert cls.RETURN_TYPES == (OPTIONS_TYPE,) and name.startswith("LoRA Options: ")
        assert len(inputs) <= 16, f"{group.node_id}: {len(inputs)} inputs; a group stays short (the browser suite checks it fits)"


def test_chained_groups_give_what_the_one_column_node_gives():
    """Noise, dropout (with the empty caption) and EMA set on three chained grouped nodes equal the same values
    on the one-column node; the config Train LoRA builds from either is the same."""
    values = {"timestep_sampling": "logit_normal", "logit_mean": -0.5, "min_timestep": 100, "caption_dropout": 0.1,
              "rank_dropout": 0.2, "ema_decay": 0.99, "ema_evaluate": False}
    legacy, = TrainingOptionsNode().execute(unconditional=["u"], **values)
    chained = None
    for group in GROUPS:
        mine = {k: v for k, v in values.items() if k in group.fields}
        if mine:
            extra = {"unconditional": ["u"]} if group.unconditional else {}
            chained, = GROUP_NODES[group.node_id][0]().execute(options=chained, **extra, **mine)
    assert chained == legacy == TrainingOptions(values, ["u"])
    assert TrainConfig(steps=5, **chained.values) == TrainConfig(steps=5, **legacy.values)
    with pytest.raises(ValueError, match="caption_dropout: got 0.1, but no unconditional CONDITIONING is connected"):
        GROUP_NODES["LoRATrainer_OptionsDropout"][0]().execute(caption_dropout=0.1)
