"""ComfyUI glue for Train LoRA: the TrainSampler, the model's callables, progress and cancel.

Imported only when the node runs (it imports ComfyUI at module level). The loop runs as a
`comfy.samplers.Sampler` under a basic guider, so conditioning, extra model inputs and the noise
schedule (`model_sampling`) come from ComfyUI for every model family; the guider also loads the
model through ComfyUI's model management. The engine (training/loop.py) does the rest.

ComfyUI runs nodes under `torch.inference_mode()`; tensors made there cannot be saved for backward,
so everything here runs with inference mode off, on clones of the latents and conditioning.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import NamedTuple

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_extras.nodes_custom_sampler import Guider_Basic
from tqdm.auto import tqdm

from ..lora import BaseModel, LoraStateDict, Naming, load_lora_file, resolve_state_dict, split_text_encoder, steps_of
from ..lora.keys import TEXT_ENCODER_PREFIXES
from ..lora.patching import swapped_items
from ..lora.metadata import PREFIX as METADATA_PREFIX
from ..training import distributed
from ..training.checkpointing import model_blocks
from ..training.config import TrainConfig
from ..training.data import Samples, caption_entries, describe_captions, model_latents
from ..training.captions import grouped_denoise, guider_predict
from ..training import memory
from ..training.loop import ModelFns, TrainResult, TrainState, train
from ..training.validation import Validation
from . import families
from .checkpoints import CheckpointWriter
from .common import ESTIMATE_MODE, ESTIMATE_OUT, NONE_LORA
from .comfy_adapter import reload, with_training_adapter
from .comfy_conds import ShapedConds, check_conditioned
from .comfy_text_encoder import LiveEntries, TrainedTextEncoder, continued_text_encoder, trained_text_encoder
from .compat import comfyui_version, partial_load_problem
from .conditioning import PER_IMAGE_ENTRIES, captions_of, flat_conditioning, hold_latent_inputs
from .samples import Expanded, expand, is_variant_set
from .comfy_preview import Previewer
from .hooks import TrainingHooks
from .options import TrainingAdapter, TrainingOptions
from .loss_map import EXPERTS_KEY, VALIDATION_LOSS, VALIDATION_STEP
from .preview import PreviewSettings
from .progress import ProgressReporter
from .validation import ValidationSettings

log = logging.getLogger(__name__)

_PERCENT_EDGE = 1e-5  # ComfyUI maps percent 0 to a near-infinite sigma; keep draws inside (0, 1)


class EstimateOnly(Exception):
    """Raised inside the sampler once the estimate is written, when ESTIMATE_MODE asks for no training."""


def _clone_tree(value):
    """Clone every tensor in nested lists/tuples/dicts (inference tensors → normal tensors)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tree(v) for v in value)
    return value


def _release_inference_tensors(module: torch.nn.Module) -> None:
    """Swap inference-mode parameters/buffers for bit-identical normal tensors, one at a time.

    Weights loaded while ComfyUI ran a node under `torch.inference_mode()` are inference tensors,
    which autograd may not save for backward, even frozen. Core deep-copies the whole model; a
    per-tensor swap costs one tensor of extra memory at a time, and values stay bit-identical (so
    every other user of the shared modules sees the same model).
    """
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_inference():
                m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None and b.is_inference():
                m._buffers[name] = b.clone()


def _diffusers_paths(base_model) -> dict[str, str]:
    """The UNet's module path → diffusers' module path, where ComfyUI knows them (UNet families)."""
    unet_config = getattr(base_model.model_config, "unet_config", None)
    if not unet_config:
        return {}
    paths = {}
    for diffusers_key, unet_key in comfy.utils.unet_to_diffusers(unet_config).items():
        if diffusers_key.endswith(".weight"):
            paths[unet_key[: -len(".weight")]] = diffusers_key[: -len(".weight")]
    return paths


def base_model_of(base_model) -> BaseModel:
    """The model's family for the file: kohya's naming and metadata (nodes/families.py)."""
    model_type = getattr(getattr(base_model, "model_type", None), "name", "")
    family = families.base_model(type(base_model.model_config).__name__, model_type, _diffusers_paths(base_model))
    scale = getattr(getattr(base_model, "latent_format", None), "spacial_downscale_ratio", None)  # 16 for Flux 2
    return dataclasses.replace(family, pixel_scale=scale) if isinstance(scale, int) else family


class Existing(NamedTuple):
    """The LoRA to continue: its diffusion-model weights, earlier steps, and text-encoder tensors kept as they are."""

    weights: dict | None = None
    steps: int = 0
    text_encoder: dict | None = None


def _existing(name: str, base_model) -> Existing:
    """The LoRA to continue (any format the LoRA core reads) and its earlier steps: its `ss_steps`
    metadata, else the steps in its name (lora/metadata.py `steps_of`).

    A text-encoder part (kohya `lora_te_…`) is returned apart: it continues training with a trained text
    encoder (nodes/comfy_text_encoder.py), else it goes into the output unchanged.
    """
    if name in (None, "", NONE_LORA):
        return Existing()
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise FileNotFoundError(f"existing_lora: {name!r} is not in the loras folder; pick a file from the list")
    sd, metadata = load_lora_file(path)
    unet, text_encoder = split_text_encoder(sd)
    if text_encoder:
        kinds = sorted({p for k in text_encoder for p in TEXT_ENCODER_PREFIXES if k.startswith(p)})
        log.info("Train LoRA: existing_lora %r has %d text-encoder tensors (%s); unless LoRA Text Encoder trains "
                 "the text encoder, they go into the output LoRA unchanged", name, len(text_encoder),
                 ", ".join(f"{k}…" for k in kinds))
    aliases = Naming("kohya-diffusers", _diffusers_paths(base_model)).aliases()  # either naming reads back
    weights = resolve_state_dict(unet, base_model.diffusion_model, aliases, label=f"existing_lora {name!r}")
    return Existing(weights, steps_of(metadata, name), text_encoder)


class Extras(NamedTuple):
    """What Train LoRA does besides training: previews, validation (latents, the conditioning entries of
    each image), checkpoints and resume; preservation: each image's preservation caption entries (the
    regularisation images' own captions), or None; the regularisation set's latents and caption entries."""

    preview: PreviewSettings | None = None
    validation: ValidationSettings | None = None
    validation_latents: list[torch.Tensor] = []
    validation_captions: list[list[int]] = []
    checkpoints: CheckpointWriter | None = None
    resume: TrainState | None = None
    preservation: list[list[int]] | None = None
    regular_latents: list[torch.Tensor] = []
    regular_captions: list[list[int]] = []


class TrainSampler(comfy.samplers.Sampler):
    """Runs the whole training loop where a sampler would sample; keeps the result."""

    def __init__(self, latents: list[torch.Tensor], captions: list[list[int]], config: TrainConfig, existing: Existing,
                 uncond: tuple[int, ...] | None = None, extras: Extras = Extras(), samples: Samples | None = None,
                 held: dict[int, dict] | None = None, text_encoder: TrainedTextEncoder | None = None,
                 reporter: ProgressReporter | None = None, deployed=None, high_noise=None):
        self.latents, self.captions, self.config, self.existing = latents, captions, config, existing
        self.deployed = deployed  # what previews sample when a training adapter is on: the given model (else None)
        self.reporter = reporter or ProgressReporter(config.steps, lambda payload: None)  # the progress event
        self.high_noise = high_noise  # the high-noise expert trained too (nodes/comfy_experts.py), or None
        self.samples = samples  # alternatives (flipped copies, caption variants), repeats and masks (nodes/samples.py)
        self.uncond = uncond  # the entries of the empty caption (caption dropout), or None
        self.extras = extras
        self.result: TrainResult | None = None
        self.previewer: Previewer | None = None
        self.held = held or {}  # the entries' inputs held back from the guider (nodes/comfy_conds.py)
        self.conds: ShapedConds | None = None  # the guider's caption entries, prepared per latent size
        self.hooks: TrainingHooks | None = None
        self.memory: memory.MemoryEstimate | None = None  # the step's estimate, made before training
        self.text_encoder = text_encoder  # trained too (LoRA Text Encoder), or None
        self.text_encoders = text_encoder.parts if text_encoder is not None else ()  # the engine's parts of it
        self.live: LiveEntries | None = None  # the entries as predictions read them, with a trained text encoder

    @property
    def steps_done(self) -> int:
        return self.hooks.steps_done if self.hooks is not None else 0

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        if self.high_noise is not None and self.high_noise.wrap is None:  # its guider prepares it, then calls back
            return self.high_noise.nest(self, model_wrap, sigmas, extra_args, callback, noise, latent_image,
                                        denoise_mask, disable_pbar)
        base = model_wrap.inner_model
        net = base.diffusion_model
        device = model_wrap.model_patcher.load_device
        _release_inference_tensors(net)
        # every latent through process_latent_in (in fp32, kept in its storage dtype); the engine takes
        # batches, so each image is a batch of 1; a latent shared by several alternatives is processed once
        processed: dict[int, torch.Tensor] = {}
        unique = {id(x): x for x in self.latents + self.extras.regular_latents}
        with self.reporter.working("latents", "preparing the latents", len(unique)) as phase:
            for x in unique.values():
                processed[id(x)] = base.process_latent_in(x.to(device).float()[None]).to(x.dtype)
                phase.advance(len(processed))
        latents = [processed[id(x)] for x in self.latents]
        regular = [processed[id(x)] for x in self.extras.regular_latents]
        self.reporter.phase("preparing the captions")
        # the captions prepared at each latent's size (ComfyUI prepared them at the first image's)
        self.conds = self._shaped_conds(model_wrap)
        if self.text_encoder is not None:
            self.text_encoder.release(_release_inference_tensors)
            self.live = LiveEntries(self.text_encoder, self.conds)
        fns = self._model_fns(model_wrap, base.model_sampling, extra_args, self.captions + self.extras.regular_captions,
                              [x.shape for x in self.latents + self.extras.regular_latents], self.extras.preservation)
        validator = self._validator(model_wrap, extra_args, device)
        self.hooks = self._hooks(model_wrap, validator is not None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            # ComfyUI's flag while training, as core's trainer sets it: some models pick autograd-capable
            # kernels by it (Flux's rope: comfy_kitchen's has no backward)
            with swapped_items(comfy.model_management.__dict__, {"in_training": True}):
                self.reporter.phase("estimating memory")
                self.memory = self._estimate(net, fns, latents, device)
                if self.high_noise is not None:
                    self.result = self.high_noise.train(self, model_wrap, net, fns, latents, _release_inference_tensors,
                                                        self._shaped_conds, base_model_of)
                else:
                    self.result = train(net, fns, latents, self.config, checkpoint_blocks=model_blocks(net),
                                        existing=self.existing.weights, existing_steps=self.existing.steps,
                                        hooks=self.hooks.hooks(), base=base_model_of(base),
                                        resume=self.extras.resume, validator=validator and self.hooks.validator(validator),
                                        samples=self.samples, regularization=regular or None,
                                        text_encoders=self.text_encoders)
        finally:
            self.hooks.close()
        if distributed.is_main():
            _log_speed(self.hooks.seconds_per_step(), device)
        return torch.zeros_like(latent_image)

    def _estimate(self, net, fns: ModelFns, latents: list[torch.Tensor], device: torch.device):
        """The step's memory (training/memory.py), logged with the device's free memory and, when it does not
        fit, the cheapest settings that would; never stops the run (a model the estimate cannot follow
        trains without one), unless ESTIMATE_MODE asks for the estimate alone."""
        mode = os.environ.get(ESTIMATE_MODE, "")

        def measure(config: TrainConfig, fake: bool = True) -> memory.MemoryEstimate:
            found = memory.estimate(net, fns, latents, config, checkpoint_blocks=model_blocks(net),
                                    samples=self.samples, device=device, fake=fake,
                                    text_encoders=self.text_encoders)
            # the training data on the device for the whole run: every latent and every prepared caption
            found.extra["latents and captions"] = memory.tensor_bytes([latents, self.conds.entries], device)
            if self.previewer is not None:  # the VAE joins the model on the device to decode previews
                found.extra["VAE while previewing"] = self.previewer.vae_bytes()
            return found

        try:
            found = measure(self.config)
        except Exception as err:  # noqa: BLE001 - an estimate must not stop training
            if mode:
                raise
            log.warning("Train LoRA: no memory estimate for this model (%s: %s); training goes on",
                        type(err).__name__, err)
            return None
        free = comfy.model_management.get_free_memory(device)
        need = found.total - found.weights  # the weights are loaded already
        log.info("Train LoRA: memory: %s; %s free on %s", found.describe(), memory.gib(free), device)
        changes, fits = ([], found) if need <= free else memory.cheapest_fit(self.config, measure, free)
        if need > free:
            advice = (f"the cheapest settings that fit: {', '.join(changes)} (then {memory.gib(fits.step)} above the "
                      f"weights)" if fits is not None else
                      f"even with {', '.join(changes) or 'these settings'} it would not; turn the options node's "
                      f"offload on (the frozen weights stay in RAM), or train at a lower resolution")
            log.warning("Train LoRA: this step needs about %s above the loaded weights but %s is free on %s; %s",
                        memory.gib(need), memory.gib(free), device, advice)
        if mode:
            record = {"estimate": found.as_dict(), "free_mib": free / memory.MIB, "fits": need <= free,
                      "cheapest": changes if need > free else [],
                      "measured": measure(self.config, fake=False).as_dict() if mode == "measure" else None}
            out = os.environ.get(ESTIMATE_OUT)
            if out:
                with open(out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            raise EstimateOnly()
        return found

    def _validator(self, model_wrap, extra_args: dict, device: torch.device) -> Validation | None:
        """The validation set's loss (its latents through process_latent_in too), or None."""
        extras, base = self.extras, model_wrap.inner_model
        if extras.validation is None:
            return None
        latents = [base.process_latent_in(x.to(device).float()[None]) for x in extras.validation_latents]
        fns = self._model_fns(model_wrap, base.model_sampling, extra_args, extras.validation_captions,
                              [x.shape for x in extras.validation_latents])
        return Validation(fns, latents, self.config, extras.validation.every, extras.validation.noise_levels)

    def _hooks(self, model_wrap, validating: bool) -> TrainingHooks:
        """Console bar, ComfyUI's bar, the progress event, previews and checkpoints: under torchrun
        (training/distributed.py) only rank 0 reports, previews and writes checkpoints."""
        config, extras, main = self.config, self.extras, distributed.is_main()
        resumed = extras.resume.step if extras.resume is not None else 0
        ui_bar = comfy.utils.ProgressBar(config.steps)
        if extras.preview is not None and main:
            training = model_wrap.model_patcher
            # with a training adapter, previews sample the deployed model, then training's copy is loaded back
            self.previewer = (Previewer(extras.preview, training, config.steps, ui_bar) if self.deployed is None else
                              Previewer(extras.preview, self.deployed, config.steps, ui_bar,
                                        after=lambda: reload(training)))
            self.reporter.schedule("preview", extras.preview.every)
        if validating:
            self.reporter.schedule("validation", extras.validation.every)
        return TrainingHooks(
            config.steps, tqdm(total=config.steps, initial=resumed, desc="Train LoRA", disable=not main), ui_bar,
            self.reporter, previewer=self.previewer, checkpoints=extras.checkpoints if main else None,
            validating=validating, interrupt=comfy.model_management.InterruptProcessingException,
            interrupted_flag=comfy.model_management.processing_interrupted, start_step=resumed)

    def _shaped_conds(self, model_wrap) -> ShapedConds:
        """The guider's caption entries of `model_wrap` (the run's, or another expert's), to prepare per latent size."""
        device = model_wrap.model_patcher.load_device
        return ShapedConds(model_wrap.conds["positive"], self.held, model_wrap.inner_model, device,
                           tuple(self.latents[0].shape), self.config.seed)

    def _model_fns(self, model_wrap, sampling, extra_args: dict, captions: list[list[int]], shapes: list,
                   preservation: list[list[int]] | None = None, conds: ShapedConds | None = None) -> ModelFns:
        """The engine's model callables for images of `shapes` with `captions` (and `preservation` captions);
        every caption is prepared at its image's shape here, before training (a caption that cannot fit
        fails now, not at some step). `conds`: the entries of `model_wrap`'s guider when not the run's."""
        def percent_to_sigma(percent: torch.Tensor) -> torch.Tensor:
            p = percent.clamp(_PERCENT_EDGE, 1 - _PERCENT_EDGE).tolist()
            return torch.tensor([float(sampling.percent_to_sigma(x)) for x in p])

        # one guider call per caption: the guider combines every cond it holds over the whole batch
        conds, uncond = conds or self.conds, self.uncond
        prepared = [tuple(c) for c in conds.captions(captions, shapes)]
        bare = None  # control dropout's captions, without their condition images
        if self.config.control_dropout and any(e in conds.held for c in captions for e in c):
            bare = [tuple(c) for c in conds.captions(captions, shapes, bare=True)]
        if uncond:  # caption dropout's empty caption at every shape, prepared now too
            conds.captions([uncond] * len(set(shapes)), list(set(shapes)))
        # the very list the preparing grows (with a trained text encoder, read through it)
        predict = guider_predict(model_wrap, self.live if self.live is not None else conds.entries, extra_args)
        denoise = grouped_denoise(predict, prepared)
        denoise_bare = grouped_denoise(predict, bare) if bare is not None else None
        denoise_preserve = None
        if preservation is not None and self.config.dop_multiplier:
            denoise_preserve = grouped_denoise(predict, [tuple(c) for c in conds.captions(preservation, shapes)])
        denoise_uncond = (lambda noisy, sigma: predict(noisy, sigma, tuple(conds.index(e, noisy.shape[1:])
                                                                          for e in uncond))) if uncond else None

        return ModelFns(
            percent_to_sigma=percent_to_sigma,
            noise_scaling=lambda s, n, x: sampling.noise_scaling(s.to(x), n, x, False),
            calculate_denoised=lambda s, out, x: sampling.calculate_denoised(s.to(x), out, x),
            denoise=denoise,
            denoise_uncond=denoise_uncond,
            flow=isinstance(sampling, comfy.model_sampling.CONST),
            denoise_bare=denoise_bare,
            denoise_preserve=denoise_preserve,
        )


def _config(inputs: dict, options: TrainingOptions | None) -> TrainConfig:
    """Train LoRA's widgets plus the options node's fields: TrainConfig's names on both."""
    fields = {k: v for k, v in inputs.items() if k != "existing_lora"}
    return TrainConfig(**fields, **(options.values if options is not None else {}))


class _Captions(NamedTuple):
    """The guider's conditioning entries and which of them each image trains with."""

    entries: list  # every [tensor, options] entry: the training captions', the empty caption, the validation set's
    training: list[list[int]]  # per training image
    uncond: tuple[int, ...] | None  # the empty caption's entries (caption dropout), or None
    validation: list[list[int]]  # per validation image
    preservation: list[list[int]] | None = None  # per training image, its preservation caption (LoRA Preservation)
    regular: list[list[int]] = []  # per regularisation image


def _captions(positive: list, latents: list[dict], n_images: int, options: TrainingOptions | None,
              validation: ValidationSettings | None, n_validation: int, source: str | None) -> _Captions:
    """Every caption in one list of entries for the guider, each image's entries into it."""
    conditionings = captions_of(_clone_tree(positive), _batch_sizes(latents), source)
    entries, counts = flat_conditioning(conditionings)
    training = caption_entries(counts, n_images)
    read = f" (from {source}: each entry is one image's caption)" if source in PER_IMAGE_ENTRIES else ""
    variants = sum(1 for c in conditionings if is_variant_set(c))  # alternatives, not one combined caption
    shown = [1 if is_variant_set(c) else len(c) for c in conditionings]
    drawn = f"; {variants} of them with caption variants, one drawn per use" if variants else ""
    log.info(describe_captions(shown, n_images) + drawn + read)
    uncond = None
    if options is not None and options.unconditional is not None:  # caption dropout's empty caption
        extra = list(_clone_tree(options.unconditional))
        uncond = tuple(range(len(entries), len(entries) + len(extra)))
        entries = entries + extra
    # the validation set's, the preservation captions and the regularisation set's join after the training ones
    per_validation: list[list[int]] = []
    if validation is not None:
        entries, per_validation = _appended(entries, captions_of(
            _clone_tree(validation.positive), _batch_sizes(validation.latents), validation.source,
            "validation positive"), n_validation)
    preservation, regular = None, []
    if options is not None and options.preservation is not None and options.values.get("dop_multiplier"):
        entries, preservation = _appended(entries, _clone_tree(options.preservation), n_images, "captions")
    if options is not None and options.regularization is not None:
        reg = options.regularization
        entries, regular = _appended(entries, captions_of(_clone_tree(reg.positive), _batch_sizes(reg.latents), None,
                                                          "regularization_positive"),
                                     sum(_batch_sizes(reg.latents)), "regularization_positive")
    return _Captions(entries, training, uncond, per_validation, preservation, regular)


def _appended(entries: list, conditionings: list, n_images: int, what: str = "positive") -> tuple[list, list[list[int]]]:
    """`entries` with these CONDITIONINGs' entries after them, and the indices into it of each of the
    `n_images` images' caption (one CONDITIONING for all, or one per image; else a ValueError naming `what`)."""
    extra, counts = flat_conditioning(conditionings)
    return entries + extra, [[len(entries) + i for i in c] for c in caption_entries(counts, n_images, what)]


def train_lora(model, latents: list[dict], positive: list, inputs: dict, options: TrainingOptions | None = None,
               preview: PreviewSettings | None = None, validation: ValidationSettings | None = None,
               positive_source: str | None = None, high_noise_model=None) -> dict:
    """Train LoRA's execute: validate, train under a guider, shape the five outputs (and the previews' UI).
    `positive_source` is the class of the node feeding `positive` (nodes/conditioning.py). `high_noise_model`:
    trained too, `model` being the low-noise expert (nodes/comfy_experts.py)."""
    config = _config(inputs, options)
    # the progress event from the first second: what runs before the first step can take minutes
    reporter = ProgressReporter(config.steps, None if distributed.is_main() else (lambda payload: None))
    reporter.phase("preparing the training data")
    adapter = options.training_adapter if options is not None else None
    note = families.distilled_note(type(model.model.model_config).__name__, adapter and adapter.name)
    if note is not None:  # a warning without an adapter: what to expect
        log.log(logging.WARNING if adapter is None else logging.INFO, note)
    if high_noise_model is not None:
        from .comfy_experts import check_experts

        check_experts(model, high_noise_model, config, inputs.get("existing_lora", NONE_LORA), {
            "preview": preview is not None, "validation": validation is not None,
            "regularization": options is not None and options.regularization is not None,
            "training_adapter": adapter is not None})
    with torch.inference_mode(False), torch.enable_grad():
        images = _latents(latents, model.model, "latents")
        val_latents = _latents(validation.latents, model.model, "validation latents") if validation else []
        captions = _captions(positive, latents, len(images), options, validation, len(val_latents), positive_source)
        regular = (_latents(options.regularization.latents, model.model, "regularization_latents")
                   if captions.regular else [])
        used = {e for c in captions.training + captions.validation + captions.regular + (captions.preservation or [])
                for e in c}
        used |= set(captions.uncond or ()) if config.caption_dropout else set()
        check_conditioned(model.model, images + val_latents + regular, captions.entries, used)
        data = expand(images, captions.training, captions.entries, latents)
        _log_samples(len(images), data)
        existing = _existing(inputs.get("existing_lora", NONE_LORA), model.model)
        text_encoder = trained_text_encoder(options.text_encoder if options is not None else None,
                                            config.text_encoder_lr, captions.entries, data.captions)
        if text_encoder is not None and existing.text_encoder:  # its text-encoder layers continue training
            layers, kept = continued_text_encoder(existing.text_encoder, text_encoder.parts,
                                                  inputs.get("existing_lora", NONE_LORA))
            existing = existing._replace(weights={**(existing.weights or {}), **layers}, text_encoder=kept)
        writer = CheckpointWriter(folder_paths.get_output_directory(), config, data.images + regular,
                                  len(captions.entries))
        extras = Extras(preview, validation, val_latents, captions.validation, writer, writer.resume(),
                        _preservation_of(captions, data), regular, captions.regular)
        given, held = hold_latent_inputs(captions.entries)  # a start frame fits one clip's size, not the run's
        if extras.resume is not None:
            reporter.start_at(extras.resume.step)
        high = None
        if high_noise_model is not None:
            from .comfy_experts import HighNoiseExpert

            high = HighNoiseExpert(high_noise_model.clone(), given, config.seed)
        sampler = TrainSampler(data.images, data.captions, config, existing, captions.uncond, extras, data.samples,
                               held, text_encoder, reporter, model if adapter is not None else None, high)
        patcher = model.clone() if adapter is None else with_training_adapter(model, adapter)
        if text_encoder is not None:
            text_encoder.load_with(patcher)
        if config.offload:
            _offload(patcher)
        guider = Guider_Basic(patcher)
        guider.set_conds(given)
        dummy = torch.zeros((1, *images[0].shape))  # all zeros: the guider leaves it unprocessed
        reporter.phase("loading the model")
        try:
            guider.sample(dummy, dummy, sampler, torch.tensor([1.0, 0.0]), seed=config.seed)
        except EstimateOnly:  # the estimate command: written, nothing trained; end the workflow here
            log.info("Train LoRA: memory estimated; not training (%s is set)", ESTIMATE_MODE)
            raise comfy.model_management.InterruptProcessingException() from None
        except comfy.model_management.InterruptProcessingException:  # raised by ComfyUI's progress hook
            _log_cancel(sampler.steps_done, config.steps, None)
            raise
    return _outputs(model, sampler, existing, config, adapter)


def _preservation_of(captions: _Captions, data: Expanded) -> list[list[int]] | None:
    """Each engine image's preservation caption: an alternative (flipped copy, caption variant) takes its
    original image's; a regularisation image keeps its own caption."""
    if captions.preservation is None:
        return None
    origin = {}
    for alternatives in data.samples.alternatives:
        for image in alternatives:
            origin[image] = alternatives[0]
    return [captions.preservation[origin[i]] for i in range(len(data.images))] + captions.regular


def _offload(patcher) -> None:
    """The options node's offload: ComfyUI loads the model partially for the run (`prepare_sampling`'s
    force_offload, what core's trainer asks for), so the frozen weights stay in RAM and each layer's are
    cast onto the GPU as it runs; under gradient checkpointing one block's at a time are kept."""
    import comfy.patcher_extension
    import comfy.sampler_helpers

    problem = partial_load_problem(comfy.sampler_helpers, comfyui_version())
    if problem is not None:
        raise ValueError(problem)
    if patcher.load_device.type == "cpu":
        log.info("Train LoRA: offload is on but ComfyUI computes on the CPU, where the weights already are")
        return

    def partial(executor, model, noise_shape, conds, model_options=None, force_full_load=False, force_offload=False):
        return executor(model, noise_shape, conds, model_options=model_options, force_full_load=False,
                        force_offload=True)

    comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING,
                                                 "lora_trainer_offload", partial, patcher.model_options,
                                                 is_model_options=True)


def _outputs(model, sampler: TrainSampler, existing: Existing, config: TrainConfig,
             adapter: TrainingAdapter | None = None) -> dict:
    """The five outputs and the previews' UI entry; ComfyUI's cancel exception when the run was cancelled."""
    result = sampler.result
    if result is None or result.cancelled:
        _log_cancel(0 if result is None else len(result.losses), config.steps,
                    None if result is None else result.checkpoint)
        # ComfyUI's cancel: its flag is cleared once a progress hook raised, so raise its exception here
        raise comfy.model_management.InterruptProcessingException()
    unet, _ = split_text_encoder(result.lora)  # a trained text encoder's part applies to a CLIP (Load LoRA Model)
    model_with_lora, _ = comfy.sd.load_lora_for_models(model, None, unet, 1.0, 0)
    # the text-encoder part of a continued LoRA that is not trained goes into the output untouched
    metadata = dict(result.lora.metadata)
    if adapter is not None:  # trained with it on, used without it: the file says so
        metadata[METADATA_PREFIX + "training_adapter"] = json.dumps({"name": adapter.name, "strength": adapter.strength})
    lora = LoraStateDict({**result.lora, **(existing.text_encoder or {})}, metadata)
    if result.experts:  # both experts trained: the value carries each one's LoRA (Save LoRA writes both)
        lora = result.lora
    loss = {"loss": result.losses, **({EXPERTS_KEY: result.experts} if result.experts else {})}
    if result.validation:
        loss[VALIDATION_STEP] = [step for step, _ in result.validation]
        loss[VALIDATION_LOSS] = [value for _, value in result.validation]
    previewer = sampler.previewer
    outputs = (model_with_lora, lora, loss, result.total_steps, previewer.grid() if previewer else _blank_image())
    return {"ui": {"images": previewer.ui()} if previewer else {}, "result": outputs}


def _log_samples(n_images: int, data: Expanded) -> None:
    """One line when the data carries more than latents: alternatives, repeats, masks."""
    samples = data.samples
    extra = len(data.images) - n_images
    masked = 0 if samples.masks is None else sum(1 for m in samples.masks[:n_images] if m is not None)
    if extra or len(samples) != n_images or masked:
        log.info("Train LoRA: %d samples drawn from (repeats counted), %d images, %d more alternatives (flipped "
                 "copies, caption variants), %d with a loss mask", len(samples), n_images, extra, masked)


def _batch_sizes(latents: list[dict]) -> list[int]:
    return [l["samples"].shape[0] for l in latents]


def _log_speed(per_step: tuple[float, int] | None, device: torch.device) -> None:
    """One log line: the time per step after the first, and on CUDA the peak memory torch allocated during
    the training (weights loaded before included)."""
    if per_step is None:
        return
    peak = (f"; peak {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MiB allocated on {device}"
            if device.type == "cuda" else "")
    log.info("Train LoRA: %.4f s/step over %d steps after the first%s", per_step[0], per_step[1], peak)


def _blank_image() -> torch.Tensor:
    """The previews output when no preview is connected: one small black IMAGE."""
    return torch.zeros((1, 64, 64, 3))


def _latents(latents: list[dict], base_model, what: str) -> list[torch.Tensor]:
    """LATENTs → single latents (clones) that fit the model (training/data.py `model_latents`); `what`
    names the input in errors."""
    latent_format = getattr(base_model, "latent_format", None)
    images = model_latents([_clone_tree(l["samples"]) for l in latents], getattr(latent_format, "latent_channels", None),
                           getattr(latent_format, "latent_dimensions", None), type(base_model.model_config).__name__,
                           what)
    return images


def _log_cancel(done: int, steps: int, checkpoint: str | None) -> None:
    kept = (f"; the checkpoint and training state of step {done} are in {checkpoint} (set the options node's resume "
            "to 'latest' and queue again to continue)") if checkpoint else ""
    log.warning("Train LoRA: cancelled after %d of %d steps; the model is restored%s", done, steps, kept)
