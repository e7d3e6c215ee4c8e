"""The speed benchmark's pieces: they run, they time what `train()` does, and the weight-rebuild
reference is the same LoRA as the forward-path adapters. No timing asserts (speed lives in bench/)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from comfyui_lora_trainer.bench import speed
from comfyui_lora_trainer.bench.cases import Case, EngineStep, bench_config, bench_inputs, lora_config, prepared
from comfyui_lora_trainer.bench.profile import op_table, python_calls
from comfyui_lora_trainer.bench.rebuild import weight_rebuild
from comfyui_lora_trainer.lora import inject, is_injected, to_state_dict
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.training.loop import GradientPass, train


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy CI machine, threads stalling on each other make these slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def nonzero_adapters(network, seed: int = 1) -> None:
    """Random `up` and bias differences, so LoRA and rebuild differ from the base model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name.endswith(("lora_up", "diff_b")):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def loss_and_grads(network, fns, latents, config) -> tuple[float, dict[str, torch.Tensor]]:
    loss = GradientPass(fns, list(latents.unbind(0)), config, torch.Generator().manual_seed(7)).run()
    grads = {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}
    network.zero_grad(set_to_none=True)
    return loss, grads


def loss_and_grads_without_lora(network, fns, latents, config) -> tuple[float, dict[str, torch.Tensor]]:
    """The same loss with every adapter parameter zeroed (then put back)."""
    saved = {n: p.detach().clone() for n, p in network.named_parameters()}
    with torch.no_grad():
        for n, p in network.named_parameters():
            if "lora_down" not in n:
                p.zero_()
    try:
        return loss_and_grads(network, fns, latents, config)
    finally:
        with torch.no_grad():
            for n, p in network.named_parameters():
                p.copy_(saved[n])


def test_rebuild_matches_forward_path_and_restores_the_model():
    model, context, latents = bench_inputs("default")
    config = bench_config(checkpointing=False)
    fns = tiny_fns(model, context)
    before = snapshot(model.net)
    with inject(model.net, lora_config(config), seed=0) as network:
        nonzero_adapters(network)
        injected = {p: model.net.get_submodule(p).forward for p in network.paths.values()}
        loss, grads = loss_and_grads(network, fns, latents, config)
        with weight_rebuild(model.net, network):
            assert not any(is_injected(model.net.get_submodule(p)) and network.adapters[k].algo is not None
                           for k, p in network.paths.items())
            rebuilt_loss, rebuilt_grads = loss_and_grads(network, fns, latents, config)
        assert all(model.net.get_submodule(p).forward is f for p, f in injected.items())
        base_loss, _ = loss_and_grads_without_lora(network, fns, latents, config)
    assert math.isclose(rebuilt_loss, loss, rel_tol=1e-5)
    assert not math.isclose(base_loss, loss, rel_tol=1e-4)  # the check can fail: up is not zero
    assert grads.keys() == rebuilt_grads.keys() and len(grads) > 50
    for name, grad in grads.items():
        torch.testing.assert_close(rebuilt_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(torch.equal(v, before[k]) for k, v in model.net.state_dict().items())
    assert not any("forward" in m.__dict__ for m in model.net.modules())
    assert not any(p.requires_grad for p in model.net.parameters())


def test_rebuild_restores_on_exception():
    model, _, _ = bench_inputs("default")
    with inject(model.net, lora_config(bench_config(False)), seed=0) as network:
        injected = {p: model.net.get_submodule(p).forward for p in network.paths.values()}
        with pytest.raises(KeyboardInterrupt):  # not an Exception, like ComfyUI's interrupt
            with weight_rebuild(model.net, network):
                raise KeyboardInterrupt
        assert all(model.net.get_submodule(p).forward is f for p, f in injected.items())
    with pytest.raises(ValueError, match="network: not injected"):
        with weight_rebuild(model.net, network):
            pass


def test_engine_step_is_what_train_does():
    """N benchmark steps give bit-identical losses and LoRA to train(steps=N)."""
    model, context, latents = bench_inputs("default")
    config = bench_config(checkpointing=True, steps=3)
    fns = tiny_fns(model, context)
    expected = train(model.net, fns, latents, config, checkpoint_blocks=model.net.blocks)
    with inject(model.net, lora_config(config), seed=config.seed) as network:
        step = EngineStep(network, fns, latents, config)
        losses = [step() for _ in range(config.steps)]
        lora = to_state_dict(network.weights(), torch.float32)
    assert losses == expected.losses
    assert lora.keys() == expected.lora.keys()
    assert all(torch.equal(v, expected.lora[k]) for k, v in lora.items())


@pytest.mark.parametrize("method", ["floor", "ours", "rebuild"])
def test_prepared_cases_step_and_restore(method):
    case = Case("default", method, checkpointing=True)
    with prepared(case) as (step, model):
        before = snapshot(model.net)
        losses = [step() for _ in range(2)]
    assert all(math.isfinite(x) for x in losses)
    assert all(torch.equal(v, before[k]) for k, v in model.net.state_dict().items())
    assert not any("forward" in m.__dict__ for m in model.net.modules())


def test_case_names():
    assert Case.parse("wide/ours/ckpt") == Case("wide", "ours", True)
    assert Case("default", "floor", False).name == "default/floor/plain"
    with pytest.raises(ValueError, match="case: got 'wide/ours'"):
        Case.parse("wide/ours")
    with pytest.raises(ValueError, match="method: got 'fast'"):
        Case.parse("wide/fast/plain")


def test_quick_benchmark_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert speed.main(["--quick", "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert len(result["cases"]) == 6 and result["settings"]["sizes"] == ["default"]
    for row in result["cases"].values():
        assert row["median_s"] > 0 and row["peak_increase_mib"] >= 0
    assert len(result["targets"]) == 7
    assert "| default | ours | off |" in printed and ("PASS" in printed or "MISS" in printed)


def test_profile_lists_ops_and_engine_calls():
    case = Case("default", "ours", checkpointing=False)
    assert "aten::" in op_table(case, top=5, warmup=1)
    assert "(loss)" in python_calls(case, top=20, warmup=1)  # Objective.loss
