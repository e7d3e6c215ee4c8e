"""The bucket comparison in docs/data.md is what scripts/bucket_table.py prints, and our rule behaves in
it as training/buckets.py says: a phone portrait gets a portrait bucket within the target area, and an
image smaller than every bucket is not scaled up."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Aspect-ratio buckets: our rule beside kohya's and ai-toolkit's"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("bucket_table", ROOT / "scripts" / "bucket_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(table: str) -> dict[str, list[str]]:
    """Source size → the row's cells after it."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in table.splitlines()[2:] if line.startswith("|")]
    return {cells[0]: cells[1:] for cells in rows}


def _size(cell: str) -> tuple[int, int]:
    width, height = re.match(r"(\d+)×(\d+)", cell).groups()
    return int(width), int(height)


def test_the_docs_table_is_the_scripts_output(script, capsys):
    printed = script.main()
    assert capsys.readouterr().out == printed
    text = (ROOT / "docs" / "data.md").read_text("utf-8")
    assert SECTION in text
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    assert printed in section, "docs/data.md's bucket table is stale: paste `python scripts/bucket_table.py`'s output"
    assert "python scripts/bucket_table.py" in section


def test_a_phone_portrait_gets_a_portrait_bucket_within_the_area(script):
    row = _rows(script.table())["3024×4032"]
    width, height = _size(row[1])  # our bucket
    assert (width, height) == script.ours(3024, 4032)
    assert width < height and width * height <= 1024 * 1024 and width % 64 == 0 and height % 64 == 0


def test_an_image_smaller_than_every_bucket_is_not_scaled_up(script):
    rows = _rows(script.table())
    for source in ("800×600", "512×768", "640×640"):
        ours, kohya_default, kohya_no_upscale = rows[source][1:4]
        width, height = _size(source)
        bucket = _size(ours)
        assert bucket[0] <= width and bucket[1] <= height and "↑" not in ours
        assert bucket == _size(kohya_no_upscale)  # kohya's --bucket_no_upscale agrees on small images
        assert "↑" in kohya_default  # kohya's default scales it up
    assert _size(rows["800×600"][1]) == (768, 576)  # its own size, each side floored to the step


def test_ours_and_kohyas_upscaling_rule_agree_on_large_landscapes(script):
    rows = _rows(script.table())
    for source in ("4032×3024", "1920×1080", "2048×1024", "3000×1000", "1024×1024"):
        assert _size(rows[source][1]) == _size(rows[source][2])
