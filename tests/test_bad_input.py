"""Bad input as users' files really are (docs/data.md#bad-input): each case names the input, the value and the fix.

The items that need a ComfyUI server (ConditioningCombine, the cancel line, 16-channel latents into
SD1.5, permissions beside ComfyUI's own images, a kohya LoRA with text-encoder keys) are also
checked end to end in tests/integration/test_bad_input.py.
"""
from __future__ import annotations

import errno
import logging
import os
import stat

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from comfyui_lora_trainer.lora import files as lora_files
from comfyui_lora_trainer.lora import load_lora_file, resolve_state_dict, save_lora_file, split_text_encoder
from comfyui_lora_trainer.nodes.paths import PrefixInput, output_target
from comfyui_lora_trainer.tiny.host import tiny_fns
from comfyui_lora_trainer.tiny.model import build_tiny
from comfyui_lora_trainer.tiny.text import encode_captions
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.data import caption_entries, check_latent_channels, describe_captions
from comfyui_lora_trainer.training.images import fill_captions, list_images, load_image_folder
from comfyui_lora_trainer.training.loop import train


class Toy(nn.Module):
    """Two Linear layers named like test_lora_core's toy: proj (8 → 6) and out (6 → 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4, bias=False)

SAVE_PREFIX = PrefixInput("prefix", "ComfyUI_trained_lora", "loras/my_lora")
PLOT_PREFIX = PrefixInput("filename_prefix", "loss_graph", "loss_graphs/my_run")


def _image(path, size=(4, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path


# ---- 1. captions in legacy encodings ------------------------------------------------------
@pytest.mark.parametrize("raw, expect", [
    ("café crème, naïve".encode("cp1252"), "café crème, naïve"),  # a Windows editor's "ANSI"
    ("\ufeffcafé crème".encode("utf-8"), "café crème"),  # UTF-8 with a BOM (Notepad's "UTF-8 with BOM")
    ("café crème".encode("utf-16"), "café crème"),  # Notepad's "Unicode" (UTF-16 with a BOM)
    ("日本の猫".encode("utf-8"), "日本の猫"),
])
def test_caption_encodings(tmp_path, raw, expect):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(raw)
    assert load_image_folder(tmp_path).captions == [expect]


def test_caption_that_is_no_text_names_the_file_and_the_fix(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"\x00\x81\x8d binary junk")
    with pytest.raises(ValueError, match=r"caption file .*a\.txt: cannot be read as text .* save it as UTF-8"):
        load_image_folder(tmp_path)


# ---- 2. / 4. corrupt, empty and NaN existing LoRAs --------------------------------------------
def test_empty_lora_file_names_existing_lora_and_the_file(tmp_path):
    path = tmp_path / "half_download.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"existing_lora: .*half_download\.safetensors is empty \(0 bytes\), "
                                         r"not a readable safetensors file"):
        load_lora_file(path)


def test_random_bytes_lora_names_existing_lora_and_the_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(os.urandom(2000))
    with pytest.raises(ValueError, match=r"existing_lora: .*junk\.safetensors is not a readable safetensors file"):
        load_lora_file(path)


def test_nan_lora_names_the_file_and_the_first_bad_key(tmp_path):
    path = tmp_path / "diverged.safetensors"
    save_file({"lora_unet_proj.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_proj.lora_up.weight": torch.tensor([[1.0, float("inf")]] * 6),
               "lora_unet_proj.alpha": torch.tensor(2.0)}, str(path))
    with pytest.raises(ValueError, match=r"existing_lora: .*diverged\.safetensors holds NaN/inf values "
                                         r"\(first in 'lora_unet_proj\.lora_up\.weight'\).*earlier save"):
        load_lora_file(path)


# ---- 3. kohya LoRA with text-encoder keys -----------------------------------------------------
def test_text_encoder_keys_are_split_off_and_the_rest_resolves():
    toy = Toy()
    sd = {"lora_unet_proj.lora_down.weight": torch.zeros(2, 8), "lora_unet_proj.lora_up.weight": torch.zeros(6, 2),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 768),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0),
          "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(3, 2),
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 4)}
    unet, text_encoder = split_text_encoder(sd)
    assert set(unet) == {"lora_unet_proj.lora_down.weight", "lora_unet_proj.lora_up.weight"}
    assert len(text_encoder) == 4 and all(text_encoder[k] is sd[k] for k in text_encoder)  # unchanged
    assert set(resolve_state_dict(unet, toy)) == {"proj"}


# ---- 5. a LoRA for another model width ---------------------------------------------------------
def test_lora_for_another_base_model_says_so():
    wide = {"lora_unet_proj.lora_down.weight": torch.zeros(4, 2048), "lora_unet_proj.lora_up.weight": torch.zeros(6, 4)}
    with pytest.raises(ValueError, match=r"^existing_lora 'sdxl_style.safetensors': LoRA key 'lora_unet_proj.lora_down"
                                         r".weight' does not fit layer 'proj': the file has shape \(4, 2048\), the "
                                         r"layer needs \(rank, 8\); this LoRA was likely trained for another base model"):
        resolve_state_dict(wide, Toy(), label="existing_lora 'sdxl_style.safetensors'")
    with pytest.raises(ValueError, match=r"^existing_lora 'x': LoRA key 'lora_unet_nope.alpha': matches no layer.*"
                                         r"another base model"):
        resolve_state_dict({"lora_unet_nope.alpha": torch.tensor(1.0)}, Toy(), label="existing_lora 'x'")


# ---- 6. some captions missing -----------------------------------------------------------------
@pytest.mark.parametrize("default, got", [("", "an empty caption"), ("a photo of sks", "the default_caption 'a photo of sks'")])
def test_missing_captions_warn_once_listing_the_images(tmp_path, caplog, default, got):
    for i in range(8):
        _image(tmp_path / f"img{i}.png")
    for i in range(3):
        (tmp_path / f"img{i}.txt").write_text(f"caption {i}")
    image_set = load_image_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        captions = fill_captions(image_set.paths, image_set.captions, default)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "5 of 8 images have no .txt caption (img3.png, img4.png, img5.png, img6.png, img7.png)" in warnings[0]
    assert got in warnings[0]
    assert captions == ["caption 0", "caption 1", "caption 2"] + [default] * 5


# ---- 7. ConditioningCombine as positive ---------------------------------------------------------
def test_a_combined_conditioning_is_one_caption_for_every_image():
    assert caption_entries([2], 8) == [[0, 1]] * 8  # ConditioningCombine of 2 prompts, 8 images
    assert caption_entries([2], 2) == [[0, 1]] * 2  # ... and 2 images: the same rule
    assert caption_entries([1, 1], 2) == [[0], [1]]  # one caption per image
    assert caption_entries([2, 1], 2) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="positive: got 3 captions for 2 images"):
        caption_entries([1, 1, 1], 2)
    assert describe_captions([2], 8) == ("Train LoRA: 8 images, one combined caption (2 prompts, e.g. from "
                                         "ConditioningCombine) for every image")
    assert describe_captions([1], 8) == "Train LoRA: 8 images, one caption for every image"
    assert describe_captions([2, 1], 2) == ("Train LoRA: 2 images, one caption per image "
                                            "(1 of them combined from several prompts)")


# ---- 8. Save LoRA / Plot Loss Graph prefixes ----------------------------------------------------
def test_prefix_rules(tmp_path):
    out = tmp_path.resolve()
    with pytest.raises(ValueError, match=r"^prefix: is empty; give a name relative to the output folder, like 'loras/my_lora'"):
        output_target(out, "  ", SAVE_PREFIX)
    assert output_target(out, "loras/", SAVE_PREFIX) == (out / "loras", "ComfyUI_trained_lora")
    assert output_target(out, "loras/mine", SAVE_PREFIX) == (out / "loras", "mine")
    assert output_target(out, "graphs/", PLOT_PREFIX) == (out / "graphs", "loss_graph")
    with pytest.raises(ValueError, match=r"^filename_prefix: '\.\./x' points outside the output folder; use a "
                                         r"relative name like 'loss_graphs/my_run'"):
        output_target(out, "../x", PLOT_PREFIX)
    with pytest.raises(ValueError, match=r"^filename_prefix: is empty"):
        output_target(out, "", PLOT_PREFIX)
    for escape in ("/etc/x", "/", "loras/../../x"):
        with pytest.raises(ValueError, match="points outside the output folder"):
            output_target(out, escape, SAVE_PREFIX)


# ---- 9. saving that fails ----------------------------------------------------------------------
def test_full_disk_names_the_target_and_the_cause(tmp_path, monkeypatch):
    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")  # safetensors fails part-way through
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("comfyui_lora_trainer.lora.formats.save_file", full)
    target = tmp_path / "loras" / "x_00001_.safetensors"
    with pytest.raises(OSError, match=r"cannot write the LoRA .*loras/x_00001_\.safetensors: the disk is full "
                                      r"\(no space left on device\); free some space"):
        save_lora_file(target, {"t": torch.zeros(1)}, {})
    assert list((tmp_path / "loras").iterdir()) == []  # no half file, no temp file


@pytest.mark.parametrize("code, words", [(errno.EACCES, "permission denied: the folder is read-only"),
                                         (errno.EPERM, "operation not permitted: the folder or file system is read-only or immutable")])
def test_read_only_folder_names_the_target_and_the_cause(tmp_path, monkeypatch, code, words):
    real_open = os.open

    def refuse(path, flags, mode=0o777, **kw):  # what a read-only (or chattr +i) folder answers
        if str(path).endswith(".tmp"):
            raise PermissionError(code, os.strerror(code), str(path))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(lora_files.os, "open", refuse)
    with pytest.raises(PermissionError, match=rf"cannot write the LoRA .*y\.safetensors: {words}.*make the folder writable"):
        save_lora_file(tmp_path / "y.safetensors", {"t": torch.zeros(1)}, {})
    assert list(tmp_path.iterdir()) == []


# ---- 10. latents from another model's VAE -------------------------------------------------------
def test_latents_with_the_wrong_channel_count_name_the_vae_model_pair():
    with pytest.raises(ValueError, match=r"latents: they have 16 channels, but this model \(SD15\) takes 4-channel "
                                         r"latents; the images were encoded with the VAE of another model \(16 channels: "
                                         r"SD3/Flux\); encode them with the VAE that belongs to this model"):
        check_latent_channels([torch.zeros(4, 8, 8), torch.zeros(16, 8, 8)], 4, "SD15")
    check_latent_channels([torch.zeros(16, 8, 8)], 16, "Flux")


# ---- 11. dataset folders as users have them -------------------------------------------------------
def test_hidden_files_and_macosx_are_skipped(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "2_sub" / "b.png")
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "._a.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    _image(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png")
    _image(tmp_path / ".DS_Store.png")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["2_sub/b.png", "a.png"]
    assert load_image_folder(tmp_path).images.shape[0] == 3  # b.png twice (2_ repeats) + a.png


# ---- 13. batch_size above the image count --------------------------------------------------------
@pytest.mark.parametrize("order, what", [("random", "each step trains on all 3 images once"),
                                         ("epoch", "each step fills its 8 places by repeating images")])
def test_batch_larger_than_the_image_count_is_logged(caplog, order, what):
    model = build_tiny("eps")
    fns = tiny_fns(model, encode_captions(["x"], model.net.config.context_dim))
    config = TrainConfig(steps=1, batch_size=8, batch_order=order, training_dtype="fp32", gradient_checkpointing=False)
    with caplog.at_level(logging.WARNING):
        train(model.net, fns, torch.randn(3, 4, 8, 8), config)
    lines = [r.getMessage() for r in caplog.records if "batch_size" in r.getMessage()]
    assert lines == [f"Train LoRA: batch_size 8 is larger than the 3 images; {what}"]


# ---- 14. diffusers' 2023 attention-processor layout ------------------------------------------------
def test_old_diffusers_attention_processor_layout_loads():
    g = torch.Generator().manual_seed(0)
    q_down, q_up = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    o_down, o_up = torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g)
    sd = {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": q_down,
          "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": q_up,
          "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": o_down,
          "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": o_up}
    aliases = {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": "proj",
               "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": "out"}
    w = resolve_state_dict(sd, Toy(), aliases)
    assert set(w) == {"proj", "out"} and w["proj"].alpha is None  # no alpha in this layout: scale 1
    assert torch.equal(w["proj"].down, q_down) and torch.equal(w["out"].up, o_up)
    with pytest.raises(ValueError, match=r"not a LoRA tensor this pack can read; it reads kohya .* diffusers' "
                                         r"attention processors \(processor.to_q_lora.down\)"):
        resolve_state_dict({"lora_unet_proj.oft_blocks": torch.zeros(2, 8)}, Toy())


# ---- 15. file permissions like ComfyUI's own outputs ------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_get_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = save_lora_file(tmp_path / f"m{umask:o}.safetensors", {"t": torch.zeros(1)}, {})
        with open(tmp_path / "like_an_image.png", "wb"):  # what PIL's Image.save (ComfyUI's SaveImage) does
            pass
    finally:
        os.umask(old)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "like_an_image.png").stat().st_mode)
