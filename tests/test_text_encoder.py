"""Text-encoder LoRA on the tiny model with a tiny CLIP-shaped encoder (tiny/clip.py): the engine
trains its adapters beside the diffusion model's, names them as kohya does, restores the encoder exactly,
resumes bit-exactly, and refuses what it cannot do. The ComfyUI side (CLIP-L, CLIP-G, the loaders) is in
tests/integration/test_text_encoder.py."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from comfyui_lora_trainer.lora import inject
from comfyui_lora_trainer.lora.injection import is_injected
from comfyui_lora_trainer.lora.naming import text_encoder_prefixes
from comfyui_lora_trainer.lora.targets import TEXT_ENCODER_TARGET
from comfyui_lora_trainer.nodes.checkpoints import STATES_FOLDER, CheckpointWriter
from comfyui_lora_trainer.nodes.conditioning import CAPTION_KEY
from comfyui_lora_trainer.nodes.lora_io import LoadLoRAModel
from comfyui_lora_trainer.nodes.options import TrainingOptionsNode
from comfyui_lora_trainer.nodes.text_encoder import LoRATextEncoder, entry_texts, trained_clips
from comfyui_lora_trainer.tiny.model import build_tiny
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import Hooks, TextEncoderPart, lora_config_of, train
from comfyui_lora_trainer.training.optim import make_optimizer
from comfyui_lora_trainer.training.resume import JSON, TENSORS
from comfyui_lora_trainer.tiny.clip import TinyTextEncoder, live_fns

FAST = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False, batch_size=2,
            learning_rate=2e-3)
CONFIG = TrainConfig(steps=4, text_encoder_lr=1e-3, **FAST)
CAPTIONS = ["a red circle, lrtstyle", "blue stripes, lrtstyle", "a yellow ring, lrtstyle"]
MODULES = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def setup(encoders: int = 1):
    model = build_tiny("eps")
    dim = model.net.config.context_dim
    tes = [TinyTextEncoder(dim, seed=10 + i) for i in range(encoders)]
    captions = encode_captions(CAPTIONS, dim)
    latents = torch.randn(len(CAPTIONS), 4, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, tes, live_fns(model, captions, tes), latents, captions


def parts(tes) -> list[TextEncoderPart]:
    return [TextEncoderPart(te, prefix) for te, prefix in zip(tes, ("text_encoder.", "text_encoder_2."))]


def snapshot(module: torch.nn.Module) -> tuple[dict, dict]:
    return ({k: v.clone() for k, v in module.state_dict().items()},
            {n: p.requires_grad for n, p in module.named_parameters()})


def test_the_text_encoder_trains_and_is_named_as_kohya_names_it():
    """Every CLIP layer's six projections get an adapter and a kohya key (`lora_te_…`), trained away from
    the zero init; nothing else of the encoder trains; the metadata says the encoder's LR; the encoder
    is bit-identical afterwards (weights, requires_grad, output)."""
    model, (te,), fns, latents, captions = setup()
    before, grads = snapshot(te)
    out_before = te(captions).detach()
    result = train(model.net, fns, latents, CONFIG, text_encoders=parts([te]))
    keys = [k for k in result.lora if k.startswith("lora_te")]
    layers = {k.rsplit(".", 1)[0] if k.endswith(".alpha") else k.rsplit(".", 2)[0] for k in keys}
    assert layers == {f"lora_te_text_model_encoder_layers_{i}_{m}" for i in range(2) for m in MODULES}
    assert all(not k.startswith("lora_te") or re.search(r"\.(lora_down\.weight|lora_up\.weight|alpha)$", k)
               for k in result.lora)
    ups = [result.lora[k] for k in keys if k.endswith("lora_up.weight")]
    assert len(ups) == 12 and all(u.abs().max() > 0 for u in ups)  # every layer's gradient reached its up matrix
    assert any(k.startswith("lora_unet_") for k in result.lora)
    assert result.metadata["ss_text_encoder_lr"] == "0.001" and result.metadata["ss_network_train_unet_only"] == "False"
    after, grads_after = snapshot(te)
    assert grads_after == grads and after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(te(captions), out_before)


def test_at_step_0_the_adapted_encoder_gives_the_base_output():
    model, (te,), fns, latents, captions = setup()
    base = te(captions).detach()
    config = replace(lora_config_of(CONFIG), target=TEXT_ENCODER_TARGET)
    with inject(te, config, prefix="text_encoder.") as network:
        assert torch.equal(te(captions), base)
        assert len(network.adapters) == 12
        assert all(p.startswith("text_encoder.text_model.encoder.layers.") for p in network.weights())


def test_the_encoder_learns_at_its_own_rate_and_changes_the_training():
    """The optimizer has the encoder's groups at text_encoder_lr (LoRA+ on both); the run's losses differ from
    the diffusion-model-only run after the first step, which is the same (step 0 is the base encoder)."""
    model, (te,), fns, latents, _ = setup()
    with inject(model.net, lora_config_of(CONFIG)) as network:
        network.join(inject(te, replace(lora_config_of(CONFIG), target=TEXT_ENCODER_TARGET), prefix="text_encoder."))
        config = replace(CONFIG, lora_plus_ratio=4.0)
        optimizer = make_optimizer(network.named_parameters(), config, {id(p) for p in network.joined_parameters()})
        assert [g["lr_ratio"] for g in optimizer.param_groups] == pytest.approx([1.0, 4.0, 0.5, 2.0])
        joined = {id(p) for p in network.joined_parameters()}
        assert {id(p) for g in optimizer.param_groups[2:] for p in g["params"]} == joined
    both = train(model.net, fns, latents, replace(CONFIG, steps=3), text_encoders=parts([te]))
    # the same model and callables, the encoder frozen: the diffusion model alone
    unet_only = train(model.net, fns, latents, replace(CONFIG, steps=3, text_encoder_lr=0.0))
    assert both.losses[0] == unet_only.losses[0] and both.losses[1:] != unet_only.losses[1:]


def test_two_encoders_are_te1_and_te2():
    model, tes, fns, latents, _ = setup(encoders=2)
    result = train(model.net, fns, latents, replace(CONFIG, steps=2), text_encoders=parts(tes))
    prefixes = {k.split("text_model")[0] for k in result.lora if k.startswith("lora_te")}
    assert prefixes == {"lora_te1_", "lora_te2_"}
    assert text_encoder_prefixes(2) == {"text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}


def test_the_patterns_select_encoder_layers_too():
    """include/exclude_layers see the encoder's paths (`text_encoder.text_model…`): excluding its MLPs
    leaves the attention; a pattern that keeps none of its layers is refused naming text_encoder_lr."""
    model, (te,), fns, latents, _ = setup()
    result = train(model.net, fns, latents, replace(CONFIG, steps=1, exclude_layers=r"text_encoder\..*mlp"),
                   text_encoders=parts([te]))
    names = {k.rsplit(".", 2)[0] for k in result.lora if k.startswith("lora_te") and not k.endswith("alpha")}
    assert names == {f"lora_te_text_model_encoder_layers_{i}_{m}" for i in range(2) for m in MODULES[:4]}
    with pytest.raises(ValueError, match="text_encoder_lr"):
        train(model.net, fns, latents, replace(CONFIG, steps=1, include_layers=r"^(?!text_encoder)"),
              text_encoders=parts([te]))
    assert not any(is_injected(m) for m in te.modules())  # the refused encoder is left as it was


def test_an_error_inside_a_step_leaves_the_encoder_as_it_was():
    model, (te,), fns, latents, captions = setup()
    before, grads = snapshot(te)
    calls = iter(range(10 ** 6))

    def failing(noisy, sigma, indices):
        if next(calls) == 3:
            raise RuntimeError("out of memory (a stand-in)")
        return fns.denoise(noisy, sigma, indices)

    with pytest.raises(RuntimeError, match="stand-in"):
        train(model.net, fns._replace(denoise=failing), latents, CONFIG, text_encoders=parts([te]))
    after, grads_after = snapshot(te)
    assert grads_after == grads and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(is_injected(m) for m in te.modules())


def test_text_encoder_lr_and_the_encoders_go_together():
    model, (te,), fns, latents, _ = setup()
    with pytest.raises(ValueError, match="text_encoder_lr: got 0.001, but no text encoder"):
        train(model.net, fns, latents, CONFIG)
    with pytest.raises(ValueError, match="text_encoder_lr: got 0.0"):
        train(model.net, fns, latents, replace(CONFIG, text_encoder_lr=0.0), text_encoders=parts([te]))


def run(tmp_path, config):
    model, tes, fns, latents, _ = setup()
    writer = CheckpointWriter(tmp_path, config, list(latents.unbind(0)), 1)
    return train(model.net, fns, latents, config, hooks=Hooks(save=writer.save), resume=writer.resume(),
                 text_encoders=parts(tes)), writer


@pytest.mark.parametrize("lever", [{}, {"caption_dropout": 0.0, "ema_decay": 0.9, "rank_dropout": 0.2}],
                         ids=["plain", "ema_dropout"])
def test_half_then_resumed_half_is_bit_identical_with_the_encoder(tmp_path, lever):
    config = replace(CONFIG, steps=6, lr_schedule="cosine", **lever)
    straight, _ = run(tmp_path / "one", config)
    first, writer = run(tmp_path / "two", replace(config, save_every=3))
    (tmp_path / "two" / writer.written[1]).unlink()
    stem = writer.written[1].rsplit("/", 1)[1].removesuffix(".safetensors")
    for suffix in (TENSORS, JSON):
        (tmp_path / "two" / STATES_FOLDER / "loras/checkpoints" / f"{stem}{suffix}").unlink()
    second, _ = run(tmp_path / "two", replace(config, resume="latest"))
    assert second.losses == straight.losses and second.lora.keys() == straight.lora.keys()
    assert any(k.startswith("lora_te_") for k in second.lora)
    assert all(torch.equal(second.lora[k], straight.lora[k]) for k in straight.lora)


# --- the node and the captions' texts (no ComfyUI needed) -------------------------------------------------


def test_each_entry_is_encoded_from_its_own_text_else_the_captions_input():
    tagged = [[None, {CAPTION_KEY: "a dog, sks"}], [None, {CAPTION_KEY: "a dog, sks, grass"}], [None, {}]]
    # two images with a caption variant each: their entries' own texts; the untagged one is not a training entry
    assert entry_texts(tagged, [[0], [1]], None) == {0: "a dog, sks", 1: "a dog, sks, grass"}
    plain = [[None, {}], [None, {}]]  # CLIPTextEncode: one per image
    assert entry_texts(plain, [[0], [1]], ["one", "two"]) == {0: "one", 1: "two"}
    assert entry_texts(plain, [[0], [1]], ["both"]) == {0: "both", 1: "both"}
    with pytest.raises(ValueError, match="captions: the text encoder trains on each caption's text, but image 1"):
        entry_texts(plain, [[0], [1]], None)
    with pytest.raises(ValueError, match="captions: images share one positive but have different captions"):
        entry_texts([[None, {}]], [[0], [0]], ["one", "two"])
    with pytest.raises(ValueError, match="captions: got 3 captions for 2 images"):
        entry_texts(plain, [[0], [1]], ["a", "b", "c"])


def test_the_node_hands_over_its_clip_captions_and_learning_rate():
    spec = LoRATextEncoder.INPUT_TYPES()
    assert spec["required"]["clip"][0] == "CLIP" and spec["optional"]["text_encoder_lr"][1]["default"] == 5e-5
    options, = LoRATextEncoder().execute(clip=["the clip"], captions=["a", "b"], text_encoder_lr=[2e-5])
    assert options.values == {"text_encoder_lr": 2e-5} and options.text_encoder == ("the clip", ["a", "b"])
    chained, = TrainingOptionsNode().execute(options=options, caption_dropout=0.0)
    assert chained.text_encoder == options.text_encoder  # an options node after it keeps it
    off, = LoRATextEncoder().execute(clip=["the clip"], text_encoder_lr=[0.0])
    assert "text_encoder_lr" not in off.values  # 0: the field's default, nothing trains
    load = LoadLoRAModel.INPUT_TYPES()
    assert load["optional"]["clip"][0] == "CLIP" and LoadLoRAModel.RETURN_TYPES == ("MODEL", "CLIP")


def test_only_sd1_and_sdxl_text_encoders_train():
    assert trained_clips("SD1ClipModel", 1e-4) == ("clip_l",)
    assert trained_clips("SDXLClipModel", 1e-4) == ("clip_l", "clip_g")
    for other in ("FluxClipModel", "SD3ClipModel", "SD2ClipModel", "SDXLRefinerClipModel", "WanT5Model"):
        with pytest.raises(ValueError, match=rf"text_encoder_lr: got 0.0001, but this model's text encoder "
                                             rf"\({other}\)"):
            trained_clips(other, 1e-4)
