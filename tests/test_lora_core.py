"""The LoRA core: adapters, injection/removal, formats, merging."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from comfyui_lora_trainer.lora import (
    LoraConfig, inject, load_lora_file, merge_lora, parse_steps, resolve_state_dict, save_lora_file,
    to_state_dict,
)


class Toy(nn.Module):
    """Every layer kind the adapters must serve, at tiny sizes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.strided = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, padding_mode="reflect")
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.conv3d = nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1))
        self.ln = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.grouped(self.norm(self.conv_in(x)))
        h = self.strided(h)
        b, c, hh, ww = h.shape
        h = self.conv1d(h.flatten(2)).view(b, c, hh, ww)
        h = self.conv3d(h.unsqueeze(2)).squeeze(2)
        h = self.ln(h.permute(0, 2, 3, 1))
        return self.out(torch.tanh(self.proj(h)))


def randomize(net, seed: int = 1) -> None:
    """Non-zero up and diffs, so the checks below can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


@pytest.fixture
def toy():
    return Toy()


@pytest.fixture
def x():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))


def test_fresh_adapter_leaves_output_unchanged(toy, x):
    base = toy(x)
    with inject(toy, LoraConfig(rank=4, train_norms=True, train_biases=True)) as net:
        assert torch.equal(toy(x), base)
        assert len(net.adapters) == 9  # every layer with a weight or a bias


def test_layer_kinds(toy):
    with inject(toy, LoraConfig(rank=4, train_norms=True, train_biases=True)) as net:
        kinds = {net.paths[k]: (a.algo is not None, a.diffs is not None) for k, a in net.adapters.items()}
        w = net.weights()
    assert kinds["conv_in"] == (True, True) and kinds["proj"] == (True, True)
    assert kinds["out"] == (True, False)  # no bias
    assert kinds["grouped"] == (False, True) and w["grouped"].diff.shape == toy.grouped.weight.shape
    assert kinds["norm"] == (False, True) and w["norm"].diff.shape == (8,)
    assert w["conv_in"].down.shape == (4, 4, 3, 3) and w["conv_in"].up.shape == (8, 4, 1, 1)
    assert w["conv3d"].down.shape == (4, 8, 1, 3, 3) and w["conv1d"].up.shape == (8, 4, 1)


def test_alpha_defaults_to_rank_and_is_stored(toy):
    with inject(toy, LoraConfig(rank=4)) as net:
        assert all(a.algo.scale == 1.0 for a in net.adapters.values() if a.algo)
    with inject(toy, LoraConfig(rank=4, alpha=2)) as net:
        sd = to_state_dict(net.weights(), torch.float32)
    assert sd["lora_unet_proj.alpha"].item() == 2.0 and sd["lora_unet_proj.alpha"].dtype == torch.float32


def test_only_adapter_parameters_get_gradients(toy, x):
    flags = {n: p.requires_grad for n, p in toy.named_parameters()}
    with inject(toy, LoraConfig(rank=4)) as net:
        randomize(net)
        toy(x).square().mean().backward()
        assert all(p.grad is None for p in toy.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert {n: p.requires_grad for n, p in toy.named_parameters()} == flags


def test_removal_after_exception_is_bit_exact(toy, x):
    before, base = snapshot(toy), toy(x)
    with pytest.raises(RuntimeError, match="boom"):
        with inject(toy, LoraConfig(rank=4)) as net:
            randomize(net)
            assert not torch.equal(toy(x), base)
            raise RuntimeError("boom")
    assert_same_state(toy, before)
    assert torch.equal(toy(x), base)
    assert all("forward" not in m.__dict__ for m in toy.modules())


def test_injecting_twice_is_an_error(toy):
    with inject(toy, LoraConfig(rank=2)):
        with pytest.raises(ValueError, match="already has LoRA adapters"):
            inject(toy, LoraConfig(rank=2))
    inject(toy, LoraConfig(rank=2)).remove()  # fine again after removal


def test_name_filter(toy):
    with inject(toy, LoraConfig(rank=2, include=r"^proj$|conv_in")) as net:
        assert set(net.paths.values()) == {"proj", "conv_in"}


def test_seed_drives_init(toy):
    with inject(toy, LoraConfig(rank=2), seed=5) as a:
        wa = {k: v.down.clone() for k, v in a.weights().items() if v.down is not None}
    with inject(toy, LoraConfig(rank=2), seed=5) as b:
        assert all(torch.equal(wa[k], v.down) for k, v in b.weights().items() if v.down is not None)
    with inject(toy, LoraConfig(rank=2), seed=6) as c:
        assert not torch.equal(wa["proj"], c.weights()["proj"].down)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_bit_exact(toy, tmp_path, dtype):
    with inject(toy, LoraConfig(rank=4, alpha=3)) as net:
        randomize(net)
        sd = to_state_dict(net.weights(), dtype)
    path = save_lora_file(tmp_path / "x_10_steps_00001_.safetensors", sd, {"steps": 10, "rank": "4"})
    loaded, meta = load_lora_file(path)
    assert meta == {"steps": "10", "rank": "4"}
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    # Continuing from the file resumes the exact weights: re-exported, it is the same file content.
    with inject(toy, LoraConfig(rank=8), weights=resolve_state_dict(loaded, toy)) as again:
        assert all(torch.equal(v, sd[k]) for k, v in to_state_dict(again.weights(), dtype).items())
        assert again.adapters["lora_unet_proj"].algo.rank == 4
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_save_never_overwrites(tmp_path):
    path = save_lora_file(tmp_path / "a.safetensors", {"t": torch.zeros(1)}, {})
    with pytest.raises(FileExistsError, match="already exists"):
        save_lora_file(path, {"t": torch.ones(1)}, {})
    assert torch.equal(load_lora_file(path)[0]["t"], torch.zeros(1))


def test_failed_save_leaves_no_file(tmp_path):
    with pytest.raises(Exception):
        save_lora_file(tmp_path / "b.safetensors", {"t": "not a tensor"}, {})
    assert list(tmp_path.iterdir()) == []


def test_merged_matches_forward_path(toy, x):
    base = toy(x)
    with inject(toy, LoraConfig(rank=4, alpha=2)) as net:
        randomize(net)
        forward_path = toy(x)
        weights = resolve_state_dict(to_state_dict(net.weights(), torch.float32), toy)
    before = snapshot(toy)
    with merge_lora(toy, weights, strength=1.0):
        merged = toy(x)
    assert_same_state(toy, before)
    assert not torch.allclose(forward_path, base, atol=1e-3)
    torch.testing.assert_close(merged, forward_path, rtol=1e-4, atol=1e-5)
    with merge_lora(toy, weights, strength=0.0):
        assert torch.equal(toy(x), base)
    with merge_lora(toy, weights, strength=-1.0):
        assert not torch.allclose(toy(x), base, atol=1e-3)


def test_bf16_forward_stays_bf16(toy, x):
    toy = toy.to(torch.bfloat16)
    with inject(toy, LoraConfig(rank=4)) as net:
        randomize(net)
        assert all(p.dtype == torch.float32 for p in net.parameters())  # fp32 master weights
        assert toy(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with inject(Toy(), LoraConfig(rank=4)) as net, torch.autocast("cpu", dtype=torch.bfloat16):
        randomize(net)
        assert net.adapters["lora_unet_proj"].algo.contribution(torch.randn(2, 8), None).dtype == torch.bfloat16


def test_foreign_formats_load(toy):
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    cdown, cup = torch.randn(2, 4, 3, 3, generator=g), torch.randn(8, 2, 1, 1, generator=g)
    norm = torch.randn(8, generator=g)
    formats = {
        "kohya": {"lora_unet_proj.lora_down.weight": down, "lora_unet_proj.lora_up.weight": up,
                  "lora_unet_proj.alpha": torch.tensor(1.0),
                  "lora_unet_conv_in.lora_down.weight": cdown, "lora_unet_conv_in.lora_up.weight": cup,
                  "lora_unet_norm.diff": norm, "lora_unet_norm.diff_b": norm},
        "comfy_core": {"diffusion_model.proj.lora_down.weight": down, "diffusion_model.proj.lora_up.weight": up,
                       "diffusion_model.proj.alpha": torch.tensor(1.0),
                       "diffusion_model.conv_in.lora_down.weight": cdown, "diffusion_model.conv_in.lora_up.weight": cup,
                       "diffusion_model.norm.diff": norm, "diffusion_model.norm.diff_b": norm},
        "peft": {"base_model.model.proj.lora_A.weight": down, "base_model.model.proj.lora_B.weight": up,
                 "base_model.model.proj.alpha": torch.tensor(1.0),
                 "unet.conv_in.lora_A.weight": cdown, "unet.conv_in.lora_B.weight": cup,
                 "unet.norm.diff": norm, "unet.norm.diff_b": norm},
    }
    for name, sd in formats.items():
        w = resolve_state_dict(sd, toy)
        assert set(w) == {"proj", "conv_in", "norm"}, name
        assert torch.equal(w["proj"].down, down) and torch.equal(w["proj"].up, up) and w["proj"].alpha == 1.0
        assert torch.equal(w["conv_in"].down, cdown) and w["conv_in"].alpha is None
        assert torch.equal(w["norm"].diff, norm) and torch.equal(w["norm"].diff_b, norm)


def test_aliases_map_foreign_module_names(toy):
    sd = {"unet.down_blocks.0.proj.lora_A.weight": torch.zeros(2, 8),
          "unet.down_blocks.0.proj.lora_B.weight": torch.zeros(6, 2)}
    assert set(resolve_state_dict(sd, toy, aliases={"down_blocks.0.proj": "proj"})) == {"proj"}


def test_unknown_key_and_bad_shape_errors(toy):
    with pytest.raises(ValueError, match=r"'lora_unet_nope.lora_down.weight'.*matches no layer"):
        resolve_state_dict({"lora_unet_nope.lora_down.weight": torch.zeros(2, 8)}, toy)
    with pytest.raises(ValueError, match=r"'lora_unet_proj.something'.*not a LoRA tensor"):
        resolve_state_dict({"lora_unet_proj.something": torch.zeros(2, 8)}, toy)
    bad = {"lora_unet_proj.lora_down.weight": torch.zeros(2, 5), "lora_unet_proj.lora_up.weight": torch.zeros(6, 2)}
    with pytest.raises(ValueError, match=r"'lora_unet_proj.lora_down.weight' does not fit layer 'proj'.*\(2, 5\).*\(rank, 8\)"):
        resolve_state_dict(bad, toy)
    bad = {"lora_unet_proj.lora_down.weight": torch.zeros(2, 8), "lora_unet_proj.lora_up.weight": torch.zeros(7, 2)}
    with pytest.raises(ValueError, match=r"lora_up.weight' does not fit layer 'proj'.*\(7, 2\).*\(6, 2\)"):
        resolve_state_dict(bad, toy)
    with pytest.raises(ValueError, match=r"'lora_unet_norm.diff' does not fit layer 'norm'.*\(9,\).*\(8,\)"):
        resolve_state_dict({"lora_unet_norm.diff": torch.zeros(9)}, toy)
    with pytest.raises(ValueError, match=r"has no matching lora_up"):
        resolve_state_dict({"lora_unet_proj.lora_down.weight": torch.zeros(2, 8)}, toy)


def test_parse_steps(caplog):
    assert parse_steps("loras/my_lora_250_steps_00003_.safetensors") == 250
    assert parse_steps("some_other_name.safetensors") == 0
    assert "could not read a step count" in caplog.text


def test_the_lora_settings_defaults_are_the_nodes():
    """LoraConfig is Train LoRA's adapter fields under the lora/ layer's names: the same defaults, so
    `inject(model, LoraConfig())` trains what the node trains by default (no norm or bias differences)."""
    from comfyui_lora_trainer.training.config import TrainConfig
    from comfyui_lora_trainer.training.loop import lora_config_of

    assert lora_config_of(TrainConfig()) == LoraConfig()
    assert not LoraConfig().train_norms and not LoraConfig().train_biases
