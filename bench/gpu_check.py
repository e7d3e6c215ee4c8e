"""Full-size SDXL and Flux.1-dev on one GPU: our Train LoRA against ComfyUI core's TrainLoraNode, peak
memory and seconds per step, and our memory estimate beside our measured peak.

    COMFYUI_DIR=/path/to/ComfyUI python -m comfyui_lora_trainer.bench.gpu_check [--toy] [--json PATH]
        [--device cuda|cpu] [--dtype bf16|fp32] [--estimates all|first|none] [--only TEXT] [--threads N]

ComfyUI runs in this process as a library (its options parsed as headless/inprocess.py does, `--cpu`
on the CPU; a PromptServer that never listens, for our progress event). Each family's diffusion model
is ComfyUI's own class (comfy.supported_models SDXL / Flux → `get_model({})`) with the unet_config
ComfyUI detects for the real files (each run records the class detection picks for weights of those
shapes), random weights (N(0, 0.02), norm scales 1) made directly on the device, in bf16 (fp32 on the
CPU by default: there bf16 is emulated without AVX-512 BF16), wrapped in a ModelPatcher: a MODEL as a
loader gives it. `--toy` builds the same families at toy width (the integration tests' tiny configs,
same text widths) and trains at a quarter of the pixels per side: a CPU smoke run of a minute or two.
Conditioning is random in the shapes the text encoders give: SDXL (1, 77, 2048) with pooled (1, 1280)
and the size entries; Flux (1, 256, 4096) with pooled (1, 768) and guidance 3.5.

Per case (family, pixels, settings; `--steps` steps, rank 16, batch 1, AdamW) two runs on the same model:
- ours: nodes/comfy_train.py `train_lora`, as Train LoRA's execute calls it;
- core: comfy_extras/nodes_train.py `TrainLoraNode.execute` (its V3 classmethod; each input a list).
  Core's model.clone(force_deepcopy=True) re-creates the patcher through `cached_patcher_init` (set by
  ComfyUI's loaders to reload the file); with no file here it gets a clone of the same weights, so one
  copy of the weights counts in both peaks, as when core reloads after ComfyUI offloaded the original.
  Its patcher is never unpatched; the bench puts its object patches back after the run.
Measured per run:
- peak memory: on CUDA `torch.cuda.max_memory_allocated`, reset before the run, with the weights
  resident (our sampler resets it once more before its estimate and first step, weights loaded); on
  the CPU the live bytes of the storages the run makes (training/memory.py `LiveBytes`): the weights,
  made before, are left out;
- seconds per step: ComfyUI's progress-bar hook, which both trainers update after each optimizer step
  (CUDA synchronized), from the end of the first step to the end of the last. On the CPU they include
  LiveBytes' Python work per op, in both trainers;
- ours: the memory estimate our sampler makes before training, caught by wrapping training/memory.py
  `estimate` (the first MemoryEstimate of the run; its own fake run is kept out of the peak). Where the
  sampler makes none, the bench makes it with the engine's arguments just before `train()`
  (`estimate_source` says which). `estimate_mib` is `.total` on CUDA (the resident weights counted, as
  max_memory_allocated counts them) and `.total − .weights` on the CPU (the step, the latents and captions
  on the device and the preview VAE: everything above the weights, as the live bytes are);
  `measured_step_mib` is the peak above what was held when `train()` began, beside the estimate's step.
Each run sits in try/except: an error (out of memory, say) is recorded and the next run goes on. No
run starts after `--budget` seconds (420), nor one that would likely end past `--limit` (450: judged
by the longest earlier run of its family and trainer). Writes JSON (bench/results/gpu_check.json,
gpu_check_toy.json with --toy) and prints a markdown table. Exit status: 0 when it ran (errors inside
cases included), 2 without ComfyUI or torch, or with bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
MIB = 2 ** 20
STEPS = 6
BUDGET_S = 420.0  # no new case after 7 minutes (the H100 run must end within 8)
LIMIT_S = 450.0  # nor one likely to end past 7½ minutes (process start and exit take some seconds)
TOY_SCALE = 4  # --toy trains at px / 4

# The unet_config comfy/model_detection.py returns for the real files (each run records the class detection
# picks for weights of these shapes: `full_config_detected_as`).
FULL_CONFIGS = {
    "sdxl": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
    "flux": {  # Flux.1-dev
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
        "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
        "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
        "txt_ids_dims": [],
    },
}
# Toy width, same layout and text widths (tests/integration make_sdxl.py / make_flux.py).
TOY_CONFIGS = {
    "sdxl": {**FULL_CONFIGS["sdxl"], "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [0, 1],
             "channel_mult": [1, 2], "transformer_depth_middle": 1, "num_head_channels": 16,
             "transformer_depth_output": [0, 0, 1, 1]},
    "flux": {**FULL_CONFIGS["flux"], "hidden_size": 256, "num_heads": 2, "depth": 1, "depth_single_blocks": 1},
}
LATENT_CHANNELS = {"sdxl": 4, "flux": 16}


@dataclass(frozen=True)
class Case:
    family: str
    px: int  # full size; --toy trains at px // TOY_SCALE
    checkpointing: bool
    batch_size: int = 1
    rank: int = 16

    def name(self, toy: bool = False) -> str:
        checkpointing = "ckpt" if self.checkpointing else "no-ckpt"
        return f"{self.family} {self.pixels(toy)}px b{self.batch_size} r{self.rank} {checkpointing}"

    def pixels(self, toy: bool) -> int:
        return self.px // TOY_SCALE if toy else self.px


# Grouped by family (one model each); the last Flux one is the first to go when time runs short.
CASES = (
    Case("sdxl", 1024, True),
    Case("sdxl", 1024, False),
    Case("flux", 512, True),
    Case("flux", 512, False),
    Case("flux", 1024, True),
)


def settings(case: Case, steps: int, dtype: str = "bf16") -> dict[str, Any]:
    """Train LoRA's widget values for a case (TrainConfig's names); core takes the same values."""
    return {"steps": steps, "batch_size": case.batch_size, "rank": case.rank, "learning_rate": 1e-4,
            "optimizer": "AdamW", "loss_function": "MSE", "seed": 0, "training_dtype": dtype, "lora_dtype": dtype,
            "gradient_checkpointing": case.checkpointing}


def core_inputs(values: dict[str, Any]) -> dict[str, list]:
    """TrainLoraNode.execute's keyword arguments (is_input_list: each a list) for the same settings."""
    extra = {"grad_accumulation_steps": 1, "quantized_backward": False, "algorithm": "LoRA", "checkpoint_depth": 1,
             "offloading": False, "existing_lora": "[None]", "bucket_mode": False, "bypass_mode": False}
    return {k: [v] for k, v in {**values, **extra}.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m comfyui_lora_trainer.bench.gpu_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="toy-width models at px/4 (runs on a CPU in about a minute)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default bench/results/gpu_check[_toy].json)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when torch sees a GPU, else cpu")
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_DIR"),
                        help="the ComfyUI checkout (default: $COMFYUI_DIR)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="weights, training_dtype and lora_dtype (default: bf16 on cuda; fp32 on the cpu, where "
                             "bf16 is emulated and many times slower without AVX-512 BF16)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps per run (default {STEPS}; at least 2)")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help=f"seconds after which no new case starts (default {BUDGET_S:.0f})")
    parser.add_argument("--limit", type=float, default=LIMIT_S,
                        help=f"seconds no run should end past: one that took longer before is not started when it "
                             f"would (default {LIMIT_S:.0f})")
    parser.add_argument("--estimates", choices=("all", "first", "none"), default="all",
                        help="our memory estimate (fake tensors, some tens of seconds for a full-size model) in every "
                             "run of ours, in each family's first, or in none (default all)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's CPU threads (default: torch's own; 1 on a shared machine avoids "
                             "oversubscription)")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this (e.g. 'flux')")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps: give at least 2 (seconds per step leave the first step out)")
    if args.json is None:
        args.json = HERE / "results" / ("gpu_check_toy.json" if args.toy else "gpu_check.json")
    args.json = args.json.expanduser().resolve()
    return args


class NoComfyUI(Exception):
    pass


def comfyui_dir(value: Path | str | None) -> Path:
    """The ComfyUI checkout, or NoComfyUI saying how to name one."""
    if not value:
        raise NoComfyUI("bench.gpu_check needs ComfyUI: set COMFYUI_DIR to a ComfyUI checkout (or pass --comfyui DIR), "
                        "and run it with ComfyUI's Python")
    path = Path(value).expanduser().resolve()
    if not (path / "main.py").is_file():
        raise NoComfyUI(f"COMFYUI_DIR={value} is not a ComfyUI checkout (no main.py there); set COMFYUI_DIR to one")
    return path


def import_comfyui(comfy_dir: Path, cpu: bool) -> None:
    """ComfyUI's modules importable, its options parsed (with --cpu on the CPU), as headless/inprocess.py does."""
    sys.path.insert(0, str(comfy_dir))
    import comfy.options

    comfy.options.enable_args_parsing()
    argv = sys.argv
    sys.argv = [str(comfy_dir / "main.py"), *(["--cpu"] if cpu else [])]
    try:
        from comfy.cli_args import args  # noqa: F401  (parses sys.argv once)
    finally:
        sys.argv = argv
    import asyncio

    import server

    if getattr(server.PromptServer, "instance", None) is None:  # our progress event goes out through it
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        server.PromptServer(loop)  # never listens here; its queued messages are never sent


class Clock:
    """The time guard: no run starts once `budget` seconds have passed, nor one that would likely end past
    `limit` (judged by the longest earlier run of its kind: family and trainer)."""

    def __init__(self, budget: float, limit: float | None = None, now: Callable[[], float] = time.monotonic) -> None:
        self.budget, self.limit, self.now, self.start = budget, limit, now, now()
        self.took: dict[str, float] = {}  # kind → the longest run of that kind so far, seconds

    def elapsed(self) -> float:
        return self.now() - self.start

    def refusal(self, kind: str | None = None) -> str | None:
        """Why a run of `kind` may not start now, or None."""
        elapsed = self.elapsed()
        if elapsed >= self.budget:
            return f"time budget: {elapsed:.0f} s had passed (no new case after {self.budget:.0f} s)"
        expected = self.took.get(kind, 0.0)
        if self.limit is not None and elapsed + expected > self.limit:
            return (f"time limit: {elapsed:.0f} s had passed and a {kind} run took {expected:.0f} s, so it would "
                    f"end past {self.limit:.0f} s")
        return None

    def may_start(self, kind: str | None = None) -> bool:
        return self.refusal(kind) is None

    def ran(self, kind: str, seconds: float) -> None:
        self.took[kind] = max(seconds, self.took.get(kind, 0.0))


# ---- measuring ---------------------------------------------------------------------------------
class EstimateSkipped(Exception):
    """Raised in place of our estimate where --estimates leaves it out (our sampler trains on without one)."""


@dataclass
class Probe:
    """What one run records: step end times (ComfyUI's progress hook) and our first memory estimate."""

    cuda: bool
    step_times: list[float] = field(default_factory=list)
    last_value: int = 0
    estimate: Any = None
    estimate_source: str | None = None
    estimate_s: float | None = None
    allocated_before: int | None = None  # CUDA: bytes allocated when the run began (resident weights)
    held_at_train: int | None = None  # what the peak counts, as train() begins: weights (CUDA), inputs' copies
    now: Callable[[], float] = time.perf_counter

    def progress(self, value, total, preview=None, node_id=None, **_):
        if value > self.last_value:  # an update after a step (ours also sends 0 before the first)
            if self.cuda:
                import torch
                torch.cuda.synchronize()
            self.step_times.append(self.now())
        self.last_value = value

    def seconds_per_step(self) -> float | None:
        t = self.step_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) >= 2 else None


class Harness:
    """Patches put in place once for the whole process: the progress hook, our estimate, our train()."""

    def __init__(self, cuda: bool, dtype: str = "bf16") -> None:
        import comfy.utils
        import torch

        from ..nodes import comfy_train
        from ..training import memory

        self.torch, self.memory, self.comfy_train = torch, memory, comfy_train
        self.cuda, self.dtype = cuda, dtype
        self.probe: Probe | None = None
        self.allow_estimate = True  # --estimates: off, our sampler's estimate fails (it logs that and trains on)
        self.live = None  # the LiveBytes of the run in progress (CPU)
        comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL = 0.0  # every step reaches the hook, however fast
        comfy.utils.set_progress_bar_global_hook(self._progress)
        self.original_estimate = memory.estimate
        wrapped = self._wrap_estimate(memory.estimate)
        for module in [m for name, m in sys.modules.items() if name.startswith(__package__.rsplit(".", 1)[0] + ".")]:
            if getattr(module, "estimate", None) is self.original_estimate:  # `from .memory import estimate` too
                module.estimate = wrapped
        self.original_train = comfy_train.train
        comfy_train.train = self._train

    def _progress(self, *args, **kwargs):
        if self.probe is not None:
            self.probe.progress(*args, **kwargs)

    @contextlib.contextmanager
    def unmeasured(self):
        """Our LiveBytes paused (around the estimate's own fake run) where it is the innermost mode."""
        from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily

        if self.live is not None and _get_current_dispatch_mode() is self.live:
            with _pop_mode_temporarily():
                yield
        else:
            yield

    def _wrap_estimate(self, original):
        def estimate(*args, **kwargs):
            if not self.allow_estimate:
                if self.probe is not None and self.probe.estimate_source is None:
                    self.probe.estimate_source = "skipped (--estimates)"
                raise EstimateSkipped("gpu_check --estimates: no estimate in this run")
            started = time.perf_counter()
            try:
                with self.unmeasured():
                    result = original(*args, **kwargs)
            except Exception as err:
                if self.probe is not None and self.probe.estimate_source is None:
                    self.probe.estimate_source = f"sampler: estimate failed: {type(err).__name__}: {err}"
                    self.probe.estimate_s = time.perf_counter() - started
                raise
            self._record(result, "sampler", time.perf_counter() - started)
            return result
        return estimate

    def _record(self, result, source: str, seconds: float) -> None:
        probe = self.probe
        if probe is not None and probe.estimate is None:
            probe.estimate, probe.estimate_source, probe.estimate_s = result, source, seconds

    def _train(self, net, fns, latents, config, *args, **kwargs):
        """Our engine's train(); first the estimate with its arguments, where our sampler made none."""
        probe = self.probe
        if probe is not None and probe.estimate is None and probe.estimate_source is None and self.allow_estimate:
            started = time.perf_counter()
            try:
                with self.unmeasured():
                    result = self.original_estimate(net, fns, latents, config,
                                                    checkpoint_blocks=kwargs.get("checkpoint_blocks", ()),
                                                    samples=kwargs.get("samples"))
                self._record(result, "bench (before train())", time.perf_counter() - started)
            except Exception as err:  # noqa: BLE001  (the training still runs; the error is reported)
                probe.estimate_source = f"bench: estimate failed: {type(err).__name__}: {err}"
                probe.estimate_s = time.perf_counter() - started
        if probe is not None:
            probe.held_at_train = (self.torch.cuda.memory_allocated() if self.cuda else
                                   self.live.now if self.live is not None else None)
        return self.original_train(net, fns, latents, config, *args, **kwargs)

    def measure(self, run: Callable[[], Any]) -> tuple[Probe, float, float]:
        """(probe, peak bytes, wall seconds) of `run()`; its result is dropped."""
        torch = self.torch
        self.probe = probe = Probe(self.cuda)
        cleanup(torch, self.cuda)
        started = time.perf_counter()
        try:
            if self.cuda:
                probe.allocated_before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                run()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
            else:
                with self.memory.LiveBytes(snapshot=False) as live:
                    self.live = live
                    run()
                peak = live.peak
        finally:
            self.live, self.probe = None, None
        return probe, peak, time.perf_counter() - started


def cleanup(torch, cuda: bool) -> None:
    import comfy.model_management as mm

    gc.collect()
    if hasattr(mm, "cleanup_models_gc"):
        mm.cleanup_models_gc()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- models and inputs ---------------------------------------------------------------------------
def randomize(net, seed: int = 0) -> None:
    """N(0, 0.02) weights, norm scales 1 (ComfyUI's ops leave the weights uninitialized)."""
    import torch

    generator = torch.Generator(device=next(net.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("scale")):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)


def build_model(family: str, toy: bool, dtype_name: str = "bf16"):
    """A ModelPatcher of the family's ComfyUI model, random weights in `dtype_name`, made on ComfyUI's device."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    config_class = {"sdxl": comfy.supported_models.SDXL, "flux": comfy.supported_models.Flux}[family]
    config = config_class(dict((TOY_CONFIGS if toy else FULL_CONFIGS)[family]))
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    manual_cast = mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual_cast)
    model = config.get_model({}, device=load_device)  # {}: no v-pred/edm keys → SDXL base's EPS
    randomize(model.diffusion_model)
    model.device = load_device
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    # core's clone(force_deepcopy=True) re-creates the patcher this way (a loader: from its file)
    patcher.cached_patcher_init = (lambda disable_dynamic=True: patcher.clone(), ())
    return patcher


def case_inputs(case: Case, toy: bool, seed: int = 0) -> tuple[list[dict], list]:
    """(latents as Train LoRA's list input, positive as a list of one CONDITIONING): random, the encoders' shapes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    px = case.pixels(toy)
    latent = torch.randn(case.batch_size, LATENT_CHANNELS[case.family], px // 8, px // 8, generator=g)
    if case.family == "sdxl":
        cond = torch.randn(1, 77, 2048, generator=g)
        options = {"pooled_output": torch.randn(1, 1280, generator=g), "width": px, "height": px, "crop_w": 0,
                   "crop_h": 0, "target_width": px, "target_height": px}
    else:
        cond = torch.randn(1, 256, 4096, generator=g)
        options = {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}
    return [{"samples": latent}], [[[cond, options]]]


def detected_as(family: str) -> str | None:
    """The config class ComfyUI's detection picks for FULL_CONFIGS[family]'s weights (built on the meta
    device: shapes only): SDXL / Flux when the full configs are the real models'."""
    import comfy.model_detection
    import comfy.supported_models
    import torch

    config_class = {"sdxl": comfy.supported_models.SDXL, "flux": comfy.supported_models.Flux}[family]
    config = config_class(dict(FULL_CONFIGS[family]))
    config.set_inference_dtype(torch.bfloat16, None)
    sd = config.get_model({}, device="meta").diffusion_model.state_dict()
    try:
        found = comfy.model_detection.model_config_from_unet(sd, "")
    except Exception as err:  # noqa: BLE001  (a report line, not a reason to stop)
        return f"detection failed: {type(err).__name__}: {err}"
    return type(found).__name__ if found is not None else None


def params_and_bytes(patcher) -> tuple[int, int]:
    net = patcher.model.diffusion_model
    return (sum(p.numel() for p in net.parameters()),
            sum(p.numel() * p.element_size() for p in net.parameters()))


# ---- runs ----------------------------------------------------------------------------------------
def error_entry(err: BaseException) -> dict[str, str]:
    return {"error": f"{type(err).__name__}: {err}"[:2000],
            "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))[-6000:]}


def run_ours(harness: Harness, patcher, case: Case, toy: bool, steps: int) -> dict[str, Any]:
    from ..nodes.common import NONE_LORA
    from ..nodes.comfy_train import train_lora

    latents, positive = case_inputs(case, toy)
    values = dict(settings(case, steps, harness.dtype), existing_lora=NONE_LORA)
    probe, peak, wall = harness.measure(lambda: train_lora(patcher, latents, positive, values, options=None))
    out = measured(probe, peak, wall)
    estimate = probe.estimate
    out["estimate_source"] = probe.estimate_source
    out["estimate_s"] = probe.estimate_s
    if estimate is not None:
        comparable = estimate.total if harness.cuda else estimate.total - estimate.weights
        out.update(estimate_mib=comparable / MIB, estimate_total_mib=estimate.total / MIB,
                   estimate_over_peak=comparable / peak if peak else None, estimate=estimate.as_dict())
        if probe.held_at_train is not None and peak > probe.held_at_train:
            # the step alone: the peak above what was held when train() began, against the estimate's step
            step = peak - probe.held_at_train
            out.update(measured_step_mib=step / MIB, estimate_step_over_measured_step=estimate.step / step)
    else:
        out.update(estimate_mib=None, estimate=None)
    return out


def run_core(harness: Harness, patcher, case: Case, toy: bool, steps: int) -> dict[str, Any]:
    from comfy_extras.nodes_train import TrainLoraNode

    latents, positive = case_inputs(case, toy)
    inputs = core_inputs(settings(case, steps, harness.dtype))
    try:
        probe, peak, wall = harness.measure(
            lambda: TrainLoraNode.execute(model=[patcher], latents=latents, positive=positive, **inputs))
    finally:
        # core's patcher is never unpatched: put back the object patches it set on the shared model (its
        # compute dtype), without moving weights; its weight wrappers go at the next load
        patcher.unpatch_model(None, unpatch_weights=False)
    return measured(probe, peak, wall)


def measured(probe: Probe, peak: int, wall: float) -> dict[str, Any]:
    out = {"peak_mib": peak / MIB, "s_per_step": probe.seconds_per_step(), "steps_seen": len(probe.step_times),
           "wall_s": wall}
    if probe.allocated_before is not None:
        out["allocated_before_mib"] = probe.allocated_before / MIB
    if probe.held_at_train is not None:
        out["held_at_train_mib"] = probe.held_at_train / MIB
    return out


def guarded(clock: Clock, run: Callable[[], dict], skipped: list[str], what: str, kind: str | None = None
            ) -> dict[str, Any]:
    """`run()`'s entry; an error entry when it raises; a skipped one when the clock refuses it."""
    why = clock.refusal(kind)
    if why is not None:
        skipped.append(what)
        return {"skipped": why}
    started = clock.now()
    try:
        return run()
    except Exception as err:  # noqa: BLE001  (an OOM in one case must not end the others)
        return error_entry(err)
    finally:
        if kind is not None:
            clock.ran(kind, clock.now() - started)


def run_cases(cases: tuple[Case, ...], args: argparse.Namespace, clock: Clock, cuda: bool, report: dict,
              save: Callable[[], None] = lambda: None) -> None:
    """Every case into report["cases"] (and each family into report["families"]), `save()` after each run."""
    import torch

    harness = Harness(cuda, args.dtype)
    results, families, skipped = report["cases"], report["families"], report["skipped"]
    for family in dict.fromkeys(c.family for c in cases):
        mine = [c for c in cases if c.family == family]
        entries = [{"family": family, "px": c.pixels(args.toy), "name": c.name(args.toy),
                    "settings": settings(c, args.steps, args.dtype)} for c in mine]
        results += entries
        why = clock.refusal()
        if why is not None:
            for entry in entries:
                entry["ours"] = entry["core"] = {"skipped": why}
                skipped += [f"{entry['name']} ours", f"{entry['name']} core"]
            continue
        try:
            started = time.perf_counter()
            patcher = build_model(family, args.toy, args.dtype)
            params, nbytes = params_and_bytes(patcher)
            families[family] = {"params": params, "weights_mib": nbytes / MIB, "build_s": time.perf_counter() - started,
                                "full_config_detected_as": detected_as(family)}
            print(f"[gpu_check] {family}: {params / 1e6:.1f} M parameters, {nbytes / MIB:.0f} MiB of weights, "
                  f"built in {families[family]['build_s']:.1f} s", flush=True)
        except Exception as err:  # noqa: BLE001
            families[family] = error_entry(err)
            for entry in entries:
                entry["ours"] = entry["core"] = {"error": f"model build failed: {families[family]['error']}"}
            save()
            continue
        for case, entry in zip(mine, entries):  # per case: ours, then core on the same weights
            harness.allow_estimate = args.estimates == "all" or (args.estimates == "first" and case is mine[0])
            entry["ours"] = guarded(clock, lambda: run_ours(harness, patcher, case, args.toy, args.steps), skipped,
                                    f"{entry['name']} ours", f"{family} ours")
            print(f"[gpu_check] {entry['name']} ours: {brief(entry['ours'])}", flush=True)
            save()
            entry["core"] = guarded(clock, lambda: run_core(harness, patcher, case, args.toy, args.steps), skipped,
                                    f"{entry['name']} core", f"{family} core")
            print(f"[gpu_check] {entry['name']} core: {brief(entry['core'])}", flush=True)
            save()
        del patcher
        families[family]["left_allocated_mib"] = release(torch, cuda)


def release(torch, cuda: bool) -> float | None:
    """Free the family's model before the next (ComfyUI keeps only weak references to it); on CUDA the
    MiB still allocated after, and if a GiB or more is, ComfyUI unloads every model to the CPU."""
    import comfy.model_management as mm

    cleanup(torch, cuda)
    mm.cleanup_models()
    if not cuda:
        return None
    left = torch.cuda.memory_allocated()
    if left >= 2 ** 30:
        mm.unload_all_models()
        cleanup(torch, cuda)
    return left / MIB


def brief(entry: dict) -> str:
    if "error" in entry or "skipped" in entry:
        return entry.get("error", entry.get("skipped", ""))
    s = entry.get("s_per_step")
    text = f"peak {entry['peak_mib']:.0f} MiB, {'?' if s is None else f'{s:.3f}'} s/step"
    if entry.get("estimate_mib") is not None:
        text += f", estimate {entry['estimate_mib']:.0f} MiB ({entry['estimate_over_peak']:.3f} of peak)"
    return text


def _cell(entry: dict | None, key: str, form: str) -> str:
    if not entry:
        return "—"
    if "error" in entry:
        return "error"
    if "skipped" in entry:
        return "skipped"
    value = entry.get(key)
    return "?" if value is None else format(value, form)


def markdown(report: dict) -> str:
    lines = [f"{report['device']} · torch {report['torch']} · {report['dtype']} · memory: {report['memory']} · "
             f"{report['steps']} steps",
             "",
             "| case | ours peak MiB | ours s/step | our estimate MiB | estimate/peak | core peak MiB | core s/step |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for case in report["cases"]:
        ours, core = case.get("ours"), case.get("core")
        lines.append(f"| {case['name']} | {_cell(ours, 'peak_mib', '.1f')} | {_cell(ours, 's_per_step', '.3f')} | "
                     f"{_cell(ours, 'estimate_mib', '.1f')} | {_cell(ours, 'estimate_over_peak', '.3f')} | "
                     f"{_cell(core, 'peak_mib', '.1f')} | {_cell(core, 's_per_step', '.3f')} |")
    return "\n".join(lines)


def notes(cuda: bool) -> list[str]:
    common = ["core trains a clone of the same weights (no file to reload): one copy of the weights in both peaks",
              "s_per_step: from the end of the first step to the end of the last (ComfyUI's progress hook)"]
    if cuda:
        return common + ["peak: max_memory_allocated with the weights resident; our sampler resets it once more "
                         "before its estimate, the weights loaded", "estimate_mib: estimate.total (weights included)"]
    return common + ["peak: live bytes of the storages each run makes; weights made before are not counted",
                     "estimate_mib: estimate.total - estimate.weights (above the weights)",
                     "s_per_step on the CPU includes LiveBytes' per-op Python work (both trainers)"]


def device_name(cuda: bool) -> str:
    if cuda:
        import torch
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.budget, args.limit)
    try:
        comfy_dir = comfyui_dir(args.comfyui)
    except NoComfyUI as why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    try:
        import torch
    except ModuleNotFoundError:
        print("error: bench.gpu_check needs torch: run it with ComfyUI's Python (COMFYUI_DIR's venv)", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    cuda = device == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    import_comfyui(comfy_dir, cpu=not cuda)
    import folder_paths

    report = {
        "device": device_name(cuda), "torch": torch.__version__, "toy": args.toy, "steps": args.steps,
        "dtype": args.dtype, "memory": "cuda max_memory_allocated" if cuda else "live bytes (cpu)",
        "estimate_compared": ("estimate.total (weights included) vs max_memory_allocated" if cuda else
                              "estimate.total - estimate.weights (above the weights) vs the run's live bytes"),
        "estimates": args.estimates, "notes": notes(cuda), "comfyui": str(comfy_dir), "budget_s": args.budget,
        "limit_s": args.limit, "complete": False, "elapsed_s": 0.0, "families": {}, "cases": [], "skipped": [],
    }

    def save() -> None:  # after every run: a run cut short by the machine's limit still leaves its numbers
        report["elapsed_s"] = clock.elapsed()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        tmp.replace(args.json)

    cases = tuple(c for c in CASES if args.only in c.name(args.toy))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as out:
        folder_paths.set_output_directory(out)  # nothing of ours should be written; if it is, not into ComfyUI
        run_cases(cases, args, clock, cuda, report, save)
    report["complete"] = True
    save()
    print(markdown(report))
    print(f"[gpu_check] {clock.elapsed():.0f} s in all; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
