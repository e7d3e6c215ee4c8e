"""One process of a data-parallel training on the tiny model, for tests/test_distributed.py.

    python -m torch.distributed.run --nproc-per-node N tests/distributed_worker.py OUT CONFIG_JSON

Each process joins the gloo process group torchrun describes, trains the same seeded run through
the real engine (`train()`, which sees the group), and writes its LoRA to OUT/rank<r>.safetensors
(or, when the loss turns NaN/inf, the error to OUT/rank<r>.diverged).
Rank 0 alone gets the checkpoint writer's save (output folder OUT/output), as a host gives it; every
process resumes what the config's `resume` names there. Settings are a TrainConfig's fields, plus
`nan_on_rank` and `nan_at_call` (that process's model returns NaN at that call), `cancel_on_rank` and
`cancel_after` (that process asks to cancel after that many steps; each cancelled process writes its
step count to OUT/rank<r>.cancelled).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "comfyui_lora_trainer"
if NAME not in sys.modules:  # the repository root as the package, whatever its folder is called (as conftest.py)
    spec = importlib.util.spec_from_file_location(NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    spec.loader.exec_module(module)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from comfyui_lora_trainer.nodes.checkpoints import CheckpointWriter  # noqa: E402
from comfyui_lora_trainer.tiny.clip import TinyTextEncoder, live_fns  # noqa: E402
from comfyui_lora_trainer.tiny.host import tiny_fns  # noqa: E402
from comfyui_lora_trainer.tiny.model import build_tiny  # noqa: E402
from comfyui_lora_trainer.tiny.text import encode_captions  # noqa: E402
from comfyui_lora_trainer.training.config import TrainConfig  # noqa: E402
from comfyui_lora_trainer.training.loop import Hooks, TextEncoderPart, TrainingDiverged, train  # noqa: E402

IMAGES = 6


def setup(text_encoder: bool = False):
    """The tiny model, one caption per image (so each process's share must pick the right one), 6 latents;
    with `text_encoder`, the captions go through a tiny CLIP-shaped encoder that trains too (tiny/clip.py).
    (model, callables, latents, the text encoders to train)."""
    model = build_tiny("eps")
    contexts = encode_captions([f"image {i}, lrtstyle" for i in range(IMAGES)], model.net.config.context_dim)
    latents = torch.randn(IMAGES, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    if not text_encoder:
        return model, tiny_fns(model, contexts), latents, ()
    encoder = TinyTextEncoder(model.net.config.context_dim, seed=7)
    return model, live_fns(model, contexts, [encoder]), latents, (TextEncoderPart(encoder, "text_encoder."),)


def run(out: Path, config: TrainConfig, nan_at_call: int = 0, cancel_after: int = 0) -> dict[str, torch.Tensor]:
    """This process's training; with `nan_at_call`, its model's output turns NaN at that call (of this
    process); with `cancel_after`, this process asks to cancel once that many steps are done."""
    model, fns, latents, text_encoders = setup(bool(config.text_encoder_lr))
    steps_done = []
    if nan_at_call:
        calls = iter(range(1, 10 ** 6))
        denoise = fns.denoise
        fns = fns._replace(denoise=lambda *a: denoise(*a) * (float("nan") if next(calls) == nan_at_call else 1.0))
    main = not dist.is_initialized() or dist.get_rank() == 0
    writer = CheckpointWriter(out / "output", config, list(latents.unbind(0)), IMAGES)
    hooks = Hooks(on_step=lambda state: steps_done.append(state.step), save=writer.save if main else None,
                  should_cancel=(lambda: len(steps_done) >= cancel_after) if cancel_after else None)
    result = train(model.net, fns, latents, config, hooks=hooks, resume=writer.resume(), text_encoders=text_encoders)
    if result.cancelled:
        (out / f"rank{dist.get_rank() if dist.is_initialized() else 0}.cancelled").write_text(str(len(result.losses)))
    return dict(result.lora)


def lora_effects(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a LoRA does to each layer: up @ down (flattened) per module, and every other tensor (weight
    and bias differences, alphas) as it is. Comparing these, not the factors, leaves out what no loader
    sees: a lora_down element whose gradient is near Adam's eps while lora_up is still near zero takes
    a step of any size between 0 and the learning rate, so float summation order can move it far, and
    its effect stays tiny because the up it meets is."""
    effects = {}
    for key, value in lora.items():
        if key.endswith(".lora_down.weight"):
            continue
        if key.endswith(".lora_up.weight"):
            module = key[:-len(".lora_up.weight")]
            down = lora[module + ".lora_down.weight"]
            effects[module] = value.reshape(value.shape[0], -1).double() @ down.reshape(down.shape[0], -1).double()
        else:
            effects[key] = value.double()
    return effects


def relative_errors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per layer, ‖effect_a − effect_b‖ / ‖effect_a‖ (0 where both are zero)."""
    ea, eb = lora_effects(a), lora_effects(b)
    assert ea.keys() == eb.keys()
    return {k: float((ea[k] - eb[k]).norm() / ea[k].norm()) if ea[k].norm() > 0 else float(eb[k].norm())
            for k in ea}


def main(argv: list[str]) -> None:
    out, settings = Path(argv[0]), json.loads(argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        poison = settings.pop("nan_on_rank", None), settings.pop("nan_at_call", 0)
        cancel = settings.pop("cancel_on_rank", None), settings.pop("cancel_after", 0)
        mine = lambda pair: pair[1] if pair[0] == dist.get_rank() else 0  # noqa: E731
        try:
            lora = run(out, TrainConfig(**settings), mine(poison), mine(cancel))
        except TrainingDiverged as err:  # every rank must stop at the same step: the test compares the messages
            (out / f"rank{dist.get_rank()}.diverged").write_text(str(err))
            return
        save_file({k: v.contiguous() for k, v in lora.items()}, str(out / f"rank{dist.get_rank()}.safetensors"))
        print(json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size()}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
