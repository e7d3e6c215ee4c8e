"""Training that keeps the base's knowledge, on the tiny model: the EMA of the adapters,
differential output and blank-prompt preservation, the regularisation set, and the optimizers users
ask for. Bit-exact resume with each is in tests/test_resume.py."""
from __future__ import annotations

import builtins
import math
from dataclasses import replace

import pytest
import torch

from comfyui_lora_trainer.lora import inject, merge_lora, resolve_state_dict
from comfyui_lora_trainer.nodes.preservation import class_caption, class_captions
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny
from comfyui_lora_trainer.tiny.pretrained import load_pretrained
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.ema import ema_decay_at
from comfyui_lora_trainer.training.loop import Hooks, lora_config_of, train
from comfyui_lora_trainer.training.optim import make_optimizer

FAST = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False, batch_size=2, learning_rate=2e-3)
CAPTIONS = ["a red circle, lrtstyle", "blue stripes, lrtstyle", "a yellow ring, lrtstyle"]


def setup(kind: str = "eps", pretrained: bool = False, regular: int = 0):
    model = load_pretrained() if pretrained else build_tiny(kind)
    dim = model.net.config.context_dim
    contexts = encode_captions(CAPTIONS + ["a green square"] * regular, dim)
    preserve = encode_captions([class_caption(c, "lrtstyle", "") for c in CAPTIONS] + ["a green square"] * regular, dim)
    fns = tiny_fns(model, contexts, encode_captions([""], dim), preserve)
    latents = torch.randn(len(CAPTIONS), 4, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, fns, latents


# --- EMA ------------------------------------------------------------------------------------------------


def test_ema_decay_warms_up_and_counts_skipped_steps():
    config = TrainConfig(ema_decay=0.999)
    assert ema_decay_at(1, config) == pytest.approx(2 / 11) and ema_decay_at(10 ** 6, config) == 0.999
    assert ema_decay_at(5, replace(config, ema_warmup=False)) == 0.999
    assert ema_decay_at(4, replace(config, ema_warmup=False, ema_every=4)) == pytest.approx(0.999 ** 4)


@pytest.mark.parametrize("on_cpu", [False, True])
def test_the_saved_lora_is_the_moving_average_of_the_trained_weights(on_cpu):
    """The average recomputed by hand from each step's weights is the file's; the live adapters keep the
    trained weights (the raw file differs), and the metadata says which the file holds."""
    config = TrainConfig(steps=6, ema_decay=0.8, ema_every=2, ema_on_cpu=on_cpu, **FAST)
    model, fns, latents = setup()
    history = []
    hooks = Hooks(on_step=lambda s: history.append({p: {k: t.clone() for k, t in w.tensors.items()}
                                                   for p, w in s.lora.items()}))
    ema = train(model.net, fns, latents, config, hooks=hooks)
    raw = train(model.net, fns, latents, replace(config, ema_save=False))
    assert ema.metadata["lora_trainer.weights"] == "ema" and raw.metadata["lora_trainer.weights"] == "trained"
    assert ema.losses == raw.losses  # the average never feeds back into training
    # the average by hand: the start (the initial weights, step 0) then every second step
    with inject(model.net, lora_config_of(config), seed=config.seed) as network:
        start = {p: {k: t.clone() for k, t in w.tensors.items()} for p, w in network.weights().items()}
    average = start
    for step in range(2, 7, 2):
        d = ema_decay_at(step, config)
        average = {p: {k: d * average[p][k] + (1 - d) * history[step - 1][p][k] for k in average[p]} for p in average}
    manual = resolve_state_dict(ema.lora, model.net)
    differs = 0
    for path, weights in manual.items():
        for suffix, tensor in weights.tensors.items():
            if suffix == "alpha":
                continue
            torch.testing.assert_close(tensor, average[path][suffix], rtol=1e-5, atol=1e-7)
            differs += not torch.equal(tensor, history[-1][path][suffix])
    assert differs  # the file is not the last step's weights


def test_previews_and_validation_see_the_average_and_training_resumes_exactly():
    """`state.shown()` (what previews enter) holds the average and puts the trained weights back bit-exactly."""
    config = TrainConfig(steps=4, ema_decay=0.9, **FAST)
    model, fns, latents = setup()
    seen = []

    def on_step(state):
        def trained():
            return {(p, k): t.clone() for p, w in state.lora.items() for k, t in w.tensors.items() if k != "alpha"}

        before = trained()
        with state.shown():
            inside = trained()
        after = trained()
        seen.append(all(torch.equal(after[key], before[key]) for key in before))  # put back bit-exactly
        seen.append(any(not torch.equal(inside[key], before[key]) for key in before))
        # what previews see is the average, tensor for tensor
        averages = sorted(float(t.double().sum()) for t in state.ema.values())
        seen.append(sorted(float(t.double().sum()) for t in inside.values()) == averages)

    train(model.net, fns, latents, config, hooks=Hooks(on_step=on_step))
    assert seen and all(seen)


def test_the_validation_loss_is_the_averages_when_asked():
    """Same training either way; the validation loss measures the average (ema_evaluate) or the trained weights."""
    from comfyui_lora_trainer.training.validation import Validation

    results = {}
    for evaluate in (True, False):
        model, fns, latents = setup()
        config = TrainConfig(steps=4, ema_decay=0.9, ema_evaluate=evaluate, **FAST)
        held_out = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(9))
        results[evaluate] = train(model.net, fns, latents, config, validator=Validation(fns, held_out, config, 2, 2))
    assert results[True].losses == results[False].losses
    assert results[True].validation[0] == results[False].validation[0]  # step 0: the average is the start
    assert results[True].validation[1:] != results[False].validation[1:]


# --- preservation -----------------------------------------------------------------------------------------


def test_preservation_adds_nothing_at_the_first_step_and_trains_the_adapters():
    """At step 0 the LoRA is the base (zero up matrices): both preservation losses are exactly 0, so the first
    loss equals plain training's; later the runs differ."""
    plain_model, fns, latents = setup()
    config = TrainConfig(steps=5, **FAST)
    plain = train(plain_model.net, fns, latents, config)
    kept = train(plain_model.net, fns, latents, replace(config, dop_multiplier=1.0, trigger_word="lrtstyle",
                                                        blank_prompt_multiplier=1.0))
    assert kept.losses[0] == plain.losses[0] and kept.losses[1:] != plain.losses[1:]


def test_a_bypassed_network_computes_exactly_as_the_base():
    model, fns, latents = setup()
    x, sigma = latents[:2], torch.tensor([1.0, 2.0])
    context = encode_captions(CAPTIONS[:2], model.net.config.context_dim)
    with torch.no_grad():
        base = model.denoise(x, sigma, context)
        with inject(model.net, lora_config_of(TrainConfig()), seed=0) as network:
            for p in network.parameters():
                p.add_(0.1)  # every up matrix away from zero
            lora = model.denoise(x, sigma, context)
            with network.bypassed():
                off = model.denoise(x, sigma, context)
    assert not torch.equal(lora, base) and torch.equal(off, base)


def damage(model, lora, captions) -> float:
    """How far the LoRA moves the model's predictions on `captions` (no trigger): mean squared change of x0."""
    dim = model.net.config.context_dim
    context = encode_captions(captions, dim)
    noisy = torch.randn(len(captions), 4, 16, 16, generator=torch.Generator().manual_seed(7)) * 2.0
    sigma = torch.full((len(captions),), 2.0)
    with torch.no_grad():
        base = model.denoise(noisy, sigma, context)
        with merge_lora(model.net, resolve_state_dict(lora, model.net)):
            changed = model.denoise(noisy, sigma, context)
    return float((changed - base).square().mean())


def test_differential_output_preservation_lowers_the_change_on_class_captions():
    """The point of DOP: on the class captions (the trigger removed), the LoRA moves the base's prediction
    much less than without it."""
    model, fns, latents = setup(pretrained=True)
    config = TrainConfig(steps=40, **FAST)
    plain = train(model.net, fns, latents, config)
    kept = train(model.net, fns, latents, replace(config, dop_multiplier=2.0, trigger_word="lrtstyle"))
    classes = [class_caption(c, "lrtstyle", "") for c in CAPTIONS]
    assert damage(model, kept.lora, classes) < 0.5 * damage(model, plain.lora, classes)


def test_preservation_without_its_captions_is_refused_naming_the_field():
    model = build_tiny("eps")
    dim = model.net.config.context_dim
    latents = torch.randn(2, 4, 16, 16)
    bare = tiny_fns(model, encode_captions(["a ramp"], dim))
    with pytest.raises(ValueError, match="^dop_multiplier: got 1.0, but there are no preservation captions"):
        train(model.net, bare, latents, TrainConfig(steps=1, dop_multiplier=1.0, trigger_word="x", **FAST))
    with pytest.raises(ValueError, match="^blank_prompt_multiplier: got 1.0, but there is no empty caption"):
        train(model.net, bare, latents, TrainConfig(steps=1, blank_prompt_multiplier=1.0, **FAST))
    with pytest.raises(ValueError, match="^trigger_word: is empty"):
        TrainConfig(dop_multiplier=1.0)


def test_class_captions_replace_whole_words_and_say_when_the_trigger_is_missing():
    assert class_caption("photo of sks woman, smiling", "sks woman", "woman") == "photo of woman, smiling"
    assert class_caption("a red circle, LRTstyle", "lrtstyle", "") == "a red circle"
    assert class_caption("lrtstyle, a ring, lrtstyles", "lrtstyle", "") == "a ring, lrtstyles"
    with pytest.raises(ValueError, match="^trigger_word: 'ohwx' is in none of the 2 captions"):
        class_captions(["a cat", "a dog"], "ohwx", "cat")
    with pytest.raises(ValueError, match="^captions: none connected"):
        class_captions([], "ohwx", "cat")


# --- the regularisation set --------------------------------------------------------------------------------


def test_regularisation_images_fill_their_share_of_the_rows_with_their_weight():
    model, fns, latents = setup(regular=4)
    drawn = []

    def denoise(noisy, sigma, indices):
        drawn.extend(indices)
        return fns.denoise(noisy, sigma, indices)

    regular = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    config = TrainConfig(steps=60, prior_ratio=0.25, prior_loss_weight=0.5, **FAST)
    result = train(model.net, fns._replace(denoise=denoise), latents, config, regularization=regular)
    share = sum(1 for i in drawn if i >= 3) / len(drawn)
    assert 0.15 < share < 0.35 and set(drawn) == set(range(7))
    assert result.metadata["ss_num_reg_images"] == "4" and result.metadata["ss_prior_loss_weight"] == "0.5"
    assert result.metadata["ss_num_train_images"] == "3"
    # weight 0 on the regularisation images: the same draws, their rows count for nothing
    model2, fns2, _ = setup(regular=4)
    zero = train(model2.net, fns2, latents, replace(config, prior_loss_weight=0.0, steps=3), regularization=regular)
    assert all(math.isfinite(v) for v in zero.losses)


# --- optimizers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer, lr", [("Lion", 3e-4), ("CAME", 2e-4), ("AdamWScheduleFree", 2e-3),
                                           ("Adafactor", 2e-3), ("AdamW", 2e-3)])
def test_each_optimizer_moves_the_zero_initialised_up_matrices(optimizer, lr):
    """One step from zero: every optimizer moves `up` by the order of the learning rate (torch's relative-step
    Adafactor moved it by 1e-3 of that, which is why its loss barely fell)."""
    model = build_tiny("eps")
    config = TrainConfig(optimizer=optimizer, learning_rate=lr, **{k: v for k, v in FAST.items() if k != "learning_rate"})
    with inject(model.net, lora_config_of(config), seed=0) as network:
        named = dict(network.named_parameters())
        ups = [p for n, p in named.items() if n.endswith("lora_up")]
        optimizer_ = make_optimizer(network.named_parameters(), config)
        for p in network.parameters():
            p.grad = torch.randn_like(p)
        optimizer_.step()
        moved = max(float(p.detach().abs().max()) for p in ups)
    assert lr * 0.2 < moved < lr * 50, moved  # CAME: its first step is not bias-corrected, ~30 × lr


def test_a_missing_optional_optimizer_names_the_package_to_install(monkeypatch):
    real = builtins.__import__

    def no_pytorch_optimizer(name, *args, **kwargs):
        if name.startswith("pytorch_optimizer"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pytorch_optimizer)
    monkeypatch.delitem(__import__("sys").modules, "pytorch_optimizer", raising=False)
    with pytest.raises(ImportError, match=r"^optimizer: Lion needs the optional package pytorch_optimizer.*pip install "
                                          r"pytorch_optimizer"):
        make_optimizer([("a.lora_up", torch.nn.Parameter(torch.zeros(2)))], TrainConfig(optimizer="Lion"))


def test_schedule_free_saves_its_averaged_point_and_refuses_a_decaying_schedule():
    with pytest.raises(ValueError, match="^lr_schedule: got 'cosine', but AdamWScheduleFree"):
        TrainConfig(optimizer="AdamWScheduleFree", lr_schedule="cosine")
    with pytest.raises(ValueError, match="^step_in_backward: AdamWScheduleFree"):
        TrainConfig(optimizer="AdamWScheduleFree", step_in_backward=True)
    model, fns, latents = setup()
    config = TrainConfig(steps=4, optimizer="AdamWScheduleFree", **FAST)
    last = []
    result = train(model.net, fns, latents, config, hooks=Hooks(
        on_step=lambda s: last.__setitem__(slice(None), [{p: dict(w.tensors) for p, w in s.lora.items()}])))
    assert result.metadata["lora_trainer.weights"] == "schedule-free average"
    saved = resolve_state_dict(result.lora, model.net)
    assert any(not torch.equal(t, last[0][p][k]) for p, w in saved.items() for k, t in w.tensors.items() if k != "alpha")
