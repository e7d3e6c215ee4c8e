"""Blocks that write in place into tensors autograd saved (ComfyUI's Flux and other DiTs) train
correctly: with our injection and our checkpointing, on or off, the gradients equal those of the
same blocks written out of place, and the model comes back bit-identical.

The toy blocks copy the pattern of comfy/ldm/flux/layers.py: a single-stream block that adds into
its own input after a norm used it (`x += gate * out`), and a double-stream block that does so
twice, the second time after a second norm read the first update.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comfyui_lora_trainer.lora import LoraConfig, inject, merge_lora, resolve_state_dict
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import TinyDiffusion, timestep_embedding
from comfyui_lora_trainer.tiny.schedules import make_schedule
from comfyui_lora_trainer.training.checkpointing import model_blocks, training_forward
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.evaluate import heldout_loss
from comfyui_lora_trainer.training.loop import train

DIM, CONTEXT_DIM, PATCH = 32, 16, 2


def _add(x: torch.Tensor, update: torch.Tensor, inplace: bool) -> torch.Tensor:
    if inplace:
        x += update
        return x
    return x + update


class SingleBlock(nn.Module):
    """x += gate · linear2(act(linear1(modulated norm(x)))): the norm saved x before the write."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.mod = nn.Linear(DIM, 3 * DIM)
        self.norm = nn.LayerNorm(DIM, elementwise_affine=False)
        self.linear1 = nn.Linear(DIM, 2 * DIM)
        self.linear2 = nn.Linear(2 * DIM, DIM)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.mod(F.silu(vec))[:, None].chunk(3, dim=-1)
        out = self.linear2(F.gelu(self.linear1(self.norm(x) * (1 + scale) + shift)))
        return _add(x, gate * out, self.inplace)


class DoubleBlock(nn.Module):
    """img += attn-ish update; img += mlp(norm2(img)): the second norm reads the first write."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.norm1 = nn.LayerNorm(DIM, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(DIM, elementwise_affine=False)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.txt = nn.Linear(DIM, DIM)

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(self.norm1(img)).chunk(3, dim=-1)
        keys = torch.cat([self.txt(txt), k], dim=1)
        values = torch.cat([txt, v], dim=1)
        attn = F.scaled_dot_product_attention(q, keys, values)
        img = _add(img, self.proj(attn), self.inplace)
        img = _add(img, self.mlp(self.norm2(img)), self.inplace)
        txt = _add(txt, self.txt(txt), self.inplace)
        return img, txt


class ToyDiT(nn.Module):
    """forward(x (B, C, H, W), timestep (B,), context (B, L, CONTEXT_DIM)) → like x; patch size 2."""

    def __init__(self, inplace: bool, channels: int = 4):
        super().__init__()
        self.img_in = nn.Conv2d(channels, DIM, PATCH, stride=PATCH)
        self.time_in = nn.Linear(DIM, DIM)
        self.txt_in = nn.Linear(CONTEXT_DIM, DIM)
        self.double_block = DoubleBlock(inplace)
        self.single_block = SingleBlock(inplace)
        self.final = nn.Linear(DIM, channels * PATCH * PATCH)

    @property
    def blocks(self) -> list[nn.Module]:
        """Top-level blocks in forward order, as the host hands them to checkpointing."""
        return [self.img_in, self.time_in, self.txt_in, self.double_block, self.single_block, self.final]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        img = self.img_in(x).flatten(2).transpose(1, 2)
        vec = self.time_in(timestep_embedding(timestep, DIM).to(x.dtype))
        txt = self.txt_in(context.to(x.dtype).expand(b, -1, -1))
        img, txt = self.double_block(img, txt)
        tokens = self.single_block(torch.cat([txt, img], dim=1), vec)[:, txt.shape[1]:]
        out = self.final(tokens).transpose(1, 2).reshape(b, c * PATCH * PATCH, h // PATCH, w // PATCH)
        return F.pixel_shuffle(out, PATCH)


def toy_pair() -> tuple[ToyDiT, ToyDiT]:
    """The in-place model and its out-of-place twin, same random weights, frozen."""
    torch.manual_seed(0)
    inplace = ToyDiT(inplace=True)
    twin = ToyDiT(inplace=False)
    twin.load_state_dict(inplace.state_dict())
    return inplace.requires_grad_(False), twin.requires_grad_(False)


def toy_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300.0, 700.0]), torch.randn(1, 5, CONTEXT_DIM, generator=g)


def adapter_grads(model: ToyDiT, checkpointing: bool | None, dtype: torch.dtype = torch.float32) -> dict:
    """Gradients of every adapter parameter after one forward/backward (LoRA `up` made non-zero so
    every path carries gradient). checkpointing None: plain autograd, no training_forward."""
    x, t, ctx = toy_inputs()
    with inject(model, LoraConfig(rank=4), seed=3) as network:
        with torch.no_grad():
            for p in network.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
        if checkpointing is None:
            with autocast:
                out = model(x, t, ctx)
            out.float().square().mean().backward()
        else:
            with training_forward(model, model.blocks, checkpointing):
                with autocast:
                    out = model(x, t, ctx)
                out.float().square().mean().backward()
        return {name: p.grad.clone() for name, p in network.named_parameters()}


def test_the_pattern_breaks_plain_autograd():
    """Without our forward, autograd refuses the in-place block (what Flux users hit)."""
    model, _ = toy_pair()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        adapter_grads(model, checkpointing=None)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_inplace_blocks_get_the_gradients_of_their_out_of_place_twin(checkpointing):
    model, twin = toy_pair()
    expected = adapter_grads(twin, checkpointing=None)
    got = adapter_grads(model, checkpointing)
    assert got.keys() == expected.keys() and len(got) > 20
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())


def test_checkpointing_every_block_including_ones_that_write_into_their_input():
    """All blocks checkpointed (the last one too): the single block writes into its own input,
    which the recomputation must not see overwritten."""
    model, twin = toy_pair()
    expected = adapter_grads(twin, checkpointing=None)
    x, t, ctx = toy_inputs()
    with inject(model, LoraConfig(rank=4), seed=3) as network:
        with torch.no_grad():
            for p in network.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        with training_forward(model, model.blocks + [nn.Identity()], checkpointing=True):
            model(x, t, ctx).square().mean().backward()
        got = {name: p.grad for name, p in network.named_parameters()}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_checkpointed_matches_unchecked():
    """The recomputation runs under the autocast state of the forward: same gradients either way."""
    model, _ = toy_pair()
    plain = adapter_grads(model, checkpointing=False, dtype=torch.bfloat16)
    checkpointed = adapter_grads(model, checkpointing=True, dtype=torch.bfloat16)
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name


def test_model_restored_bit_exactly():
    model, _ = toy_pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, ctx = toy_inputs()
    with torch.no_grad():
        base_out = model(x.clone(), t, ctx)
    adapter_grads(model, checkpointing=True)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x.clone(), t, ctx), base_out)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_on_an_inplace_dit_learns(checkpointing):
    """The engine's train() on the in-place toy DiT (flow schedule): the held-out loss falls, and
    checkpointing on or off trains the same LoRA."""
    model, _ = toy_pair()
    diffusion = TinyDiffusion(model, make_schedule("flow"))
    _, _, ctx = toy_inputs()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    latents = torch.stack([torch.stack([xx * s, yy, -xx, yy * s]) for s in (1.0, -1.0, 0.5, -0.5)])  # 4 ramps
    fns = tiny_fns(diffusion, ctx)
    before = heldout_loss(fns, latents)
    config = TrainConfig(steps=100, learning_rate=1e-2, batch_size=4, training_dtype="fp32",
                         lora_dtype="fp32", gradient_checkpointing=checkpointing)
    result = train(model, fns, latents, config, checkpoint_blocks=model.blocks)
    assert result.losses[-1] < result.losses[0]
    reference = train(model, fns, latents,
                      TrainConfig(**{**config.__dict__, "gradient_checkpointing": not checkpointing}),
                      checkpoint_blocks=model.blocks)
    for key, value in result.lora.items():
        torch.testing.assert_close(value, reference.lora[key], rtol=1e-5, atol=1e-6, msg=key)
    with merge_lora(model, resolve_state_dict(result.lora, model)):
        after = heldout_loss(fns, latents)
    assert after < 0.5 * before, (before, after)  # measured 1.51 → 0.65


def two_calls(model: ToyDiT, checkpointing: bool, inplace_on_second: bool | None = None) -> list[dict]:
    """Adapter gradients of two forward/backward calls inside one training_forward; optionally
    switch the blocks to in-place writes between them (a model that changes its ways mid-run)."""
    x, t, ctx = toy_inputs()
    grads = []
    with inject(model, LoraConfig(rank=4), seed=3) as network, \
            training_forward(model, model.blocks, checkpointing):
        with torch.no_grad():
            for p in network.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        for call in range(2):
            if call == 1 and inplace_on_second is not None:
                model.double_block.inplace = model.single_block.inplace = inplace_on_second
            network.zero_grad(set_to_none=True)
            model(x, t, ctx).square().mean().backward()
            grads.append({name: p.grad.clone() for name, p in network.named_parameters()})
    return grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_model_without_inplace_writes_runs_light_after_its_first_call(checkpointing):
    """The first call finds nothing to copy; the second runs without the guard and gets the same
    gradients (the out-of-place twin here, so plain autograd is the reference)."""
    _, twin = toy_pair()
    expected = adapter_grads(twin, checkpointing=None)
    for grads in two_calls(twin, checkpointing):
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_inplace_writes_that_start_after_the_first_call_fail_loudly(checkpointing):
    """Light calls never compute a wrong gradient in silence: autograd's version check (outside
    checkpointed blocks) or ours (inside them) refuses the overwritten tensor."""
    _, twin = toy_pair()
    with pytest.raises(RuntimeError, match="modified by an inplace operation|wrote in place into a tensor"):
        two_calls(twin, checkpointing, inplace_on_second=True)
    assert all("forward" not in m.__dict__ for m in twin.modules())


class WalkedSequential(nn.Sequential):
    """A container whose own forward the parent never calls: it walks the layers itself, as
    ComfyUI's UNet does with TimestepEmbedSequential."""


class WalkingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([WalkedSequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
                                     for _ in range(2)])
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for container in self.blocks:
            for layer in container:
                x = layer(x)
        return self.out(x)


def test_model_blocks_open_containers_so_checkpointing_engages():
    net = WalkingNet().requires_grad_(False)
    blocks = model_blocks(net)
    assert blocks == [net.blocks[0][0], net.blocks[0][2], net.blocks[1][0], net.blocks[1][2], net.out]
    x = torch.randn(3, 8)
    with inject(net, LoraConfig(rank=2)) as network, training_forward(net, blocks, True) as forward:
        net(x).square().sum().backward()
        checkpointed = {name: p.grad.clone() for name, p in network.named_parameters()}
        assert forward.describe().startswith("gradient checkpointing: 4 of 4 patched blocks ran checkpointed")
    with inject(net, LoraConfig(rank=2)) as network:
        net(x).square().sum().backward()
        for name, p in network.named_parameters():
            torch.testing.assert_close(checkpointed[name], p.grad, msg=name)
