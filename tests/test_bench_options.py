"""bench/options.py's quick mode runs the real loop and prints the table."""
from __future__ import annotations

import json

from comfyui_lora_trainer.bench import options


def test_quick_options_benchmark(tmp_path, capsys):
    report = options.main(["--quick", "--json", str(tmp_path / "o.json")])
    printed = capsys.readouterr().out
    assert "| default | " in printed and "| flow_shift resolution (Flux) | n/a |" in printed
    assert report["table"]["loss_weighting min_snr (γ 5)"]["eps"]["mean"] > 0
    assert json.loads((tmp_path / "o.json").read_text())["settings"]["steps"] == 2
