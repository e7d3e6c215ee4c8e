"""Text-encoder LoRA in a real ComfyUI, on the tiny SD1.x checkpoint (its CLIP-L at full size, random
weights): LoRA Text Encoder chained into Train LoRA's options trains the CLIP with the UNet.

- The same run with and without the text encoder (same steps, seed, UNet LR): the trigger word changes the
  sample more with it (the prompt with the trigger against the prompt without); the text-encoder part
  alone (strength_model 0) moves the sample.
- The file: kohya's `lora_te_` keys for every CLIP layer's six projections, `ss_text_encoder_lr`; core's
  LoraLoader (strength_clip) reads every key; our Load LoRA Model with its clip input applies both parts
  as core does; diffusers loads the text-encoder layers and changes the embedding as ComfyUI does
  (te_loader_check.py, ComfyUI's Python).
- The cached base model and base CLIP are bit-identical afterwards (a base sample, whose prompt goes
  through that CLIP, equals the one taken before training, with no checkpoint reload).
- Caption variants and caption dropout train with it; a family without a trainable text encoder and a
  CLIPTextEncode caption without its text are refused.
Skips unless COMFYUI_DIR is set. The graphs and fixtures are test_nodes.py's."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from safetensors import safe_open

_spec = importlib.util.spec_from_file_location("lora_trainer_it_nodes", Path(__file__).with_name("test_nodes.py"))
nodes_it = sys.modules.get(_spec.name) or importlib.util.module_from_spec(_spec)
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = nodes_it
    _spec.loader.exec_module(nodes_it)

dataset, baseline = nodes_it.dataset, nodes_it.baseline  # the fixtures of test_nodes.py
TE_ID = "LoRATrainer_TextEncoder"
STEPS = 20
TE_LR = 5e-3
PROMPT = "a house in lrtstyle"
PLAIN = "a house"  # the prompt without the trigger word
MODULES = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def graph(comfy, prefix: str, text_encoder_lr: float | None) -> dict:
    """train_graph on Load Captioned Image Set's images and captions; with `text_encoder_lr`, LoRA Text
    Encoder ("te") into Train LoRA's options; Load LoRA Model ("l2", its clip input) applying the result to
    the checkpoint, sampled from PROMPT through its CLIP ("l8")."""
    g = nodes_it.train_graph(comfy, steps=STEPS, prefix=prefix)
    g["c"] = {"class_type": "LoRATrainer_LoadCaptionedImageSet", "inputs": {
        "folder": nodes_it.DATASET, "clip": ["1", 1], "resize_method": "Stretch", "width": nodes_it.SIZE,
        "height": nodes_it.SIZE}}
    g["3"]["inputs"]["pixels"] = ["c", 0]
    g[nodes_it.TRAIN_NODE]["inputs"]["positive"] = ["c", 1]
    if text_encoder_lr is not None:
        g["te"] = {"class_type": TE_ID, "inputs": {"clip": ["1", 1], "text_encoder_lr": text_encoder_lr}}
        g[nodes_it.TRAIN_NODE]["inputs"]["options"] = ["te", 0]
    g["l2"] = {"class_type": "LoRATrainer_LoadLoRAModel", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora": [nodes_it.TRAIN_NODE, 1], "strength_model": 1.0,
        "strength_clip": 1.0}}
    sample(g, "l", ["l2", 0], ["l2", 1], f"it_te/{prefix.rsplit('/', 1)[-1]}_load_lora_model")
    return g


def sample(g: dict, tag: str, model: list, clip: list, prefix: str, prompt: str = PROMPT) -> None:
    """Nodes `<tag>3`…`<tag>8`: `prompt` through `clip`, sampled with `model` as sample_graph does."""
    g[f"{tag}3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": clip}}
    g[f"{tag}4"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}}
    g[f"{tag}5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": nodes_it.SIZE, "height": nodes_it.SIZE,
                                                                 "batch_size": 1}}
    g[f"{tag}6"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": [f"{tag}3", 0], "negative": [f"{tag}4", 0], "latent_image": [f"{tag}5", 0],
        "seed": 7, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    g[f"{tag}7"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{tag}6", 0], "vae": ["1", 2]}}
    g[f"{tag}8"] = {"class_type": "SaveImage", "inputs": {"images": [f"{tag}7", 0], "filename_prefix": prefix}}


def core_sample(comfy, lora_name: str, strength_model: float, strength_clip: float, tag: str,
                prompt: str = PROMPT) -> tuple[np.ndarray, str]:
    """`prompt` sampled with core's LoraLoader (model and CLIP) applying the file; (pixels, the server's log)."""
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy.checkpoint}},
         "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name,
                                                      "strength_model": strength_model,
                                                      "strength_clip": strength_clip}}}
    sample(g, "", ["2", 0], ["2", 1], f"it_te/core_{tag}", prompt)
    mark = len(comfy.log())
    entry = comfy.run(g)
    return nodes_it.pixels(comfy, entry, "8"), comfy.log(mark)


class Run(NamedTuple):
    entry: dict
    saved: str
    losses: list[float]
    log: str


def train(comfy, prefix: str, text_encoder_lr: float | None) -> Run:
    mark = len(comfy.log())
    entry = comfy.run(graph(comfy, prefix, text_encoder_lr), timeout=900)
    return Run(entry, entry["outputs"][nodes_it.SAVE_NODE]["text"][0],
               entry["outputs"][nodes_it.PLOT_NODE]["loss"], comfy.log(mark))


class Runs(NamedTuple):
    unet: Run
    te: Run
    loads: int


@pytest.fixture(scope="module")
def runs(comfy, dataset, baseline) -> Runs:
    unet = train(comfy, "loras/it_te_unet_only", None)
    te = train(comfy, "loras/it_te_both", TE_LR)
    return Runs(unet, te, nodes_it.checkpoint_loads(comfy))


def move(image: np.ndarray, base: np.ndarray) -> float:
    return float(np.abs(image.astype(np.float64) - base.astype(np.float64)).mean())


def test_the_text_encoder_trains_and_its_file_is_kohyas(comfy, runs):
    assert "the text encoder trains too (clip_l" in runs.te.log
    # step 0 runs the encoder's adapters at zero: the captions encoded anew equal CLIPTextEncode's, bit for bit
    assert runs.te.losses[0] == runs.unet.losses[0] and runs.te.losses[1:] != runs.unet.losses[1:]
    assert np.mean(runs.te.losses[-5:]) < np.mean(runs.te.losses[:5]), runs.te.losses
    with safe_open(str(comfy.output_dir / runs.te.saved), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    te_layers = {k.split(".")[0] for k in keys if k.startswith("lora_te")}
    assert te_layers == {f"lora_te_text_model_encoder_layers_{i}_{m}" for i in range(12) for m in MODULES}
    assert all(f"{layer}.{s}" in keys for layer in te_layers for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert metadata["ss_text_encoder_lr"] == str(TE_LR) and metadata["ss_network_train_unet_only"] == "False"
    assert json.loads(metadata["lora_trainer.settings"])["text_encoder_lr"] == TE_LR
    with safe_open(str(comfy.output_dir / runs.unet.saved), "pt") as f:
        assert not any(k.startswith("lora_te") for k in f.keys())
    # A1111's key rules (tests/a1111_rules.py) on the text-encoder keys and its names of CLIP-L's layers
    spec = importlib.util.spec_from_file_location("lora_trainer_a1111_rules",
                                                  Path(__file__).parents[1] / "a1111_rules.py")
    rules = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
    if spec.name not in sys.modules:
        sys.modules[spec.name] = rules
        spec.loader.exec_module(rules)
    te_keys = sorted(k for k in keys if k.startswith("lora_te"))
    report = rules.match(te_keys, {}, rules.text_encoder_module_names(12, sdxl=False))
    assert report.loads and set(report.matched) == set(te_keys) and not report.unread, report


def test_the_trigger_word_moves_the_sample_more_with_the_text_encoder(comfy, runs, baseline):
    """Core's LoraLoader reads every key of both files (model and CLIP). What the trigger word does, the
    sample of the prompt with it against the prompt without it, both with the LoRA, is larger with the text
    encoder trained; its text-encoder part alone (strength_model 0) moves the sample; our Load LoRA Model
    (clip input) gives core's sample exactly."""
    unet_file, te_file = nodes_it.listed_name(runs.unet.saved), nodes_it.listed_name(runs.te.saved)
    base, _ = core_sample(comfy, te_file, 0.0, 0.0, "base")
    samples, logs = {}, []
    for name, file in (("unet only", unet_file), ("with the text encoder", te_file)):
        for prompt in (PROMPT, PLAIN):
            samples[name, prompt], log = core_sample(comfy, file, 1.0, 1.0, f"{name}_{prompt}".replace(" ", "_"),
                                                     prompt)
            logs.append(log)
    clip_only, log = core_sample(comfy, te_file, 0.0, 1.0, "clip_only")
    for log in logs + [log]:
        assert nodes_it.LORA_NOT_LOADED not in log, [l for l in log.splitlines() if nodes_it.LORA_NOT_LOADED in l][:3]
    trigger = {name: move(samples[name, PROMPT], samples[name, PLAIN])
               for name in ("unet only", "with the text encoder")}
    alone = move(clip_only, base)
    print(f"mean |trigger - plain| (0-255): {trigger}; text-encoder part alone vs base: {alone:.3f}")
    assert alone > 0.5, alone
    assert trigger["with the text encoder"] > 1.2 * trigger["unet only"], trigger
    assert np.array_equal(samples["with the text encoder", PROMPT], nodes_it.pixels(comfy, runs.te.entry, "l8")), \
        "Load LoRA Model differs from core's LoraLoader"


def test_diffusers_loads_the_text_encoder_layers(comfy, runs):
    spec = importlib.util.spec_from_file_location("lora_trainer_it_te_loaders",
                                                  Path(__file__).with_name("test_te_loaders.py"))
    loaders = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaders)
    report = loaders.check_text_encoder_file(comfy.output_dir / runs.te.saved)
    comfy_part, diffusers_part = report["comfy"], report["diffusers"]
    assert comfy_part["not_loaded"] == [] and comfy_part["clip_patched"] == comfy_part["te_keys"] == 72, comfy_part
    assert diffusers_part["adapted_layers"] == 72, diffusers_part
    # ComfyUI keeps the CLIP (and the LoRA merged into it) in fp16 on the CPU: diffusers' merged weights rounded
    # the same way match it to fp32 rounding (test_te_loaders.py)
    assert diffusers_part["lora_fp16_vs_comfy"] < 1e-4 and comfy_part["delta"] > 1e-3, report


def test_the_base_model_and_clip_are_restored(comfy, runs, baseline):
    nodes_it.assert_base_model_restored(comfy, baseline, runs.loads, "after_text_encoder")


def test_caption_variants_and_dropout_train_with_the_text_encoder(comfy, dataset):
    g = nodes_it.train_graph(comfy, steps=6, prefix="loras/it_te_variants")
    g["e"] = {"class_type": "LoRATrainer_EncodeTrainingFolder", "inputs": {
        "folder": nodes_it.DATASET, "vae": ["1", 2], "resolution": nodes_it.SIZE, "bucket_step": 32,
        "min_side": 32, "max_side": 96, "clip": ["1", 1],
        "caption_variants": 3, "shuffle_tags": True}}
    g[nodes_it.TRAIN_NODE]["inputs"].update(latents=["e", 0], positive=["e", 1])
    g["u"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}}
    g["9"] = {"class_type": "LoRATrainer_TrainingOptions", "inputs": {"unconditional": ["u", 0],
                                                                      "caption_dropout": 0.3}}
    g["te"] = {"class_type": TE_ID, "inputs": {"clip": ["1", 1], "options": ["9", 0], "text_encoder_lr": TE_LR}}
    g[nodes_it.TRAIN_NODE]["inputs"]["options"] = ["te", 0]
    mark = len(comfy.log())
    entry = comfy.run(g, timeout=600)
    log = comfy.log(mark)
    assert "caption variants" in log and "the text encoder trains too" in log, log[-2000:]
    saved = entry["outputs"][nodes_it.SAVE_NODE]["text"][0]
    with safe_open(str(comfy.output_dir / saved), "pt") as f:
        assert any(k.startswith("lora_te_") for k in f.keys())
        assert f.metadata()["ss_caption_dropout_rate"] == "0.3"


def test_a_caption_without_its_text_is_refused_naming_captions(comfy, dataset):
    """train_lora.json's one CLIPTextEncode caption keeps no text: LoRA Text Encoder needs its captions input;
    with it the run trains."""
    g = nodes_it.train_graph(comfy, steps=2, prefix="loras/it_te_refused")
    g["te"] = {"class_type": TE_ID, "inputs": {"clip": ["1", 1], "text_encoder_lr": TE_LR}}
    g[nodes_it.TRAIN_NODE]["inputs"]["options"] = ["te", 0]
    _, error = nodes_it.run_failing(comfy, g)
    assert "captions:" in error and "LoRA Text Encoder's captions input" in error, error
    g["te"]["inputs"]["captions"] = "a picture, lrtstyle"
    comfy.run(g)


def test_continuing_a_file_trains_its_text_encoder_layers_on(comfy, runs):
    """existing_lora with text-encoder layers and LoRA Text Encoder: they train on from the file (a few more
    steps move them a little, where a fresh start would be far off), and the steps count on."""
    g = graph(comfy, "loras/it_te_continued", TE_LR)
    g[nodes_it.TRAIN_NODE]["inputs"].update(existing_lora=nodes_it.listed_name(runs.te.saved), steps=4)
    mark = len(comfy.log())
    entry = comfy.run(g, timeout=600)
    log = comfy.log(mark)
    assert "no memory estimate" not in log, log[-3000:]
    saved = entry["outputs"][nodes_it.SAVE_NODE]["text"][0]
    assert f"_{STEPS + 4}_steps_" in saved, saved
    with safe_open(str(comfy.output_dir / runs.te.saved), "pt") as f:
        before = {k: f.get_tensor(k).float() for k in f.keys() if k.startswith("lora_te_")}
    with safe_open(str(comfy.output_dir / saved), "pt") as f:
        after = {k: f.get_tensor(k).float() for k in f.keys() if k.startswith("lora_te_")}
    assert after.keys() == before.keys()
    ups = [k for k in before if k.endswith("lora_up.weight")]
    change = sum(float((after[k] - before[k]).norm()) for k in ups) / sum(float(before[k].norm()) for k in ups)
    assert 0 < change < 0.5, change


def test_bf16_with_checkpointing_trains_the_text_encoder(comfy, dataset):
    """The default compute (bf16 autocast, gradient checkpointing) over ComfyUI's CLIP, kept in fp16 on the CPU:
    the run trains with finite losses and a file with text-encoder layers."""
    g = graph(comfy, "loras/it_te_bf16", TE_LR)
    g[nodes_it.TRAIN_NODE]["inputs"].update(steps=4, training_dtype="bf16", gradient_checkpointing=True)
    entry = comfy.run(g, timeout=600)
    losses = entry["outputs"][nodes_it.PLOT_NODE]["loss"]
    assert len(losses) == 4 and all(np.isfinite(losses)), losses
    with safe_open(str(comfy.output_dir / entry["outputs"][nodes_it.SAVE_NODE]["text"][0]), "pt") as f:
        ups = [f.get_tensor(k) for k in f.keys() if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert len(ups) == 72 and all(u.float().abs().max() > 0 for u in ups)
