"""Test-only ComfyUI nodes (not part of the pack) for test_family_matrix.py: each family's tiny model where
it cannot be a file, its latents and its conditioning, without a VAE or a text encoder.

The `comfy_matrix` fixture links this file into its server's custom_nodes/; it loads make_families.py
(the specs and the builder) from beside its real path. Every node takes a `family`, a key of make_families.SPECS, which says the shapes.
- ITMatrixModel: the family's model built in-process at toy width from its `comfy.supported_models`
  class (make_families.build), returned as a MODEL, as UNETLoader would. Only for the families whose
  toy-width file ComfyUI's detection cannot read back; it refuses the others (load them with UNETLoader)
  and fails if detection would now read the toy model back (then it should be a file).
- ITMatrixLatents: one LATENT of `count` samples at the family's channels, 4-D for an image family,
  5-D (frames from the spec) for a video family, 8×8 latent pixels: smooth seeded patterns at about half
  a VAE's latent scale, drifting one latent pixel per frame (something a model can learn, not white noise;
  at unit scale the losses fell less in the same steps);
  `empty` gives zeros of the same shape, the sampler's starting latent.
- ITMatrixConditioning: a seeded context (1, tokens, the family's text-encoder width) and the extra keys
  the family's model reads (pooled output, attention mask, guidance, Llama layers, frame rate...).
"""
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

_SEED = ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})


def _specs():
    """make_families.py, loaded from beside this file (its real path: custom_nodes holds a link)."""
    name = "lora_trainer_it_make_families"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("make_families.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _family():
    return (sorted(_specs().SPECS), {"default": "zimage"})


class ITMatrixModel:
    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": _family(), "seed": _SEED}}

    def load(self, family, seed):
        make = _specs()
        if make.SPECS[family].file:
            raise ValueError(f"family: {family} is a file (make_families.py writes it): load it with UNETLoader")
        patcher = make.build(family, seed)
        if make.detection_reads_back(family, patcher.model.diffusion_model.state_dict()):
            raise RuntimeError(f"ComfyUI's detection now reads the toy {family} back: make it a file instead")
        return (patcher,)


class ITMatrixLatents:
    CATEGORY = "testing"
    FUNCTION = "make"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": _family(), "seed": _SEED,
                             "count": ("INT", {"default": 2, "min": 1, "max": 16}),
                             "empty": ("BOOLEAN", {"default": False})}}

    def make(self, family, seed, count, empty):
        spec = _specs().SPECS[family]
        frames = spec.frames or 1
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.randn((count, spec.channels, 2, 2), generator=generator)
        image = F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False) * 0.5
        clip = torch.stack([image.roll(t, dims=-1) for t in range(frames)], dim=2)
        samples = clip if spec.frames else clip[:, :, 0]
        return ({"samples": torch.zeros_like(samples) if empty else samples},)


class ITMatrixConditioning:
    CATEGORY = "testing"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": _family(), "seed": _SEED}}

    def encode(self, family, seed):
        make = _specs()
        spec = make.SPECS[family]
        generator = torch.Generator().manual_seed(seed)
        context = torch.randn((1, spec.tokens, spec.context), generator=generator)
        extra = {}
        for key, value in spec.extra.items():
            if isinstance(value, make.ONES):
                extra[key] = torch.ones((1, *value), dtype=torch.long)  # as a tokenizer's mask: integers
            elif isinstance(value, make.RANDN):
                extra[key] = torch.randn((1, *value), generator=generator)
            else:
                extra[key] = value
        return ([[context, extra]],)


NODE_CLASS_MAPPINGS = {"ITMatrixModel": ITMatrixModel, "ITMatrixLatents": ITMatrixLatents,
                       "ITMatrixConditioning": ITMatrixConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {k: f"{k} (test only)" for k in NODE_CLASS_MAPPINGS}
