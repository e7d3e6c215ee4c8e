"""The diff/diff_b benchmark (bench/diffs.py) runs in its quick mode and reports every variant.

No numbers are asserted beyond what holds by construction: the portable file (e) is variant b's
shape, and dropping the differences makes the file smaller. The measurement lives in bench/results.
"""
from __future__ import annotations

import json

import pytest
import torch

from comfyui_lora_trainer.bench import diffs


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_run_reports_every_variant(tmp_path, capsys):
    report = diffs.main(["--quick", "--jobs", "1", "--json", str(tmp_path / "diffs.json")])
    table = capsys.readouterr().out
    results = report["results"]
    assert set(results) == set(diffs.LABELS) == {"a", "b", "c", "d", "e"}
    for key, label in diffs.LABELS.items():
        assert f"| {key}: {label} |" in table
    assert json.loads((tmp_path / "diffs.json").read_text())["results"] == json.loads(json.dumps(results))
    mean = lambda key, name: results[key][name]["mean"]  # noqa: E731
    assert mean("e", "params") == mean("b", "params") < mean("c", "params") < mean("a", "params")
    assert mean("e", "file_bytes") < mean("a", "file_bytes")
    assert 0 < mean("a", "weight_share_diffs") < 1
    assert 0 < mean("a", "output_share_diffs_alone")
