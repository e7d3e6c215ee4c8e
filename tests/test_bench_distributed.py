"""bench/distributed.py's quick mode: both runs report, the two-process run trains the same LoRA (its
final loss), and the all-reduce bytes are the LoRA's fp32 gradients plus the loss. The speed figure
itself is the benchmark's (bench/results/distributed.json), never a timed test's."""
from __future__ import annotations

import json

import pytest

from comfyui_lora_trainer.bench import distributed


def test_quick_distributed_bench_reports_both_runs(tmp_path, capsys):
    out = tmp_path / "distributed.json"
    distributed.main(["--steps", "2", "--batch", "4", "--json", str(out)])
    assert "2 gloo processes" in capsys.readouterr().out
    result = json.loads(out.read_text())
    single, parallel = result["single"], result["parallel"]
    assert (single["processes"], parallel["processes"]) == (1, 2)
    assert parallel["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)
    assert single["allreduce_bytes_per_step"] == 4 * single["lora_parameters"] + 8
    assert result["speedup"] == pytest.approx(single["seconds_per_step"] / parallel["seconds_per_step"])
