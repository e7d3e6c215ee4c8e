"""bench/preservation.py's quick mode trains with preservation and a regularisation set and prints the table."""
from __future__ import annotations

import json

from comfyui_lora_trainer.bench import preservation


def test_quick_preservation_benchmark(tmp_path, capsys):
    report = preservation.main(["--quick", "--json", str(tmp_path / "p.json")])
    printed = capsys.readouterr().out
    assert "| variant | style | fresh shapes | colour drift |" in printed and "| DOP × 1 + regularisation set | " in printed
    row = report["table"]["DOP × 1 + regularisation set"]
    assert all(row[score]["mean"] >= 0 for score in preservation.SCORES)
    assert report["settings"]["base"]["fresh shapes"] > 0
    assert json.loads((tmp_path / "p.json").read_text())["settings"]["steps"] == 2
