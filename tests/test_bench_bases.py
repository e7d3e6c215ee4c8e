"""bench/bases.py's quick mode: the fp8-vs-bf16 memory report's structure and arithmetic. The memory target
itself is the benchmark's to measure (bench/results/bases.json), never a timed test's."""
from __future__ import annotations

import json

import pytest
import torch

from comfyui_lora_trainer.bench import bases


def test_quick_bases_report_has_every_base_and_case_and_its_budget_arithmetic(tmp_path, capsys):
    out = tmp_path / "bases.json"
    bases.main(["--steps", "1", "--width", "16", "--size", "8", "--json", str(out)])
    assert "| fp8_e4m3fn |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["cases"]) == {f"{d}:{c}" for d in bases.DTYPES for c in bases.CASES}
    report = result["report"]
    # the same model in fp8 rests in half the bytes of bf16; the LoRA (fp32 masters) is the same size
    assert report["fp8_e4m3fn"]["weights_mib"] == pytest.approx(report["bf16"]["weights_mib"] / 2)
    assert report["fp8_e4m3fn"]["lora_mib"] == report["bf16"]["lora_mib"] > 0
    for d, r in report.items():
        ours = result["cases"][f"{d}:ours"]
        assert r["budget_mib"] == pytest.approx(ours["saved_activations_mib"] + 4 * ours["lora_mib"])
        for case in ("ours", "ours_checkpointing"):
            assert r["meets_target"][case] == (r[f"{case}_peak_mib"] <= r["budget_mib"])
        assert r["saved_weight_casts_mib"] > 0  # F.linear/F.conv keep the cast weights: what the note names
        assert result["cases"][f"{d}:floor"]["lora_mib"] == 0
        # the adapters' tensors are counted: ours holds more than the floor and its parameters
        assert r["ours_peak_mib"] > r["floor_peak_mib"] + r["lora_mib"]


def test_live_bytes_counts_a_storage_once_until_it_is_freed():
    with bases.LiveBytes() as live:
        a = torch.zeros(1024)  # 4 KiB
        view = a[:10]
        b = a + 1  # 4 KiB more
        del a
        assert live.now == 8192  # the view keeps a's storage
        del view, b
        c = torch.zeros(256)
    assert live.peak == 8192 and live.now == 1024 and c.numel() == 256
