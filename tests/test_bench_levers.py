"""bench/levers.py on a small model: each lever's estimate equals its real step, and the levers save memory."""
from __future__ import annotations

from comfyui_lora_trainer.bench import levers


def test_offload_and_checkpointing_lower_the_memory_and_the_estimate_holds():
    runs = {name: levers.memory(name, quick=True) for name in ("base", "offload+checkpointing", "all")}
    for name, r in runs.items():
        assert abs(r["ratio"] - 1) <= 0.05, (name, r)
    base, lean, everything = (runs[n]["estimate"] for n in ("base", "offload+checkpointing", "all"))
    assert lean["weights_mib"] < 0.1 * base["weights_mib"]  # only the norms stay on the device
    assert lean["activations_mib"] < base["activations_mib"] / 2
    # 8-bit moments (at this width most adapter tensors are under bitsandbytes' 4096 elements and keep fp32)
    assert everything["optimizer_mib"] < base["optimizer_mib"]
    assert everything["total_mib"] < lean["total_mib"] < base["total_mib"]


def test_the_table_has_every_case_with_its_time(monkeypatch):
    monkeypatch.setattr(levers, "CASES", {k: levers.CASES[k] for k in ("base", "AdamW8bit")})
    result = levers.run(1, quick=True)
    table = levers.markdown(result)
    assert set(result["cases"]) == {"base", "AdamW8bit"} and all(r["seconds_per_step"] > 0 for r in result["cases"].values())
    assert "| AdamW8bit |" in table and "1.00×" in table
