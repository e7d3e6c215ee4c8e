"""The memory estimate (training/memory.py) against the same steps run for real, and the memory levers
(step_in_backward: training/optim.py BackwardSteps)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from comfyui_lora_trainer.bench.bases import cast_layers
from comfyui_lora_trainer.lora import inject
from comfyui_lora_trainer.lora.targets import TEXT_ENCODER_TARGET
from comfyui_lora_trainer.tiny.clip import TinyTextEncoder, live_fns
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import TinyConfig, build_tiny
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import TextEncoderPart, Trainer, lora_config_of
from comfyui_lora_trainer.training.memory import LiveBytes, estimate
from comfyui_lora_trainer.training.optim import BackwardSteps

FAST = dict(training_dtype="fp32", lora_dtype="fp32")
SIZES = [(32, 32), (24, 40), (16, 16)]  # three buckets: the estimate draws the largest


def setup(base: torch.dtype | None = None, width: int = 64):
    torch.manual_seed(0)
    model = build_tiny("eps", TinyConfig(width=width, context_dim=2 * width))
    if base is not None:  # ComfyUI's layers: weights stored in `base`, cast in forward
        cast_layers(model.net, base)
    for p in model.net.parameters():
        p.requires_grad_(False)
    contexts = torch.randn(len(SIZES), 8, 2 * width, generator=torch.Generator().manual_seed(1))
    latents = [torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(i)) for i, (h, w) in enumerate(SIZES)]
    return model, tiny_fns(model, contexts), latents


def weights_of(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("base", [None, torch.bfloat16, torch.float8_e4m3fn], ids=["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("in_backward", [False, True], ids=["step", "in_backward"])
def test_the_estimate_equals_the_bytes_a_real_step_holds_within_5_percent(base, checkpointing, in_backward):
    model, fns, latents = setup(base)
    config = TrainConfig(batch_size=2, gradient_checkpointing=checkpointing, step_in_backward=in_backward, **FAST)
    blocks = list(model.net.blocks)
    before = weights_of(model.net)
    rng = torch.get_rng_state()
    guess = estimate(model.net, fns, latents, config, checkpoint_blocks=blocks)
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn from the global generator
    real = estimate(model.net, fns, latents, config, checkpoint_blocks=blocks, fake=False)
    assert real.step > 0 and abs(guess.step - real.step) <= 0.05 * real.step, (guess.describe(), real.describe())
    assert guess.weights == real.weights == sum(t.nbytes for t in before.values())
    assert guess.batch == (2, 4, 32, 32)  # the worst batch: the largest latent, batch_size times
    adapters = _adapters(model, config)
    lora = sum(p.numel() for n, p in adapters) * 4
    # AdamW: fp32 weights, two moments per weight and a step count (a 4-byte tensor) per parameter
    assert guess.adapters == lora and guess.optimizer == 2 * lora + 4 * len(adapters)
    after = weights_of(model.net)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _adapters(model, config):
    with inject(model.net, lora_config_of(config), device="cpu") as network:
        return [(n, p.detach().clone()) for n, p in network.named_parameters()]


def test_the_ema_averages_count_as_kept_state():
    model, fns, latents = setup()
    config = TrainConfig(batch_size=1, ema_decay=0.99, **FAST)
    guess = estimate(model.net, fns, latents, config, checkpoint_blocks=list(model.net.blocks))
    adapters = _adapters(model, config)
    lora = sum(p.numel() for n, p in adapters) * 4
    assert guess.optimizer == 3 * lora + 4 * len(adapters)  # AdamW's two moments and steps, and the fp32 average


def test_a_trained_text_encoder_counts_with_its_adapters_and_activations():
    """With a text encoder trained too, the estimate holds its adapters (and their optimizer state) beside the
    network's and still equals the real step within 5 %; the encoder is left as it was."""
    model, _, latents = setup()
    encoder = TinyTextEncoder(128, seed=3)
    contexts = torch.randn(len(SIZES), 8, 128, generator=torch.Generator().manual_seed(1))
    fns, parts = live_fns(model, contexts, [encoder]), [TextEncoderPart(encoder, "text_encoder.")]
    config = TrainConfig(batch_size=2, text_encoder_lr=1e-4, **FAST)
    before = weights_of(encoder)
    guess = estimate(model.net, fns, latents, config, checkpoint_blocks=list(model.net.blocks), text_encoders=parts)
    real = estimate(model.net, fns, latents, config, checkpoint_blocks=list(model.net.blocks), fake=False,
                    text_encoders=parts)
    assert abs(guess.step - real.step) <= 0.05 * real.step, (guess.describe(), real.describe())
    with inject(encoder, replace(lora_config_of(config), target=TEXT_ENCODER_TARGET), device="cpu") as network:
        encoder_lora = sum(p.numel() for p in network.parameters()) * 4
    unet_lora = sum(p.numel() for n, p in _adapters(model, config)) * 4
    assert guess.adapters == unet_lora + encoder_lora > unet_lora
    assert guess.weights == sum(t.nbytes for t in [*weights_of(model.net).values(), *before.values()])
    after = weights_of(encoder)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpointing_and_releasing_gradients_each_lower_the_estimate():
    model, fns, latents = setup(torch.bfloat16)
    blocks = list(model.net.blocks)
    plain = TrainConfig(batch_size=2, gradient_checkpointing=False, **FAST)
    runs = {name: estimate(model.net, fns, latents, config, checkpoint_blocks=blocks) for name, config in (
        ("plain", plain), ("checkpointing", replace(plain, gradient_checkpointing=True)),
        ("in_backward", replace(plain, step_in_backward=True)))}
    assert runs["checkpointing"].activations < runs["plain"].activations / 2
    assert runs["in_backward"].gradients < runs["plain"].gradients
    assert runs["in_backward"].step < runs["plain"].step


def test_live_bytes_counts_new_storages_not_views_or_earlier_tensors():
    earlier = torch.ones(1024)
    with LiveBytes() as live:
        view = earlier[:10].view(2, 5)  # a view of an earlier tensor: nothing new
        made = earlier * 2  # 4 KiB new
        alias = made.t() if made.dim() == 2 else made.view(-1)
        del view, alias
        peak_with_made = live.now
        del made
    assert peak_with_made == 4096 and live.now == 0 and live.peak == 4096


def _run(config, steps=4, lr=2e-3):
    model, fns, latents = setup(width=32)
    images = [x[0] for x in latents]
    config = replace(config, learning_rate=lr)
    with inject(model.net, lora_config_of(config), seed=config.seed) as network:
        trainer = Trainer(network, fns, images, config)
        for _ in range(steps):
            trainer.step()
        return {p: {k: t.clone() for k, t in w.tensors.items()} for p, w in trainer.state().lora.items()}, \
            list(trainer.losses), trainer


@pytest.mark.parametrize("on_cpu", [False, True], ids=["on_device", "optimizer_on_cpu"])
@pytest.mark.parametrize("optimizer", ["AdamW", "Adam", "SGD", "RMSprop", "Adafactor", "AdamW8bit", "Lion", "CAME"])
def test_stepping_in_backward_is_bit_identical_to_the_plain_step(optimizer, on_cpu):
    # batch 3 over three latent sizes: three backward passes per step, the gradients summed before the step
    config = TrainConfig(batch_size=3, steps=4, optimizer=optimizer, lora_plus_ratio=4.0,
                         gradient_checkpointing=True, **FAST)
    plain, plain_losses, _ = _run(config)
    fused, fused_losses, trainer = _run(replace(config, step_in_backward=True, optimizer_on_cpu=on_cpu))
    assert isinstance(trainer.optimizer, BackwardSteps)
    assert fused_losses == plain_losses
    for path, tensors in plain.items():
        assert all(torch.equal(t, fused[path][k]) for k, t in tensors.items()), path
    assert any(not torch.equal(t, t * 0) for tensors in plain.values() for t in tensors.values())


def test_a_state_saved_stepping_in_backward_resumes_bit_identically():
    config = TrainConfig(batch_size=2, steps=6, step_in_backward=True, **FAST)
    straight, losses, _ = _run(config, steps=6)
    model, fns, latents = setup(width=32)
    images = [x[0] for x in latents]
    config = replace(config, learning_rate=2e-3)
    import copy
    with inject(model.net, lora_config_of(config), seed=config.seed) as network:
        first = Trainer(network, fns, images, config)
        for _ in range(3):
            first.step()
        saved = copy.deepcopy(first.state())
    with inject(model.net, lora_config_of(config), seed=7) as network:
        resumed = Trainer(network, fns, images, config)
        resumed.load_state(saved)
        for _ in range(3):
            resumed.step()
        after = resumed.state()
    assert after.losses == losses
    for path, tensors in straight.items():
        assert all(torch.equal(t, after.lora[path].tensors[k]) for k, t in tensors.items()), path


def test_the_optimizer_in_ram_needs_step_in_backward():
    with pytest.raises(ValueError, match="^optimizer_on_cpu: .*step_in_backward"):
        TrainConfig(optimizer_on_cpu=True)


@pytest.mark.parametrize("change, named", [({"max_grad_norm": 1.0}, "max_grad_norm"),
                                           ({"gradient_accumulation": 2}, "gradient_accumulation"),
                                           ({"optimizer": "Prodigy"}, "optimizer")])
def test_stepping_in_backward_refuses_what_needs_every_gradient_first(change, named):
    with pytest.raises(ValueError, match=f"^{named}: .*step_in_backward"):
        TrainConfig(step_in_backward=True, **change)


def test_the_cheapest_fit_adds_levers_in_order_until_the_step_fits():
    from comfyui_lora_trainer.training.memory import cheapest_fit
    model, fns, latents = setup(torch.bfloat16)
    blocks = list(model.net.blocks)
    config = TrainConfig(batch_size=2, gradient_checkpointing=False, **FAST)

    def measure(c):
        return estimate(model.net, fns, latents, c, checkpoint_blocks=blocks)

    full = measure(config)
    checkpointed = measure(replace(config, gradient_checkpointing=True, step_in_backward=True, optimizer="AdamW8bit",
                                   optimizer_on_cpu=True))
    changes, fits = cheapest_fit(config, measure, checkpointed.step + 1)
    # optimizer_on_cpu saves nothing where the compute device is the CPU itself: the next lever is tried
    assert changes == ["step_in_backward on", "optimizer AdamW8bit", "optimizer_on_cpu on", "gradient_checkpointing on"]
    assert fits.step == checkpointed.step < full.step
    changes, fits = cheapest_fit(config, measure, 1024)  # nothing fits in 1 KiB
    assert fits is None and changes[-1] == "batch_size 1"


def test_the_estimate_command_prints_each_part_and_the_verdict():
    from comfyui_lora_trainer.headless.inprocess import format_estimate
    model, fns, latents = setup(torch.bfloat16)
    found = estimate(model.net, fns, latents, TrainConfig(batch_size=2, **FAST), checkpoint_blocks=list(model.net.blocks))
    text = format_estimate({"node": "5", "estimate": found.as_dict(), "free_mib": 1.0, "fits": False,
                            "cheapest": ["step_in_backward on"], "measured": found.as_dict()})
    assert text.splitlines()[0].startswith("Train LoRA (node 5): ") and "batch 2×4×32×32" in text
    for part in ("weights", "adapters", "gradients", "optimizer", "activations", "transient"):
        assert f"  {part} " in text
    assert "does NOT fit" in text and "cheapest settings that fit: step_in_backward on" in text
    assert "(estimate/measured 1.000)" in text
