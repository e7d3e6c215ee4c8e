"""Run with ComfyUI's Python (diffusers, peft and transformers installed): the text-encoder part of one
LoRA file (kohya keys `lora_te_text_model_encoder_layers_<N>_<module>`, next to any `lora_unet_` keys)
in ComfyUI and in diffusers, on an SD1.x checkpoint (the tiny one of make_checkpoint.py has a
full-size CLIP-L).

    python te_loader_check.py CHECKPOINT LORA PROMPT

ComfyUI is found through COMFYUI_DIR, else as the folder above this interpreter's venv.

- ComfyUI: `comfy.sd.load_checkpoint_guess_config` loads the checkpoint, `load_lora_for_models`
  the LoRA at strength 1 for the model and the CLIP; the keys of its "lora key not loaded" and
  "NOT LOADED" lines, logged at any level, are `not_loaded`; `clip_patched` counts the CLIP
  weights the LoRA'd CLIP's patcher holds patches for. The prompt is encoded as the CLIP object
  does by default (`encode_from_tokens(tokenize(prompt), return_pooled=True)`: for SD1.x the last hidden state,
  after final_layer_norm) by the base CLIP, by the LoRA'd one, and by the base one again.
- diffusers: a transformers CLIPTextModel built from the checkpoint's CLIP-L weights (fp16 in the
  file, fp32 here) runs on ComfyUI's token ids; its last_hidden_state is compared with ComfyUI's
  cond. The LoRA goes in through `StableDiffusionPipeline.lora_state_dict` +
  `load_lora_into_text_encoder` (the text-encoder steps of `load_lora_weights`); every warning or
  error logged by diffusers, transformers or peft (and every Python warning) is collected, and the
  Linear layers that got an adapter are counted. ComfyUI stores the patched weights in the CLIP's
  dtype (`clip_dtype`, fp16 on the CPU), diffusers adds the LoRA in fp32 at run time, so
  `lora_vs_comfy` holds that rounding; `lora_fp16_vs_comfy` compares with diffusers' LoRA merged
  into the weights and rounded to that dtype the same way, which leaves only the order of the arithmetic.

Prints one JSON line.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

checkpoint, lora_path, prompt = sys.argv[1:4]


def find_comfyui() -> str:
    value = os.environ.get("COMFYUI_DIR")
    if value:
        return value
    above_venv = Path(sys.executable).parents[2]  # COMFYUI/venv/bin/python
    if (above_venv / "comfy").is_dir():
        return str(above_venv)
    sys.exit("te_loader_check.py: set COMFYUI_DIR to the ComfyUI checkout")


comfy_dir = find_comfyui()
sys.path.insert(0, comfy_dir)
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI parses its flags when comfy.* is first imported
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import comfy.sd  # noqa: E402

NOT_LOADED = ("lora key not loaded", "NOT LOADED")  # comfy/lora.py and comfy/sd.py


class Records(logging.Handler):
    """Every record it sees, once even when it reaches two of the loggers this is attached to."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []  # held, so that no id below is reused
        self._seen: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if id(record) not in self._seen:
            self._seen.add(id(record))
            self.records.append(record)

    def lines(self, since: int = 0) -> list[str]:
        return [f"{r.name} {r.levelname}: {r.getMessage()}" for r in self.records[since:]]

    def attach(self, *names: str) -> "Records":
        for name in names:
            logging.getLogger(name).addHandler(self)
        return self

    def detach(self, *names: str) -> None:
        for name in names:
            logging.getLogger(name).removeHandler(self)


def te_layers(keys) -> set[str]:
    return {k.split(".", 1)[0] for k in keys if k.startswith("lora_te")}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b if a is None or b is None else torch.equal(a, b)


def comfy_part(lora: dict) -> tuple[dict, list[int], torch.Tensor, torch.Tensor, torch.dtype]:
    """ComfyUI's report, the prompt's token ids, the base cond, the LoRA'd cond and the CLIP weights' dtype."""
    root = logging.getLogger()
    level, others = root.level, [(h, h.level) for h in root.handlers]
    root.setLevel(logging.DEBUG)  # "lora key not loaded" at whatever level ComfyUI logs it,
    for handler, was in others:  # while what already prints (logging's default stderr handler) stays as it was
        handler.setLevel(max(was, logging.WARNING))
    records = Records(logging.NOTSET).attach("")
    try:
        model, clip, *_ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=True)
        mark = len(records.records)
        _, lora_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
        load_log = records.records[mark:]
    finally:
        records.detach("")
        root.setLevel(level)
        for handler, was in others:
            handler.setLevel(was)
    tokens = clip.tokenize(prompt)
    if len(tokens["l"]) != 1:
        sys.exit(f"te_loader_check.py: the prompt takes {len(tokens['l'])} chunks of 77 tokens; use a shorter one")
    ids = [t[0] for t in tokens["l"][0]]
    with torch.no_grad():
        base, base_pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        lora_cond, _ = lora_clip.encode_from_tokens(tokens, return_pooled=True)
        after, after_pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    dtype = next(v.dtype for k, v in clip.get_sd().items() if k.endswith("q_proj.weight"))
    report = {
        "te_keys": len(te_layers(lora)),
        "not_loaded": [r.getMessage().split(marker, 1)[1].strip(": ") for r in load_log
                       for marker in NOT_LOADED if marker in r.getMessage()],
        "load_log": [f"{r.name} {r.levelname}: {r.getMessage()}" for r in load_log if r.levelno >= logging.WARNING],
        "clip_patched": len(lora_clip.patcher.patches) - len(clip.patcher.patches),
        "clip_dtype": str(dtype),
        "delta": max_diff(lora_cond, base),
        "base_equal_after": same(base, after) and same(base_pooled, after_pooled),
        "cond_shape": list(base.shape),
        "cond_absmax": float(base.abs().max()),
    }
    return report, ids, base[0], lora_cond[0], dtype


def text_encoder_weights() -> tuple[str, dict]:
    """The checkpoint's CLIP-L text model: (its key prefix in the file, its weights by CLIPTextModel's names)."""
    with safe_open(checkpoint, framework="pt") as f:
        ends = [k for k in f.keys() if k.endswith("text_model.final_layer_norm.weight")]
        if len(ends) != 1:
            sys.exit(f"te_loader_check.py: expected one CLIP text model in the checkpoint, found {ends}")
        prefix = ends[0][: -len("final_layer_norm.weight")]  # "cond_stage_model.transformer.text_model."
        return prefix, {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)}


def diffusers_part(ids: list[int], comfy_base: torch.Tensor, comfy_lora: torch.Tensor, dtype: torch.dtype) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers import StableDiffusionPipeline

    names = ("diffusers", "transformers", "peft", "py.warnings", "")
    records = Records(logging.WARNING).attach(*names)
    logging.captureWarnings(True)
    try:
        with open(Path(comfy_dir) / "comfy" / "sd1_clip_config.json") as f:
            config = CLIPTextConfig(**json.load(f))  # what ComfyUI builds its SD1.x CLIP-L from
        prefix, weights = text_encoder_weights()
        te = CLIPTextModel(config).eval()
        if hasattr(te, "text_model"):  # transformers before the flattened CLIPTextModel
            weights = {f"text_model.{k}": v for k, v in weights.items()}
        missing, unexpected = te.load_state_dict(weights, strict=False)
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            base = te(input_ids=input_ids).last_hidden_state[0]

        state, alphas = StableDiffusionPipeline.lora_state_dict(lora_path)
        te_state = sorted(k for k in state if k.startswith("text_encoder."))
        StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=te, prefix="text_encoder")
        adapted = [name for name, m in te.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
        with torch.no_grad():
            lora = te(input_ids=input_ids).last_hidden_state[0]
            # the same LoRA merged into the weights and stored in the dtype ComfyUI stores its patched ones in
            for name in adapted:
                layer = te.get_submodule(name)
                layer.merge()
                layer.base_layer.weight.data = layer.base_layer.weight.data.to(dtype).float()
            merged_fp16 = te(input_ids=input_ids).last_hidden_state[0]
    finally:
        logging.captureWarnings(False)
        records.detach(*names)
    return {
        "checkpoint_prefix": prefix, "convert_missing": list(missing), "convert_unexpected": list(unexpected),
        "te_state_keys": len(te_state), "adapted_layers": len(adapted), "log": records.lines(),
        "base_vs_comfy": max_diff(base, comfy_base), "lora_vs_comfy": max_diff(lora, comfy_lora),
        "lora_fp16_vs_comfy": max_diff(merged_fp16, comfy_lora), "delta": max_diff(lora, base),
    }


def main() -> dict:
    torch.manual_seed(0)
    lora = load_file(lora_path)
    comfy_report, ids, comfy_base, comfy_lora, dtype = comfy_part(lora)
    return {"prompt_ids": ids, "comfy": comfy_report, "diffusers": diffusers_part(ids, comfy_base, comfy_lora, dtype)}


if __name__ == "__main__":
    print(json.dumps(main()))
