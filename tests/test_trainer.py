"""The public loop unit: Trainer.step()/state()/load_state(), hooks, and the per-caption grouping."""
from __future__ import annotations

import pytest
import torch

from comfyui_lora_trainer.lora import inject
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.lora.patching import restoring, swapped_items
from comfyui_lora_trainer.training.captions import grouped_denoise, guider_predict, predict_by_key
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import Hooks, Trainer, lora_config_of, train

FAST = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)


def setup(kind: str = "eps", n: int = 4):
    model = build_tiny(kind)
    contexts = encode_captions(["a ramp, lrtstyle"], model.net.config.context_dim)
    latents = torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    return model, tiny_fns(model, contexts), latents


def clone_state(state):
    """A checkpoint: the state's tensors copied (the live ones keep changing)."""
    import copy
    return copy.deepcopy(state)


@pytest.mark.parametrize("order", ["random", "epoch"])
def test_resume_from_state_is_bit_exact(order):
    model, fns, latents = setup()
    config = TrainConfig(steps=6, batch_size=3, batch_order=order, learning_rate=2e-3, **FAST)
    images = list(latents.unbind(0))
    with inject(model.net, lora_config_of(config), seed=config.seed) as network:
        trainer = Trainer(network, fns, images, config)
        for _ in range(3):
            trainer.step()
        checkpoint = clone_state(trainer.state())
        for _ in range(3):
            trainer.step()
        straight = clone_state(trainer.state())
    with inject(model.net, lora_config_of(config), seed=99) as network:  # other init: the state must win
        resumed = Trainer(network, fns, images, config)
        resumed.load_state(checkpoint)
        for _ in range(3):
            resumed.step()
        after = resumed.state()
    assert after.losses == straight.losses and after.step == 6 and after.total_steps == 6
    for path, weights in straight.lora.items():
        assert all(torch.equal(t, after.lora[path].tensors[k]) for k, t in weights.tensors.items())


def test_hooks_receive_the_state_and_train_equals_trainer_steps():
    model, fns, latents = setup()
    config = TrainConfig(steps=3, lr_schedule="linear", **FAST)
    seen = []
    result = train(model.net, fns, latents, config, hooks=Hooks(on_step=lambda s: seen.append(
        (s.step, s.total_steps, s.loss, s.lr, len(s.lora), "state" in s.optimizer, "generator" in s.rng))),
        existing_steps=10)
    assert [s[0] for s in seen] == [1, 2, 3] and [s[1] for s in seen] == [11, 12, 13]
    assert [s[2] for s in seen] == result.losses
    assert [s[3] for s in seen] == pytest.approx([5e-4, 5e-4 * 2 / 3, 5e-4 / 3])
    assert all(s[4] > 0 and s[5] and s[6] for s in seen)
    with inject(model.net, lora_config_of(config), seed=config.seed) as network:
        trainer = Trainer(network, fns, list(latents.unbind(0)), config)
        assert [trainer.step() for _ in range(3)] == result.losses


def test_clipping_off_leaves_gradients_unscaled(monkeypatch):
    """max_grad_norm 0: the step never calls clip_grad_norm_ (the bench's old copy always did)."""
    model, fns, latents = setup()
    calls = []
    original = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1) or original(*a, **k))
    train(model.net, fns, latents, TrainConfig(steps=2, **FAST))
    assert calls == []
    train(model.net, fns, latents, TrainConfig(steps=2, max_grad_norm=1.0, **FAST))
    assert calls == [1, 1]


def test_predict_by_key_calls_once_per_caption_and_keeps_row_order():
    calls = []

    def predict(noisy, sigma, key):
        calls.append((key, noisy.shape[0]))
        return noisy * 0 + key

    noisy, sigma = torch.zeros(5, 1, 2, 2), torch.ones(5)
    out = predict_by_key(predict, noisy, sigma, [2, 1, 2, 3, 1])
    assert calls == [(2, 2), (1, 2), (3, 1)]
    assert out[:, 0, 0, 0].tolist() == [2, 1, 2, 3, 1]
    denoise = grouped_denoise(predict, {0: 7, 1: 8})
    assert denoise(noisy[:2], sigma[:2], [1, 1])[:, 0, 0, 0].tolist() == [8, 8]


class FakeGuider:
    """What guider_predict needs of ComfyUI's guider: a `conds` dict and a call."""

    def __init__(self):
        self.conds = {"positive": ["all"], "negative": ["n"]}
        self.seen = []

    def __call__(self, x, sigma, **extra):
        self.seen.append((list(self.conds["positive"]), extra))
        if extra.get("fail"):
            raise RuntimeError("boom")
        return x + len(self.conds["positive"])


def test_guider_predict_sets_one_caption_per_call_and_restores_the_guider():
    guider = FakeGuider()
    entries = ["a", "b", "c"]
    denoise = grouped_denoise(guider_predict(guider, entries, {"k": 1}), [(0,), (1, 2), (0,)])
    out = denoise(torch.zeros(3, 1, 1, 1), torch.ones(3), [0, 1, 2])
    assert [s[0] for s in guider.seen] == [["a"], ["b", "c"]] and guider.seen[0][1] == {"k": 1}
    assert out.flatten().tolist() == [1, 2, 1]
    assert guider.conds == {"positive": ["all"], "negative": ["n"]}
    failing = guider_predict(guider, entries, {"fail": True})
    with pytest.raises(RuntimeError, match="boom"):
        failing(torch.zeros(1, 1, 1, 1), torch.ones(1), (2,))
    assert guider.conds["positive"] == ["all"]
    mapping = {"kept": 1}
    with swapped_items(mapping, {"positive": [1], "kept": 2}):
        assert mapping == {"positive": [1], "kept": 2}
    assert mapping == {"kept": 1}  # an absent key is taken away again, a present one restored
    with pytest.raises(KeyError), restoring(mapping, ["new", "kept"]):
        mapping.update(new=3, kept=4)
        raise KeyError("boom")
    assert mapping == {"kept": 1}
