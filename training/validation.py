"""The validation loss: the denoising loss on held-out latents at fixed noises and fixed noise levels.

`Validation.loss()` is the number training/loop.py records every `every` steps (a `Validator`).
Everything random is drawn once, at construction, from a generator of its own (`VALIDATION_SEED`),
never from the training stream or the global RNG: the same weights give the same number
bit-for-bit, and measuring it leaves the trained LoRA unchanged.
- noise levels: `noise_levels` percents through the model's own schedule, the midpoints of equal
  bins ((k + ½)/L, k = 0…L−1; 0 = most noise; training/evaluate.py's `level_percents`, as the
  engine's `heldout_loss` takes them), mapped by the host's `percent_to_sigma`; every
  image is measured at every level. The training options that reshape the draw (timestep
  sampling, min/max timestep, flow shift override) do not apply: the yardstick stays the same
  whatever the run trains with.
- noises: plain ε ~ N(0, I), one per image and level, drawn in image order (no offset or pyramid).
- the loss: the config's loss function in the config's loss space (native or x0, as
  training/objective.py), unweighted (no min-SNR or debiasing), the mean over images × levels,
  under no_grad and the training's autocast (`training_dtype`).
The pairs run in same-shape batches of at most `config.batch_size` (what training already fits,
and without gradients it needs less), in a fixed order, so the result does not vary between calls.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from .config import TrainConfig
from .data import group_by_shape
from .evaluate import level_percents
from .objective import ModelFns, loss_function, output_coefficient, space_loss

VALIDATION_SEED = 271828182  # its own stream: never the training seed's


class _Chunk(NamedTuple):
    """One same-shape batch of (image, level) pairs, fixed at construction. Shapes: (B, C, H, W) or
    (B, C, T, H, W) for video, (B,)."""

    noisy: torch.Tensor
    sigma: torch.Tensor
    target: torch.Tensor  # x0
    coefficient: torch.Tensor  # c(σ) (B, 1, …) of the latents' rank: native error = x0 error / c
    indices: list[int]  # into the validation latents, for the host's conditioning


def validation_images(latents: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """(N, C, H, W), or a list of (N, C, H, W) or (C, H, W) tensors → N single (C, H, W) latents;
    video batches (N, C, T, H, W) → N single (C, T, H, W) latents (a 4-D tensor is a batch of images)."""
    batches = [latents] if isinstance(latents, torch.Tensor) else list(latents)
    images: list[torch.Tensor] = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, torch.Tensor) or batch.dim() < 3:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"validation latents[{i}]: got {shape}; give VAE-encoded latents shaped "
                             "(batch, channels, height, width), or (batch, channels, frames, height, width) for "
                             "video, e.g. from VAE Encode")
        images.extend(batch.unbind(0) if batch.dim() >= 4 else [batch])
    if not images:
        raise ValueError("validation latents: no images; connect at least one VAE-encoded held-out image to the "
                         "LoRA Validation Set node's latents, or disconnect the validation input")
    return images


class Validation:
    """A `Validator` (training/loop.py): `loss()` on the held-out latents, measured every `every` steps.

    fns: the host's callables; `denoise(noisy, sigma, indices)` takes indices into these latents
    (so their captions may differ from the training ones). latents: as `validation_images` takes
    them, already in the model's latent space (ComfyUI: after `process_latent_in`).
    """

    def __init__(self, fns: ModelFns, latents: torch.Tensor | Sequence[torch.Tensor], config: TrainConfig,
                 every: int, noise_levels: int = 5):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"validation every: got {every!r}; give 1 or more steps")
        if not isinstance(noise_levels, int) or noise_levels < 1:
            raise ValueError(f"validation noise_levels: got {noise_levels!r}; give 1 or more levels")
        images = validation_images(latents)
        self.fns, self.config, self.every, self.noise_levels = fns, config, every, noise_levels
        self.images = len(images)
        self.loss_fn = loss_function(config.loss_function)
        device = images[0].device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.training_dtype == "bf16")
        self.chunks = self._fix(images, fns.percent_to_sigma(level_percents(noise_levels)).float())

    def _fix(self, images: list[torch.Tensor], sigmas: torch.Tensor) -> list[_Chunk]:
        """Draw the noises (image order) and build the same-shape batches of (image, level) pairs."""
        generator = torch.Generator().manual_seed(VALIDATION_SEED)
        noises = [torch.randn((self.noise_levels, *x.shape), generator=generator) for x in images]
        pairs = [(i, level) for group in group_by_shape(range(len(images)), images)
                 for i in group for level in range(self.noise_levels)]
        built = []
        for part in _split_at_shapes(pairs, images, max(1, self.config.batch_size)):
            x0 = torch.stack([images[i] for i, _ in part])
            noise = torch.stack([noises[i][level] for i, level in part]).to(x0.device, x0.dtype)
            sigma = sigmas[[level for _, level in part]].to(x0.device)
            built.append(_Chunk(self.fns.noise_scaling(sigma, noise, x0), sigma, x0,
                                output_coefficient(self.fns, sigma, x0.dim()), [i for i, _ in part]))
        return built

    @property
    def measurements(self) -> int:
        """How many (image, level) pairs one `loss()` measures."""
        return self.images * self.noise_levels

    @torch.no_grad()
    def loss(self, progress: Callable[[int], None] | None = None) -> float:
        """The mean loss over every image × level with the current weights (deterministic); `progress(done)`
        after each batch, with the (image, level) pairs measured so far."""
        total, done = 0.0, 0
        for chunk in self.chunks:
            with self.autocast:
                pred = self.fns.denoise(chunk.noisy, chunk.sigma, chunk.indices)
            per = space_loss(self.loss_fn, pred.float(), chunk.target, chunk.coefficient, self.config.loss_space)
            total += float(per.sum())
            done += len(chunk.indices)
            if progress is not None:
                progress(done)
        return total / self.measurements


def _split_at_shapes(pairs: list[tuple[int, int]], images: list[torch.Tensor], size: int) -> list[list[tuple[int, int]]]:
    """Consecutive (image, level) pairs → batches of at most `size`, each of one latent shape."""
    chunks: list[list[tuple[int, int]]] = []
    for pair in pairs:
        last = chunks[-1] if chunks else None
        if last is None or len(last) == size or images[last[0][0]].shape != images[pair[0]].shape:
            chunks.append([pair])
        else:
            last.append(pair)
    return chunks
