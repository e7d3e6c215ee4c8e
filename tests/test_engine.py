"""The training engine on the bundled tiny model: it really teaches, and every option behaves."""
from __future__ import annotations

import math

import pytest
import torch

from comfyui_lora_trainer.lora import merge_lora, resolve_state_dict
from comfyui_lora_trainer.tiny.host import checked_contexts, tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny, encode_images
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.config import LOSSES, OPTIMIZERS, TrainConfig
from comfyui_lora_trainer.training.data import batch_indices, check_caption_count
from comfyui_lora_trainer.training.evaluate import heldout_loss
from comfyui_lora_trainer.training.loop import Hooks, TrainingDiverged, train
from comfyui_lora_trainer.training.optim import lr_at

FAST = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)


def pattern_latents(n: int = 4, size: int = 16) -> torch.Tensor:
    """n structured images (ramps of different colours) as tiny-model latents."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = torch.stack([torch.stack([xx, yy * (i + 1) / n, 1 - xx], -1) for i in range(n)])
    return encode_images(images)


def setup(kind: str = "eps", n: int = 4, size: int = 16):
    model = build_tiny(kind)
    contexts = encode_captions(["a ramp, lrtstyle"], model.net.config.context_dim)
    return model, contexts, tiny_fns(model, contexts), pattern_latents(n, size)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.net.state_dict().items()}


def same_state(model, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.net.state_dict().items())


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_learning_is_real(kind):
    """The held-out loss (fixed noises and levels, not the training draws) falls by at least half."""
    model, ctx, fns, latents = setup(kind)
    before, x = state(model), torch.randn(1, 4, 16, 16)
    base_out = model.denoise(x, torch.tensor([1.0]), ctx)
    heldout_before = heldout_loss(fns, latents)
    config = TrainConfig(steps=80, learning_rate=2e-3, batch_size=4, **FAST)
    result = train(model.net, fns, latents, config, checkpoint_blocks=model.net.blocks)
    assert same_state(model, before)  # the frozen model is never updated
    weights = resolve_state_dict(result.lora, model.net)
    with merge_lora(model.net, weights):
        heldout_after = heldout_loss(fns, latents)
    assert heldout_after < 0.5 * heldout_before, (heldout_before, heldout_after)
    with merge_lora(model.net, weights, strength=0.0):
        assert torch.equal(model.denoise(x, torch.tensor([1.0]), ctx), base_out)
    assert same_state(model, before)


def test_heldout_loss_is_fixed_and_checks_its_space():
    """The engine's evaluation: the same weights give the same number bit-for-bit, the global RNG is
    left alone (its noises come from its own generator), and a misspelled space is refused."""
    _, _, fns, latents = setup()
    rng = torch.get_rng_state()
    first = heldout_loss(fns, latents, "x0")
    assert torch.equal(torch.get_rng_state(), rng)
    assert heldout_loss(fns, latents, "x0") == first != heldout_loss(fns, latents, "native")
    with pytest.raises(ValueError, match="heldout_loss space: got 'pixels'; give one of native, x0"):
        heldout_loss(fns, latents, "pixels")

def test_same_seed_same_lora_different_seed_different():
    model, _, fns, latents = setup()
    runs = [train(model.net, fns, latents, TrainConfig(steps=4, seed=s, **FAST)).lora for s in (1, 1, 2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_multi_resolution_trains():
    model, _, fns, _ = setup()
    latents = [pattern_latents(2, 16), pattern_latents(3, 8)]
    result = train(model.net, fns, latents, TrainConfig(steps=30, batch_size=5, learning_rate=2e-3, **FAST))
    assert result.losses[-1] < result.losses[0]


def test_latents_split_into_several_inputs_train_like_one_batch():
    """Same-shape images stack into one forward whichever LATENT they came in: identical LoRA."""
    model, _, fns, latents = setup()
    config = TrainConfig(steps=3, batch_size=4, **FAST)
    whole = train(model.net, fns, latents, config).lora
    split = train(model.net, fns, [latents[:1], latents[1:]], config).lora
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_gradient_accumulation_counts_every_micro_batch():
    """The second micro-batch changes the update, and accumulated training still learns."""
    model, _, fns, latents = setup()
    one = train(model.net, fns, latents, TrainConfig(steps=1, optimizer="SGD", batch_size=2, **FAST))
    two = train(model.net, fns, latents, TrainConfig(steps=1, optimizer="SGD", batch_size=2, gradient_accumulation=2, **FAST))
    assert any(not torch.equal(one.lora[k], two.lora[k]) for k in one.lora)
    longer = train(model.net, fns, latents, TrainConfig(steps=20, gradient_accumulation=2, learning_rate=2e-3, **FAST))
    assert longer.losses[-1] < longer.losses[0]


@pytest.mark.parametrize("optimizer", OPTIMIZERS[:4])  # core's four; Adafactor and Prodigy: test_objective.py
@pytest.mark.parametrize("loss", LOSSES)
def test_each_optimizer_and_loss_trains(optimizer, loss):
    model, _, fns, latents = setup(n=2, size=8)
    lr = 5e-2 if optimizer == "SGD" else 2e-3
    result = train(model.net, fns, latents, TrainConfig(steps=12, batch_size=2, optimizer=optimizer,
                                                        loss_function=loss, learning_rate=lr, seed=3, **FAST))
    assert len(result.losses) == 12 and all(math.isfinite(v) for v in result.losses)
    assert sum(result.losses[-4:]) < sum(result.losses[:4])


@pytest.mark.parametrize("training_dtype,lora_dtype", [("bf16", "bf16"), ("fp32", "fp32"), ("bf16", "fp32")])
def test_dtypes(training_dtype, lora_dtype):
    model, _, fns, latents = setup(n=2, size=8)
    config = TrainConfig(steps=10, batch_size=2, learning_rate=2e-3, training_dtype=training_dtype,
                         lora_dtype=lora_dtype, gradient_checkpointing=False)
    result = train(model.net, fns, latents, config)
    want = torch.bfloat16 if lora_dtype == "bf16" else torch.float32
    assert all(t.dtype == want for k, t in result.lora.items() if not k.endswith(".alpha"))
    assert result.losses[-1] < result.losses[0]


def test_checkpointing_gives_the_same_trajectory():
    model, _, fns, latents = setup()
    runs = [train(model.net, fns, latents, TrainConfig(steps=5, batch_size=2, training_dtype="fp32",
                                                       gradient_checkpointing=on), checkpoint_blocks=model.net.blocks)
            for on in (False, True)]
    assert runs[0].losses == pytest.approx(runs[1].losses, rel=1e-5)
    assert all("forward" not in b.__dict__ for b in model.net.blocks)  # checkpoint patch undone


def test_cancel_mid_run_keeps_last_step_and_restores_model():
    model, _, fns, latents = setup()
    before, seen = state(model), []
    hooks = Hooks(on_step=lambda state: seen.append(state.step), should_cancel=lambda: len(seen) >= 3)
    result = train(model.net, fns, latents, TrainConfig(steps=10, **FAST), hooks=hooks)
    assert result.cancelled and len(result.losses) == 3 and result.total_steps == 3 and seen == [1, 2, 3]
    full3 = train(model.net, fns, latents, TrainConfig(steps=3, **FAST))
    assert all(torch.equal(result.lora[k], full3.lora[k]) for k in full3.lora)
    assert same_state(model, before)
    assert all("forward" not in m.__dict__ for m in model.net.modules())


def test_nan_guard_names_the_step_and_keeps_last_finite_state():
    model, _, fns, latents = setup()
    calls = []

    def poisoned(noisy, sigma, indices):
        calls.append(1)
        out = fns.denoise(noisy, sigma, indices)
        return out * float("nan") if len(calls) > 4 else out

    before = state(model)
    with pytest.raises(TrainingDiverged, match=r"step 5; lower learning_rate \(now 0.0005\)$") as err:
        train(model.net, fns._replace(denoise=poisoned), latents, TrainConfig(steps=10, **FAST))
    calls.clear()
    with pytest.raises(TrainingDiverged, match=r"step 5; lower learning_rate .* or set training_dtype to fp32"):
        train(model.net, fns._replace(denoise=poisoned), latents, TrainConfig(steps=10, training_dtype="bf16"))
    calls.clear()
    good = err.value.last_good
    assert len(good.losses) == 4 and all(torch.isfinite(t).all() for t in good.lora.values())
    four = train(model.net, fns, latents, TrainConfig(steps=4, **FAST))
    assert all(torch.equal(good.lora[k], four.lora[k]) for k in four.lora)
    assert same_state(model, before)


def test_exception_mid_loop_restores_model_bit_exactly():
    model, _, fns, latents = setup()
    before = state(model)

    def boom(state):
        raise KeyboardInterrupt  # not an Exception: like ComfyUI's interrupt
    with pytest.raises(KeyboardInterrupt):
        train(model.net, fns, latents, TrainConfig(steps=5, **FAST), hooks=Hooks(on_step=boom),
              checkpoint_blocks=model.net.blocks)
    assert same_state(model, before)
    assert all("forward" not in m.__dict__ for m in model.net.modules())


def test_caption_count_error():
    with pytest.raises(ValueError, match=r"positive: got 3 captions for 4 images; give 1 .* or one per image"):
        check_caption_count(3, 4)
    model, _, _, latents = setup()
    with pytest.raises(ValueError, match="got 2 captions for 4 images"):
        checked_contexts(encode_captions(["a", "b"], model.net.config.context_dim), latents)


def test_per_image_captions():
    model, _, _, latents = setup(n=2)
    ctx = encode_captions(["left ramp", "right ramp"], model.net.config.context_dim)
    result = train(model.net, tiny_fns(model, ctx), latents, TrainConfig(steps=10, batch_size=2, learning_rate=2e-3, **FAST))
    assert result.losses[-1] < result.losses[0]


def test_continue_resumes_exact_weights_and_counts_steps():
    model, _, fns, latents = setup()
    first = train(model.net, fns, latents, TrainConfig(steps=3, **FAST))
    weights = resolve_state_dict(first.lora, model.net)
    zero_lr = TrainConfig(steps=1, optimizer="SGD", learning_rate=1e-7, seed=9, **FAST)
    again = train(model.net, fns, latents, zero_lr, existing=weights, existing_steps=3)
    assert again.total_steps == 4 and again.metadata["ss_steps"] == "4"
    assert all(torch.allclose(again.lora[k], first.lora[k], atol=1e-6) for k in first.lora)


def test_lr_schedules():
    c = TrainConfig(steps=10, learning_rate=1.0, lr_schedule="cosine", warmup_steps=2)
    assert [lr_at(s, c) for s in (0, 1, 2)] == [0.5, 1.0, 1.0] and lr_at(9, c) < 0.05
    assert lr_at(6, TrainConfig(steps=10, learning_rate=1.0, lr_schedule="linear")) == pytest.approx(0.4)
    assert lr_at(9, TrainConfig(steps=10, learning_rate=0.5)) == 0.5


def test_epoch_order_sees_every_image_once_per_pass():
    batches = batch_indices(5, 2, "epoch", torch.Generator().manual_seed(0))
    seen = [i for _ in range(5) for i in next(batches)]
    assert sorted(seen) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_config_errors_name_the_input():
    with pytest.raises(ValueError, match=r"optimizer: got 'Adagrad'; choose one of AdamW"):
        TrainConfig(optimizer="Adagrad")
    with pytest.raises(ValueError, match=r"rank: got 0; give a value from 1 to 128"):
        TrainConfig(rank=0)
