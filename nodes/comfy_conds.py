"""ComfyUI glue: caption entries prepared at each latent size, and the check that a model taking an image
beside the latent is given one.

ComfyUI prepares a guider's conditioning once per run, at the size of the latent it samples
(`encode_model_conds` gives each entry its `model_conds` from that noise): an image beside the latent
(`concat_latent_image`) is resized to it, SDXL's size values default to it. Train LoRA runs one guider
over latents of several sizes, so:
- the inputs an entry carries at a latent's shape (tensors of 4 or more dimensions, or lists of them:
  a start frame, an inpainting image and its mask, reference latents) are held back from the guider
  (nodes/conditioning.py `hold_latent_inputs`), which could not fit a 3-frame start frame to a 2-frame clip;
- each entry is prepared again where an image of another size uses it, and an entry with held inputs
  wherever it is used, once per (entry, size), as ComfyUI's own `encode_model_conds` prepares it. Entries
  without held inputs at the first image's size are ComfyUI's own, so one-size data trains as before.
"""
from __future__ import annotations

from typing import Sequence

import comfy.conds
import comfy.samplers
import torch

from . import families
from .conditioning import CONCAT_KEY


def _check_noise_shaped(prepared: dict, shape: tuple[int, ...]) -> None:
    """What ComfyUI concatenates to the noisy latent (`CONDNoiseShape`, e.g. `c_concat`) must match its
    frames, height and width: a 3-frame start frame fitted to a 2-frame clip keeps its 3 frames."""
    for name, cond in prepared.get("model_conds", {}).items():
        if isinstance(cond, comfy.conds.CONDNoiseShape) and tuple(cond.cond.shape[2:]) != shape[1:]:
            raise ValueError(f"{name} has shape {list(cond.cond.shape[1:])}")


class ShapedConds:
    """`entries` (the guider's prepared positive conds) plus copies prepared at latent shapes, with their
    `held` inputs (`hold_latent_inputs`) back."""

    def __init__(self, entries: list, held: dict[int, dict], base_model, device: torch.device,
                 prepared_at: tuple[int, ...], seed: int):
        self.entries = list(entries)  # grows with the copies; predictions index into this very list
        self.held = held
        self.base, self.device, self.prepared_at, self.seed = base_model, device, tuple(prepared_at), seed
        self._copies: dict[tuple[int, tuple[int, ...], bool], int] = {}
        self._copied_from: dict[int, tuple[int, tuple[int, ...]]] = {}  # copy → (its entry, its shape)

    def source(self, index: int) -> tuple[int, tuple[int, ...]]:
        """(the entry, the latent shape) that the prepared entry at `index` is."""
        return self._copied_from.get(index, (index, self.prepared_at))

    def index(self, entry: int, shape: Sequence[int], bare: bool = False) -> int:
        """The index of `entry` prepared for latents of `shape` (C, …), preparing it on first use; `bare`:
        without its held inputs (control dropout). A ValueError naming `positive` when its held inputs do
        not fit that shape."""
        shape = tuple(shape)
        held = {} if bare else self.held.get(entry, {})
        if (shape == self.prepared_at and not held) or not hasattr(self.base, "extra_conds"):
            return entry  # the guider prepared it at this shape without the held inputs
        key = (entry, shape, bare and entry in self.held)
        if key not in self._copies:
            try:
                prepared = self.prepare({**self.entries[entry], **held}, shape)
                _check_noise_shaped(prepared, shape)
            except (RuntimeError, ValueError) as e:
                raise ValueError(
                    f"positive: conditioning entry {entry + 1} carries {', '.join(sorted(held)) or 'inputs'} that do "
                    f"not fit a latent of shape {list(shape)} it is used with ({e}). Give each image or clip the "
                    "conditioning made from it (for example its own WanImageToVideo or InpaintModelConditioning "
                    "at its size and length)") from e
            self._copies[key] = len(self.entries)
            self._copied_from[len(self.entries)] = (entry, shape)
            self.entries.append(prepared)
        return self._copies[key]

    def prepare(self, entry: dict, shape: Sequence[int]) -> dict:
        """`entry` prepared for the model at latents of `shape` (C, …), as the guider prepares its conds
        (ComfyUI's `encode_model_conds` over the model's `extra_conds`)."""
        noise = torch.zeros((1, *shape), device=self.device)
        prepared, = comfy.samplers.encode_model_conds(self.base.extra_conds, [entry], noise, self.device, "positive",
                                                      latent_image=noise, denoise_mask=None, seed=self.seed)
        return prepared

    def captions(self, captions: Sequence[Sequence[int]], shapes: Sequence[Sequence[int]],
                 bare: bool = False) -> list[list[int]]:
        """Each image's caption entries, prepared at its latent's shape (`bare`: without held inputs)."""
        return [[self.index(e, shape, bare) for e in caption] for caption, shape in zip(captions, shapes)]


def extra_channels(latent: torch.Tensor, base_model) -> str:
    """What the model takes beside the noisy latent, for messages (" (16 + 20 input channels)"), or "" when
    nothing: channels ComfyUI concatenates to it (`concat_cond`: Wan image-to-video's start-frame latent
    and mask, inpainting models' masked image, Flux Fill's), probed with blanks as sampling gives them."""
    concat = getattr(base_model, "concat_cond", None)
    if concat is None:
        return ""
    noise = torch.zeros((1, *latent.shape))
    try:
        extra = concat(noise=noise, latent_image=noise, device=noise.device)
    except Exception:  # it needs an input beside the latent that only a conditioning node gives
        return " (more input channels)"
    if extra is None:
        return ""
    return f" ({latent.shape[0]} + {extra.shape[1]} input channels)" if isinstance(extra, torch.Tensor) else " "


def check_conditioned(base_model, images: list[torch.Tensor], entries: list, used: set[int]) -> None:
    """A model that takes an image beside the latent trains only when every caption it uses carries one
    (`concat_latent_image`, as WanImageToVideo or InpaintModelConditioning set it); else a ValueError
    naming the node that gives it (nodes/families.py). Several latent sizes are fine: each caption is
    prepared at its images' size (ShapedConds)."""
    extra = extra_channels(images[0], base_model)
    carried = [isinstance(entries[e][1], dict) and entries[e][1].get(CONCAT_KEY) is not None
               for e in sorted(used)]
    problem = families.conditioned_input_problem(type(base_model).__name__, type(base_model.model_config).__name__,
                                                 extra, carried)
    if problem:
        raise ValueError(problem)
