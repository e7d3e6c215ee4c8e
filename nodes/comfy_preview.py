"""ComfyUI glue for Train LoRA's previews (docs/long-runs.md#sample-previews): the preview prompt, sampled with the LoRA as it trains.

`Previewer.take(step)` samples the way core's EmptyLatentImage → KSampler does (`nodes.common_ksampler`):
an empty latent fitted to the model's latent format by `comfy.sample.fix_empty_latent_channels` (its
channels and downscale, so every family works), `comfy.sample.prepare_noise` from the seed, and
`comfy.sample.sample` with the sampler and scheduler. The adapters sit in the live diffusion model,
so the sample is the current LoRA's. The latent is decoded by the VAE, or without one by ComfyUI's
latent previewer (`latent_preview`: the user's choice of TAESD, else the latent format's RGB
factors), shown on Train LoRA's progress bar (ComfyUI's binary progress preview, the bar kept at the
training step) and saved as `<prefix>_<step>_steps_<counter>_.png` in the output folder.

Nesting: take() runs inside the training guider's `sample()`, so it samples with a guider of its
own (comfy.sample.sample's CFGGuider) on a clone of the training patcher: ComfyUI's model management
finds the model it loaded for training (a clone shares it; the same patches mean no re-patching)
and keeps training's guider untouched. One thing leaks out and is put back: the inner guider's
cleanup sets the base model's `current_patcher` to None, which training's next model call reads.
training/isolation.py keeps the RNG streams, module modes and grad mode as they were.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import comfy.model_management
import comfy.sample
import folder_paths
import latent_preview
import numpy as np
import torch
from PIL import Image

from ..lora.files import steps_name, write_atomically
from ..lora.patching import restoring
from ..training.grid import labelled_grid
from ..training.isolation import isolated
from .compat import fitted_empty_latent, intermediate_dtype, latent_rgb_previewer
from .paths import PrefixInput, next_free, output_target
from .preview import PreviewSettings

log = logging.getLogger(__name__)

PREVIEW_PREFIX = PrefixInput("filename_prefix", "preview", "lora_previews/my_run")
_EMPTY_LATENT = (4, 8)  # core's EmptyLatentImage: 4 channels, 1/8 of the pixels; fitted to the model after


def _latent_rgb(latent_format) -> latent_preview.LatentPreviewer:
    if latent_format.latent_rgb_factors is None:
        raise ValueError(f"vae: ComfyUI's latent previewer has no colours for this model's latents "
                         f"({type(latent_format).__name__}); connect a VAE to LoRA Training Preview's vae input")
    return latent_rgb_previewer(latent_preview, latent_format)


def _check_vae(vae, latent_format, model_name: str) -> None:
    """The preview's VAE decodes this model's latents: its latent channels are the model's. Else a
    ValueError naming the preview's `vae` and both sides, before training starts (a 16-channel VAE on
    an SD1.5 model, or VAELoader's `pixel_space`, which takes 3-channel pixels as its latents)."""
    theirs = getattr(vae, "latent_channels", None)
    ours = getattr(latent_format, "latent_channels", None)
    if not isinstance(theirs, int) or not isinstance(ours, int) or theirs == ours:
        return
    kind = " (pixel_space: it treats pixels as latents)" if getattr(vae, "downscale_ratio", None) == 1 else ""
    raise ValueError(f"vae: LoRA Training Preview's VAE decodes {theirs}-channel latents{kind}, but this model "
                     f"({model_name}) makes {ours}-channel latents; connect the VAE that belongs to this model (e.g. "
                     "its checkpoint loader's VAE output), or leave the preview's vae empty to use ComfyUI's "
                     "latent previewer")


def _rgb(image: np.ndarray, vae) -> np.ndarray:
    """A decoded (H, W, 3) uint8 image as it is; a ValueError naming the preview's `vae` for any other shape:
    never a 4-channel image for the progress bar's JPEG (which ComfyUI encodes where nothing catches)."""
    if image.ndim == 3 and image.shape[-1] == 3:
        return image
    raise ValueError(f"vae: LoRA Training Preview's VAE ({type(getattr(vae, 'first_stage_model', vae)).__name__}) "
                     f"decoded an image of shape {tuple(image.shape)}, not an RGB picture; connect the VAE that "
                     "belongs to the model, or leave the preview's vae empty")


class Previewer:
    """Train LoRA's previews: `due(step)` and `take(step)` while training, `grid()` and `ui()` at the end."""

    def __init__(self, settings: PreviewSettings, model_patcher, total_steps: int, ui_bar,
                 after: Callable[[], None] | None = None) -> None:
        self.settings, self.patcher, self.total, self.ui_bar = settings, model_patcher, total_steps, ui_bar
        self.after = after  # run after each preview's sampling (a training adapter: load training's model back)
        latent_format = model_patcher.get_model_object("latent_format")
        if settings.vae is not None:
            _check_vae(settings.vae, latent_format, type(model_patcher.model.model_config).__name__)
        # ComfyUI's sampler previews (None unless the user turned them on): shown while a preview samples
        self.live = latent_preview.get_previewer(model_patcher.load_device, latent_format)
        self.decoder = None if settings.vae is not None else (self.live or _latent_rgb(latent_format))
        self.cfg = settings.cfg if settings.negative is not None else 1.0
        if settings.negative is None and settings.cfg != 1.0:
            log.info("LoRA Training Preview: no negative connected, so the previews sample at cfg 1 (not %s); "
                     "connect a negative to use cfg", settings.cfg)
        self.output = Path(folder_paths.get_output_directory()).resolve()
        self.folder, self.stem = output_target(self.output, settings.filename_prefix, PREVIEW_PREFIX)
        self.taken: list[tuple[int, Path]] = []  # (step, PNG); the pixels are read back for the grid

    def vae_bytes(self) -> int:
        """The weights of the preview's VAE (it joins the model on the device to decode), 0 without one."""
        vae = self.settings.vae
        model = getattr(vae, "first_stage_model", None) if vae is not None else None
        return sum(t.numel() * t.element_size() for t in model.state_dict().values()) if model is not None else 0

    def due(self, step: int) -> bool:
        """Every `every` steps, and the last step."""
        return step % self.settings.every == 0 or step == self.total

    @property
    def steps(self) -> int:
        """The sampler steps of one preview."""
        return self.settings.steps

    def take(self, step: int, progress: Callable[[int], None] | None = None) -> None:
        """Sample, decode, show and save the preview after `step` steps; `progress(i)` after sampler step i.
        A cancel raises ComfyUI's InterruptProcessingException (from the sampler's callback or the
        progress hook)."""
        base = self.patcher.model
        # training's guider set the base model's current_patcher; a nested guider's cleanup clears it
        with isolated(base), restoring(base.__dict__, ["current_patcher"]):
            try:
                latent = self._sample(step, progress)
            finally:
                if self.after is not None:
                    self.after()
            pixels = self._decode(latent)
        image = Image.fromarray(pixels)  # RGB: _decode checks the VAE's, the latent previewer's is converted
        path = next_free(self.folder, lambda n: steps_name(self.stem, step, n, ".png"))
        write_atomically(path, lambda tmp: image.save(tmp, format="PNG"), "preview")
        self.taken.append((step, path))
        self.ui_bar.update_absolute(step, self.total, ("JPEG", image, latent_preview.MAX_PREVIEW_RESOLUTION))

    def grid(self) -> torch.Tensor:
        """Every preview in one image, each under its step, oldest first: IMAGE (1, H, W, 3), float 0..1."""
        if not self.taken:
            return torch.zeros((1, 64, 64, 3))
        images = []
        for _, path in self.taken:
            with Image.open(path) as img:
                images.append(np.asarray(img.convert("RGB")))
        grid = labelled_grid(images, [f"step {step}" for step, _ in self.taken])
        return torch.from_numpy(grid.astype(np.float32) / 255.0)[None]

    def ui(self) -> list[dict]:
        """ComfyUI's image entries for the saved previews (the node shows them)."""
        entries = []
        for _, path in self.taken:
            subfolder = path.parent.relative_to(self.output).as_posix()
            entries.append({"filename": path.name, "subfolder": "" if subfolder == "." else subfolder,
                            "type": "output"})
        return entries

    def _sample(self, step: int, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """The preview's latent (1, C, h, w), as comfy.sample.sample returns it (the VAE's space)."""
        s = self.settings
        channels, downscale = _EMPTY_LATENT
        empty = torch.zeros([1, channels, s.height // downscale, s.width // downscale],
                            device=comfy.model_management.intermediate_device(),
                            dtype=intermediate_dtype(comfy.model_management))
        patcher = self.patcher.clone()  # sampled by a guider of its own: training's stays as it is
        latent = fitted_empty_latent(comfy.sample, patcher, empty, downscale)
        noise = comfy.sample.prepare_noise(latent, s.seed)
        negative = s.negative if s.negative is not None else []
        return comfy.sample.sample(patcher, noise, s.steps, self.cfg, s.sampler_name, s.scheduler, s.positive,
                                   negative, latent, callback=self._callback(step, progress), disable_pbar=True,
                                   seed=s.seed)

    def _callback(self, step: int, progress: Callable[[int], None] | None = None):
        def callback(i: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()  # cancel during a long preview
            if progress is not None:
                progress(i + 1)
            if self.live is not None:
                self.ui_bar.update_absolute(step, self.total, self.live.decode_latent_to_preview_image("JPEG", x0))

        return callback

    def _decode(self, samples: torch.Tensor) -> np.ndarray:
        """uint8 RGB (H, W, 3): the VAE's decode (its first frame), else the latent previewer's, resized."""
        s = self.settings
        if s.vae is not None:
            images = s.vae.decode(samples)  # (B, H, W, 3) or (B, T, H, W, 3), 0..1
            image = images.reshape(-1, *images.shape[-3:])[0].float().cpu().numpy()
            return _rgb(np.clip(image * 255.0, 0, 255).astype(np.uint8), s.vae)  # as SaveImage converts
        latent = self.patcher.get_model_object("latent_format").process_in(samples)  # the sampler's x0 space
        image = self.decoder.decode_latent_to_preview(latent).convert("RGB")
        if image.size != (s.width, s.height):
            image = image.resize((s.width, s.height), Image.BILINEAR)
        return np.asarray(image)
