"""A LoRA file's metadata, as kohya-ss sd-scripts and ModelSpec write it, and the file formats.

Keys and value formats (all strings, as safetensors metadata must be; kohya writes `str(value)`, so
booleans are "True"/"False" and unset values "None"):
- kohya-ss (`train_network.py`): `ss_network_module` ("networks.lora", or "lycoris.kohya" with
  `ss_network_args` {"algo": ...} as LyCORIS writes it), `ss_network_dim`, `ss_network_alpha`,
  `ss_steps`, `ss_base_model_version` ("sd_v1", "sd_v2", "sdxl_base_v1-0", "flux1"), `ss_v2`, and the
  training settings (training/config.py `kohya_metadata`: also `ss_num_epochs`, `ss_epoch`,
  `ss_num_batches_per_epoch`); the run (`session_metadata`): `ss_session_id` (an integer naming the
  run), `ss_training_started_at`, `ss_training_finished_at` (unix time, `str(time.time())`); the
  images (`dataset_metadata`): `ss_resolution` ("(512, 512)", width first), `ss_enable_bucket`,
  `ss_bucket_info` (JSON {"buckets": {"0": {"resolution": [w, h], "count": n}}, "mean_img_ar_error"});
  the file (`output_name`): `ss_output_name`, the name the file was saved under, without counter;
- ModelSpec 1.0.1 (`modelspec.*`, as sd-scripts' `sai_model_spec.py` writes it for a LoRA):
  `sai_model_spec`, `architecture` ("stable-diffusion-v1/lora", "flux-1-dev/lora"…),
  `implementation`, `title`, `date`, `resolution` ("WxH" of the training images), `prediction_type`;
- ours (`lora_trainer.*`): `naming` (naming.SCHEMES), `format` (FORMATS), `settings` (the full
  TrainConfig as JSON), `difference_share`, and for a portable file what it left out.

A LORA_MODEL value that carries metadata is a `LoraStateDict`: a plain dict (so ComfyUI core's LoRA
nodes take it) with a `metadata` attribute. Continuing a LoRA reads its steps from `ss_steps`
(`steps_of`), the file name being only the fallback.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .algos import detect
from .algos.lora import DOWN, MID  # MID: LoCon's Tucker core (LyCORIS `use_tucker`)
from .formats import parse_steps
from .keys import ALPHA, DIFF, DIFF_B, is_text_encoder_key, split_key
from .naming import MODULE_PATHS, Naming

log = logging.getLogger(__name__)

# portable: only what every loader reads (no diff / diff_b); full: everything, for ComfyUI.
FORMATS = ("portable", "full")
PREFIX = "lora_trainer."


class LoraStateDict(dict):
    """{key: tensor} as a file holds it, plus the metadata its training wrote (`metadata`, str → str)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor] = (), metadata: Mapping[str, str] | None = None):
        super().__init__(tensors)
        self.metadata: dict[str, str] = dict(metadata or {})


EXPERT = PREFIX + "expert"  # which expert of a noise-range-expert model a file is for (Wan 2.2 A14B)
EXPERT_BOUNDARY = PREFIX + "expert_boundary"  # the σ where its high-noise expert hands over to the low-noise one


class ExpertLoras(LoraStateDict):
    """The LoRAs of a model trained as noise-range experts in one run (Wan 2.2 A14B), as one LORA_MODEL: the
    dict itself is the `main` expert's LoRA (what a LoRA node applies to that expert's model), `experts` maps
    each expert's name to its LoRA (Save LoRA writes one file each)."""

    def __init__(self, experts: Mapping[str, LoraStateDict], main: str):
        super().__init__(experts[main], experts[main].metadata)
        self.experts: dict[str, LoraStateDict] = dict(experts)


def expert_metadata(expert: str, boundary: float) -> dict[str, str]:
    """The keys saying which expert a file is for: ours (`EXPERT`, `EXPERT_BOUNDARY`), and its σ range × 1000 as
    kohya's ss_min_timestep / ss_max_timestep, the convention of musubi-tuner's Wan 2.2 runs (timesteps after
    the shift: its high-noise LoRAs train with --min_timestep 875 --max_timestep 1000)."""
    edge = str(round(boundary * 1000))
    low, high = (edge, "1000") if expert == "high_noise" else ("0", edge)
    return {EXPERT: expert, EXPERT_BOUNDARY: f"{boundary:g}", "ss_min_timestep": low, "ss_max_timestep": high}


def expert_stem(stem: str, metadata: Mapping[str, str]) -> str:
    """A file name stem with the expert its metadata names appended (`my_lora_high_noise`), unless it ends so."""
    expert = metadata.get(EXPERT)
    return stem if not expert or stem.endswith(expert) else f"{stem}_{expert}"


@dataclass(frozen=True)
class BaseModel:
    """The model a LoRA is trained on, as kohya-ss (`version`) and ModelSpec (the rest) name it, and
    the naming its layers get in the file."""

    version: str
    architecture: str
    implementation: str
    resolution: str
    prediction_type: str | None = None  # epsilon / v; None for flow models (as sd-scripts writes Flux)
    naming: Naming = MODULE_PATHS
    pixel_scale: int = 8  # image pixels per latent cell (ComfyUI latent_format.spacial_downscale_ratio)

    def metadata(self) -> dict[str, str]:
        meta = {"ss_base_model_version": self.version, "ss_v2": str(self.version.startswith("sd_v2")),
                "modelspec.architecture": f"{self.architecture}/lora",
                "modelspec.implementation": self.implementation, "modelspec.resolution": self.resolution,
                PREFIX + "naming": self.naming.scheme}
        if self.prediction_type is not None:
            meta["modelspec.prediction_type"] = self.prediction_type
        return meta


def dataset_metadata(sizes: Sequence[tuple[int, int]], pixel_scale: int = 1) -> dict[str, str]:
    """The training images' sizes as kohya and ModelSpec write them. `sizes`: (height, width) of each
    image as trained (a latent's last two dims); × `pixel_scale` gives pixels (8 for the SD, SDXL and
    Flux VAEs). Each image trains at its own size, which is kohya's bucketing with one bucket per size
    and no aspect-ratio error; `ss_resolution` and `modelspec.resolution` name the largest one (kohya's
    resolution is the area its buckets fit in)."""
    if not sizes:
        return {}
    counts = Counter((int(w) * pixel_scale, int(h) * pixel_scale) for h, w in sizes)
    width, height = max(counts, key=lambda wh: (wh[0] * wh[1], counts[wh]))
    buckets = {str(i): {"resolution": [w, h], "count": counts[(w, h)]} for i, (w, h) in enumerate(sorted(counts))}
    return {"ss_resolution": str((width, height)), "ss_enable_bucket": str(len(counts) > 1),
            "ss_bucket_info": json.dumps({"buckets": buckets, "mean_img_ar_error": 0.0}),
            "modelspec.resolution": f"{width}x{height}"}


def session_metadata(started: float, finished: float) -> dict[str, str]:
    """The run's start and end (unix seconds, as `str(time.time())`) and an id every file of the run
    shares (kohya: a random integer below 2**32; here drawn from the start time, so the run's RNG is
    untouched)."""
    return {"ss_session_id": str(int(started * 1e6) % 2**32), "ss_training_started_at": str(started),
            "ss_training_finished_at": str(finished)}


def output_name(stem: str) -> dict[str, str]:
    """The keys naming a saved file: kohya's `ss_output_name` and ModelSpec's title, both the name it
    was saved under without step and counter ("my_lora" for my_lora_200_steps_00001_.safetensors)."""
    return {"ss_output_name": stem, "modelspec.title": stem}


def steps_of(metadata: Mapping[str, str], name: str) -> int:
    """The steps a LoRA file was trained for: its `ss_steps` (what Save LoRA, checkpoints and kohya
    write), else the `_<N>_steps_` of its file name, else 0 (with a warning)."""
    value = str(metadata.get("ss_steps", "")).strip()
    if value.isascii() and value.isdigit():
        return int(value)
    if value:
        log.warning("%r: its ss_steps metadata %r is not a step count; reading the steps from its name", name, value)
    return parse_steps(name)


# How kohya-ss and LyCORIS name the network (sd-scripts train_network.py; LyCORIS's kohya wrapper with
# its `algo` network argument; DoRA is LyCORIS's `dora_wd`).
_NETWORK_ARGS = {"loha": {"algo": "loha"}, "lokr": {"algo": "lokr"}, "dora": {"algo": "locon", "dora_wd": "True"}}


def _layer_suffixes(sd: Mapping[str, torch.Tensor]) -> dict[str, set[str]]:
    suffixes: dict[str, set[str]] = defaultdict(set)
    for key in sd:
        parts = split_key(key)
        if parts is not None and not is_text_encoder_key(key):
            suffixes[parts[0]].add(parts[1])
    return suffixes


def network_metadata(sd: Mapping[str, torch.Tensor], extra_args: Mapping[str, str] | None = None) -> dict[str, str]:
    """`ss_network_module` (and `ss_network_args`) for a state dict, as kohya/LyCORIS write them:
    "networks.lora" for LoRA, "lycoris.kohya" with {"algo": ...} for LoHa, LoKr, DoRA and Tucker LoCon
    (`lora_mid`, which kohya's own loader does not read); `extra_args`
    (kohya's conv_dim, conv_alpha, LyCORIS's factor) join the args."""
    layers = list(_layer_suffixes(sd).values())
    found = {algo.NAME for algo in (detect(frozenset(s)) for s in layers) if algo is not None}
    lycoris = sorted(found & set(_NETWORK_ARGS))
    tucker = any(MID in s for s in layers)  # kohya's networks.lora has no lora_mid
    args = dict(_NETWORK_ARGS[lycoris[0]]) if lycoris else ({"algo": "locon"} if tucker else {})
    if tucker:
        args["use_tucker"] = "True"
    args.update(extra_args or {})
    meta = {"ss_network_module": "lycoris.kohya" if "algo" in args else "networks.lora"}
    if args:
        meta["ss_network_args"] = json.dumps(args)
    return meta


def rank_and_alpha(sd: Mapping[str, torch.Tensor]) -> tuple[int, float] | None:
    """The (rank, alpha) most LoRA/DoRA layers of a file have (kohya's ss_network_dim/alpha); None if none."""
    counts: dict[tuple[int, float], int] = defaultdict(int)
    for name in _layer_suffixes(sd):
        down = sd.get(f"{name}.{DOWN}")
        if down is not None:
            alpha = sd.get(f"{name}.{ALPHA}")
            rank = down.shape[0]
            counts[(rank, float(alpha) if alpha is not None and float(alpha) else float(rank))] += 1
    return max(counts, key=counts.get) if counts else None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def file_metadata(sd: Mapping[str, torch.Tensor], steps: int | None, file_format: str,
                  trained: Mapping[str, str] | None = None, title: str | None = None) -> dict[str, str]:
    """The metadata a file of `sd` gets: what the tensors say (network, rank, alpha), ModelSpec's
    required keys, the format, the steps, and `trained` (what training wrote) over it."""
    if file_format not in FORMATS:
        raise ValueError(f"format: got {file_format!r}; choose one of {', '.join(FORMATS)}")
    now = time.time()
    meta = {"modelspec.sai_model_spec": "1.0.1", "modelspec.title": title or f"LoRA@{int(now)}",
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
            **network_metadata(sd)}
    found = rank_and_alpha(sd)
    if found is not None:
        meta["ss_network_dim"], meta["ss_network_alpha"] = str(found[0]), _number(found[1])
    meta.update(trained or {})
    meta[PREFIX + "format"] = file_format
    if steps is not None:
        meta["ss_steps"] = str(steps)
    return meta


def difference_keys(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The diff / diff_b keys (weight and bias differences), which only ComfyUI's loader reads."""
    return [k for k in sd if (parts := split_key(k)) is not None and parts[1] in (DIFF, DIFF_B)]


def portable(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the state dict without diff / diff_b, the keys left out)."""
    dropped = difference_keys(sd)
    left_out = set(dropped)
    return {k: t for k, t in sd.items() if k not in left_out}, dropped
