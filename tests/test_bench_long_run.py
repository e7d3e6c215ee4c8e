"""bench/long_run.py's quick mode: a short run with checkpoints, validation and previews on, and the report it
measures. Structure and arithmetic only: the memory target is the benchmark's to measure, never a timed test's."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from comfyui_lora_trainer.bench import long_run


def test_slope_is_the_least_squares_growth_per_100_steps():
    steps = [300, 400, 500, 600]
    assert long_run.slope_per_100(steps, [10.0 + 0.02 * s for s in steps]) == pytest.approx(2.0)
    assert long_run.slope_per_100(steps, [5.0, 7.0, 5.0, 7.0]) == pytest.approx(0.4)  # (x−x̄)·y / Σ(x−x̄)²
    assert math.isnan(long_run.slope_per_100([300], [1.0]))


def test_quick_long_run_reports_memory_time_the_work_done_and_what_grew(tmp_path, capsys):
    report = long_run.main(["--quick", "--trace", "--json", str(tmp_path / "l.json"),
                            "--output", str(tmp_path / "out")])
    assert "growth per 100 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "l.json").read_text()) == json.loads(json.dumps(report))
    samples = report["samples"]
    assert [s["step"] for s in samples] == list(range(0, 41, 5))  # before the first step, then every 5
    for s in samples:
        assert 0 < s["rss_mib"] <= s["peak_mib"] and s["gc_objects"] > 0
    after = [s for s in samples if s["step"] >= report["settings"]["warmup"]]
    growth = report["growth_per_100_steps"]
    assert growth["samples"] == len(after) == 7
    x = np.array([s["step"] for s in after], dtype=float)
    for key in ("rss_mib", "peak_mib", "gc_objects"):
        y = np.array([s[key] for s in after], dtype=float)
        expected = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum() * 100
        assert growth[key] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert report["target"]["met"] == (growth["peak_mib"] < report["target"]["peak_mib_per_100_steps_below"])
    work = report["work"]
    assert work["steps"] == 40 and work["checkpoints_written"] == 4  # every 10 steps
    assert work["checkpoints_left"] == ["long_run_30_steps_00001_.safetensors", "long_run_40_steps_00001_.safetensors"]
    assert work["validations"] == 9 and work["previews"] == 2  # before step 1 and every 5; every 20
    assert math.isfinite(work["final_loss"]) and math.isfinite(work["final_validation_loss"])
    previews = tmp_path / "out" / "lora_previews"
    assert sorted(p.name for p in previews.iterdir()) == ["grid.png", "preview_20_steps_00001_.png",
                                                          "preview_40_steps_00001_.png"]
    # --trace: tracemalloc from the warm-up on; a full collection before each snapshot after its start
    assert [s["step"] for s in samples if "collected" in s] == list(range(15, 41, 5))
    assert report["traced_growth"] and all(t["where"] and isinstance(t["kib"], float) for t in report["traced_growth"])
    times = report["time"]
    assert times["total_s"] > 0 and times["step_ms_median"] > 0 and times["previews_s"] > 0
