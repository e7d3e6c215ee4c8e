"""LyCORIS-layout state dicts for one layer, with non-zero tensors: the forms we continue but never create.

Shared by test_algos_lycoris.py (offline) and integration/core_loader_check.py (against ComfyUI's
loader); only torch is imported, so ComfyUI's Python can load it too. Layouts as LyCORIS writes them
and ComfyUI's loader reads them (comfy/weight_adapter/lora.py, loha.py, lokr.py, base.py):

- locon_tucker: lora_down (r, in, 1, 1), lora_mid (r, r, *kernel), lora_up (out, r, 1, 1);
- loha_tucker: hada_w{1,2}_a (r, out), hada_w{1,2}_b (r, in), hada_t{1,2} (r, r, *kernel);
- lokr_tucker: lokr_w1 (out_a, in_a) (or lokr_w1_a @ lokr_w1_b), lokr_w2_a (r, out_b),
  lokr_w2_b (r, in_b), lokr_t2 (r, r, *kernel);
- dora_output / dora_input: LoRA plus dora_scale (out, 1, ...) (LyCORIS's default, `wd_on_output`)
  or (1, in, ...); dora_output_tucker: the Tucker LoCon with an output-row dora_scale.
Every form carries an alpha that is not its rank, so a wrong scale shows.
"""
from __future__ import annotations

import torch
from torch import nn

RANK, ALPHA = 3, 2.0

LAYERS = {
    "linear": (lambda: nn.Linear(12, 8), (3, 12)),
    "conv3x3": (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 6, 6)),
    "conv1x1": (lambda: nn.Conv2d(12, 8, 1), (2, 12, 5, 5)),
    "conv3x3_strided_reflect": (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"),
                                (2, 8, 9, 9)),
}

# Form → the layer kinds it applies to (the Tucker forms are conv-only in LyCORIS and ComfyUI); the
# strided, dilated, reflect-padded conv is for offline tests (ComfyUI's loader gets the plain three).
FORMS = {
    "locon_tucker": ("conv3x3", "conv1x1"),
    "loha_tucker": ("conv3x3", "conv1x1"),
    "lokr_tucker": ("conv3x3", "conv1x1"),
    "lokr_tucker_w1_decomposed": ("conv3x3",),
    "dora_output": ("linear", "conv3x3", "conv1x1"),
    "dora_input": ("linear", "conv3x3", "conv1x1"),
    "dora_output_tucker": ("conv3x3",),
}

# The algorithm each form is read as.
ALGORITHM = {"locon_tucker": "lora", "loha_tucker": "loha", "lokr_tucker": "lokr", "lokr_tucker_w1_decomposed": "lokr",
             "dora_output": "dora", "dora_input": "dora", "dora_output_tucker": "dora"}

# LoKr splits of the layers above: (out_a, out_b), (in_a, in_b).
_LOKR_SPLIT = {(12, 8): ((3, 4), (2, 4)), (8, 12): ((2, 4), (3, 4)), (8, 8): ((2, 4), (2, 4))}


def cases() -> list[tuple[str, str]]:
    return [(form, kind) for form, kinds in FORMS.items() for kind in kinds]


def make_layer(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """(the layer, seeded, under no name; the input shape)."""
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    return make(), shape


def lycoris_tensors(form: str, layer: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """{suffix: tensor} of one layer in `form`, fp32, N(0, 0.3²) factors, alpha a 0-d float32 tensor."""
    g = torch.Generator().manual_seed(seed)
    w = layer.weight.detach()
    out, inp, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
    ones, r = (1,) * len(kernel), RANK

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) * 0.3

    t: dict[str, torch.Tensor] = {"alpha": torch.tensor(ALPHA)}
    if form in ("locon_tucker", "dora_output_tucker"):
        t.update({"lora_down.weight": rnd(r, inp, *ones), "lora_mid.weight": rnd(r, r, *kernel),
                  "lora_up.weight": rnd(out, r, *ones)})
    elif form in ("dora_output", "dora_input"):
        t.update({"lora_down.weight": rnd(r, inp, *kernel), "lora_up.weight": rnd(out, r, *ones)})
    elif form == "loha_tucker":
        for i in ("1", "2"):
            t.update({f"hada_w{i}_a": rnd(r, out), f"hada_w{i}_b": rnd(r, inp), f"hada_t{i}": rnd(r, r, *kernel)})
    elif form.startswith("lokr_tucker"):
        (out_a, out_b), (in_a, in_b) = _LOKR_SPLIT[(out, inp)]
        if form == "lokr_tucker_w1_decomposed":
            t.update({"lokr_w1_a": rnd(out_a, 2), "lokr_w1_b": rnd(2, in_a)})
        else:
            t["lokr_w1"] = rnd(out_a, in_a)
        t.update({"lokr_w2_a": rnd(r, out_b), "lokr_w2_b": rnd(r, in_b), "lokr_t2": rnd(r, r, *kernel)})
    else:
        raise ValueError(f"form: got {form!r}; choose one of {', '.join(FORMS)}")
    if form.startswith("dora"):
        if form == "dora_input":
            norm = w.transpose(0, 1).reshape(inp, -1).norm(dim=1).reshape(1, inp, *ones)
        else:
            norm = w.reshape(out, -1).norm(dim=1).reshape(out, 1, *ones)
        t["dora_scale"] = norm * (1 + 0.3 * torch.rand(norm.shape, generator=g))
    return t


def state_dict(form: str, layer: nn.Module, name: str = "lora_unet_layer", seed: int = 1) -> dict[str, torch.Tensor]:
    """The kohya-keyed file of one layer named `name` (for a module at path `layer`)."""
    return {f"{name}.{suffix}": t for suffix, t in lycoris_tensors(form, layer, seed).items()}
