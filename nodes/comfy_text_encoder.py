"""ComfyUI glue for a trained text encoder (LoRA Text Encoder, nodes/text_encoder.py).

- Which CLIP modules train (`TrainedTextEncoder.parts`): the transformer of each CLIP that
  nodes/families.py `TEXT_ENCODERS` lists for the CLIP's class (SD1.x: CLIP-L; SDXL: CLIP-L, CLIP-G);
  any other text encoder is refused, naming text_encoder_lr.
- Each caption entry's text (`entry_texts`): its own, kept by this pack's encoders, else the `captions`
  input's; each text tokenized once.
- At every model call, an entry with a text is encoded again through the adapted CLIP, with gradients,
  by the CLIP's own `encode_from_tokens` (so the layer, CLIPSetLastLayer's included, and the pooled output
  are what CLIPTextEncode gives for the family), and prepared for the model at its latent shape by
  ComfyUI's `encode_model_conds` (SDXL's size embedding from the pooled output included) (`LiveEntries`).
  Entries without a text (an empty caption from CLIPTextEncode) keep their encoding.
- A continued LoRA's text-encoder layers (`lora_te_…`, `lora_te1_…`, `text_encoder.…`) continue training.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Sequence

import torch

from ..lora import LayerWeights, resolve_state_dict
from ..lora.naming import TEXT_ENCODER_PARTS, text_encoder_prefixes
from ..training.loop import TextEncoderPart
from .comfy_conds import ShapedConds
from .options import TextEncoderInput
from .text_encoder import entry_texts, trained_clips

log = logging.getLogger(__name__)


class TrainedTextEncoder(NamedTuple):
    """The CLIP that trains, its parts for the engine, and the text of each entry that is encoded again."""

    clip: object
    parts: list[TextEncoderPart]
    texts: dict[int, str]

    def load_with(self, patcher) -> None:
        """Have ComfyUI load the CLIP with the model it trains (an additional model of the training patcher), so
        neither pushes the other out of the GPU's memory; a ComfyUI without additional models loads it alone."""
        if hasattr(patcher, "set_additional_models"):
            patcher.set_additional_models("lora_trainer_text_encoder", [self.clip.patcher])

    def release(self, release_tensors) -> None:
        """Load the CLIP where it computes and make its weights usable by autograd (`release_tensors`, the
        host's per-tensor swap for inference tensors, values bit-identical)."""
        self.clip.load_model()
        for part in self.parts:
            release_tensors(part.module)


def trained_text_encoder(given: TextEncoderInput | None, lr: float, entries: list,
                         training: list[list[int]]) -> TrainedTextEncoder | None:
    """What LoRA Text Encoder asks to train, checked; None when text_encoder_lr is 0."""
    if not lr:
        if given is not None:
            log.info("Train LoRA: LoRA Text Encoder is connected but its text_encoder_lr is 0; only the diffusion "
                     "model trains")
        return None
    if given is None or given.clip is None:
        raise ValueError(f"text_encoder_lr: got {lr}, but no text encoder is connected; connect the model's CLIP "
                         "to a LoRA Text Encoder node, or set text_encoder_lr to 0")
    model = given.clip.cond_stage_model
    names = trained_clips(type(model).__name__, lr)
    device = given.clip.patcher.load_device
    parts = [TextEncoderPart(getattr(model, name).transformer, prefix, device)
             for name, prefix in zip(names, TEXT_ENCODER_PARTS)]
    texts = entry_texts(entries, training, given.captions)
    log.info("Train LoRA: the text encoder trains too (%s, text_encoder_lr %s) on %d caption texts, each encoded "
             "again at every step; %d other conditioning entries keep their encoding", " and ".join(names), lr,
             len(texts), len(entries) - len(texts))
    return TrainedTextEncoder(given.clip, parts, texts)


class LiveEntries(Sequence):
    """The guider's prepared entries (`ShapedConds.entries`) as the predictions read them: an entry with a
    text is encoded through the (adapted) CLIP anew each time it is read, with gradients, and prepared at
    its latent shape; the others are as prepared."""

    def __init__(self, trained: TrainedTextEncoder, conds: ShapedConds):
        self.clip, self.conds = trained.clip, conds
        self.tokens = {e: trained.clip.tokenize(text) for e, text in trained.texts.items()}  # once

    def __len__(self) -> int:
        return len(self.conds.entries)

    def __getitem__(self, index: int):
        entry = self.conds.entries[index]
        origin, shape = self.conds.source(index)
        tokens = self.tokens.get(origin)
        if tokens is None:
            return entry
        # ComfyUI's CLIP adds residuals in place (`x += attn(norm(x))`) onto tensors its norms saved for
        # backward: what backward needs is kept as it was when saved (activations only; weights are leaves)
        with torch.autograd.graph.saved_tensors_hooks(_kept, _same):
            encoded = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        return self.conds.prepare({**entry, "cross_attn": encoded["cond"], "pooled_output": encoded["pooled_output"]},
                                  shape)


def _kept(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.is_leaf else tensor.clone()


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def continued_text_encoder(sd: dict, parts: list[TextEncoderPart], name: str) -> tuple[dict[str, LayerWeights], dict]:
    """A continued LoRA's text-encoder tensors → (the trained parts' layers, by their prefixed paths; the
    tensors of no trained part, kept as they are). Keys as kohya (`lora_te1_…`) or diffusers
    (`text_encoder.…`) write them."""
    file_prefixes = text_encoder_prefixes(len(parts))
    layers: dict[str, LayerWeights] = {}
    left = dict(sd)
    for part in parts:
        ours = file_prefixes[part.prefix]
        mine = {k: t for k, t in sd.items() if k.startswith((ours, part.prefix))}
        if not mine:
            continue
        paths = [p for p, _ in part.module.named_modules() if p]
        aliases = {**{ours + p.replace(".", "_"): p for p in paths}, **{part.prefix + p: p for p in paths}}
        found = resolve_state_dict(mine, part.module, aliases, label=f"existing_lora {name!r}")
        layers.update({part.prefix + path: weights for path, weights in found.items()})
        for k in mine:
            del left[k]
    return layers, left
