"""The metadata of a run as kohya-ss sd-scripts writes it (train_network.py, library/train_util.py,
library/sai_model_spec.py): start and end, session, epochs, output name, image sizes and buckets;
and the steps a continued LoRA counts from (`ss_steps`, the name as fallback)."""
from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

import pytest

from comfyui_lora_trainer.lora import BaseModel, file_metadata, load_lora_file, save_lora_file, steps_of
from comfyui_lora_trainer.lora.metadata import dataset_metadata, output_name, session_metadata
from comfyui_lora_trainer.tiny.host import TINY_BASE
from comfyui_lora_trainer.training.config import TrainConfig
from comfyui_lora_trainer.training.loop import Hooks, train

_spec = importlib.util.spec_from_file_location("lora_trainer_test_targets", Path(__file__).with_name("test_targets.py"))
_targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_targets)
FAST, setup = _targets.FAST, _targets.setup  # the tiny eps model and four 16×16 ramp images


def _a1111_resolutions(meta: dict[str, str]) -> dict[str, int]:
    """What A1111's Lora metadata page shows from ss_bucket_info (extensions-builtin/Lora/
    ui_edit_user_metadata.py, restated): the JSON value parsed, each bucket's "resolution" r shown as
    f"{r[1]}x{r[0]}" (so kohya's [width, height] reads height x width) with int("count") summed."""
    info = json.loads(meta["ss_bucket_info"])
    shown: dict[str, int] = {}
    for bucket in info["buckets"].values():
        r = bucket["resolution"]
        shown[f"{r[1]}x{r[0]}"] = shown.get(f"{r[1]}x{r[0]}", 0) + int(bucket["count"])
    return shown


def test_run_keys_epochs_and_sizes_of_a_trained_lora():
    model, _, fns, latents = setup()
    config = TrainConfig(steps=3, batch_size=2, **FAST)  # 4 images: 2 batches, 2 steps an epoch
    before = time.time()
    result = train(model.net, fns, latents, config, base=TINY_BASE)
    after = time.time()
    meta = file_metadata(result.lora, result.total_steps, "full", result.metadata)
    started, finished = float(meta["ss_training_started_at"]), float(meta["ss_training_finished_at"])
    assert before <= started <= finished <= after
    assert meta["ss_session_id"].isdigit() and int(meta["ss_session_id"]) < 2**32
    assert (meta["ss_num_batches_per_epoch"], meta["ss_num_epochs"], meta["ss_epoch"]) == ("2", "2", "2")
    assert meta["ss_total_batch_size"] == "2" and meta["ss_num_train_images"] == "4"
    # the tiny model's stand-in VAE keeps the size: 16×16 latents are 16×16 images
    assert meta["ss_resolution"] == "(16, 16)" and meta["modelspec.resolution"] == "16x16"
    assert meta["ss_enable_bucket"] == "False" and _a1111_resolutions(meta) == {"16x16": 4}
    assert all(isinstance(v, str) for v in meta.values())


def test_a_base_models_pixel_scale_gives_image_sizes():
    model, _, fns, latents = setup()
    base = BaseModel("sd_v1", "stable-diffusion-v1", "diffusers", "512x512", "epsilon")  # pixel_scale 8: SD's VAE
    meta = train(model.net, fns, latents, TrainConfig(steps=1, **FAST), base=base).metadata
    assert meta["ss_resolution"] == "(128, 128)" and meta["modelspec.resolution"] == "128x128"  # not the family's 512
    assert json.loads(meta["ss_bucket_info"])["buckets"] == {"0": {"resolution": [128, 128], "count": 4}}


def test_every_checkpoint_of_a_run_shares_its_session_and_counts_on():
    model, _, fns, latents = setup()
    saved = []

    def save(state, lora, reason):
        saved.append(dict(lora.metadata))
        return f"checkpoint {state.step}"

    config = TrainConfig(steps=4, batch_size=2, save_every=1, **FAST)
    final = train(model.net, fns, latents, config, hooks=Hooks(save=save), base=TINY_BASE).metadata
    runs = saved + [final]
    assert [m["ss_steps"] for m in runs] == ["1", "2", "3", "4", "4"]
    assert [m["ss_epoch"] for m in runs] == ["1", "1", "2", "2", "2"]
    assert len({(m["ss_session_id"], m["ss_training_started_at"]) for m in runs}) == 1
    ends = [float(m["ss_training_finished_at"]) for m in runs]
    assert ends == sorted(ends) and ends[0] >= float(final["ss_training_started_at"])


def test_epochs_count_accumulated_batches_and_a_continued_loras_steps():
    config = TrainConfig(steps=10, batch_size=3, gradient_accumulation=2)
    meta = config.kohya_metadata(7, steps=25)  # 3 batches of ≤3 an epoch, 2 per step: 2 steps an epoch
    assert (meta["ss_num_batches_per_epoch"], meta["ss_num_epochs"], meta["ss_epoch"]) == ("3", "5", "13")
    assert meta["ss_total_batch_size"] == "6" and meta["ss_batch_size_per_device"] == "3"
    assert "ss_epoch" not in config.kohya_metadata(7)
    assert TrainConfig(steps=5, batch_size=8).kohya_metadata(2, 5)["ss_num_epochs"] == "5"  # a batch larger than the set


def test_sizes_that_vary_are_buckets_as_kohya_writes_them():
    # latents (height, width) 64×64 twice and 96×64 once; ×8 = 512×512 ×2 and 512 wide × 768 high
    meta = dataset_metadata([(64, 64), (96, 64), (64, 64)], pixel_scale=8)
    assert meta["ss_resolution"] == "(512, 768)" and meta["modelspec.resolution"] == "512x768"  # the largest
    assert meta["ss_enable_bucket"] == "True"
    info = json.loads(meta["ss_bucket_info"])
    assert info == {"buckets": {"0": {"resolution": [512, 512], "count": 2}, "1": {"resolution": [512, 768], "count": 1}},
                    "mean_img_ar_error": 0.0}
    assert _a1111_resolutions(meta) == {"512x512": 2, "768x512": 1}
    assert dataset_metadata([]) == {}


def test_session_and_output_name_formats():
    meta = session_metadata(1700000000.25, 1700000100.5)
    assert meta["ss_training_started_at"] == "1700000000.25" and meta["ss_training_finished_at"] == "1700000100.5"
    assert meta == session_metadata(1700000000.25, 1700000100.5)  # the id follows the start: one per run
    assert meta["ss_session_id"] != session_metadata(1700000000.5, 1700000100.5)["ss_session_id"]
    assert output_name("my_lora") == {"ss_output_name": "my_lora", "modelspec.title": "my_lora"}


def test_the_file_keeps_what_training_and_saving_wrote(tmp_path):
    model, _, fns, latents = setup()
    result = train(model.net, fns, latents, TrainConfig(steps=1, **FAST), base=TINY_BASE)
    meta = {**file_metadata(result.lora, 1, "portable", result.metadata), **output_name("x")}
    _, back = load_lora_file(save_lora_file(tmp_path / "x_1_steps_00001_.safetensors", result.lora, meta))
    assert back == meta and back["ss_output_name"] == "x"


def test_steps_of_reads_the_metadata_first(caplog):
    assert steps_of({"ss_steps": "120"}, "my_lora_30_steps_00001_.safetensors") == 120  # a renamed or kohya file
    assert steps_of({"ss_steps": "7"}, "downloaded.safetensors") == 7
    assert steps_of({}, "my_lora_30_steps_00001_.safetensors") == 30  # no metadata: the name
    with caplog.at_level(logging.WARNING):
        assert steps_of({"ss_steps": "None"}, "my_lora_30_steps_00001_.safetensors") == 30
    assert "its ss_steps metadata 'None' is not a step count" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert steps_of({"ss_output_name": "x"}, "downloaded.safetensors") == 0
    assert "could not read a step count from 'downloaded.safetensors'" in caplog.text
