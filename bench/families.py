"""Step time and extra peak memory of Train LoRA on each model family's tiny model, in a real ComfyUI.

    COMFYUI_DIR=/path/to/ComfyUI python -m comfyui_lora_trainer.bench.families [--json PATH]

The figures come from the integration tests' own trainings (tests/integration: test_families.py for
SDXL and SD3, test_families_video.py for Wan 2.1 T2V and Qwen-Image, test_flux.py for Flux,
test_bases.py for the SD1.x UNet on fp8, test_family_matrix.py for Z-Image, Lumina2, Flux.2, Chroma,
HiDream, LTX-Video, LTX-2, HunyuanVideo, HunyuanVideo 1.5 and Wan 2.2 TI2V-5B): this runs those modules with LORA_TRAINER_FIGURES set, and
each training that goes through server.py's `run_measured` adds its seconds per step (Train LoRA's
log line: the steps after the first, whose first-use cost is left out) and the server's extra peak RSS (its high-water mark reset just
before the training, so it holds everything the training added: batch, activations, adapters and their
optimizer state, and first-use memory of the kernels). The tests' own assertions must pass, else no
figures are written. Models, sizes and settings are the tests' (tiny, CPU); compare rows of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..lora.files import write_atomically

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "families.json"
MODULES = ("test_families.py", "test_families_video.py", "test_flux.py", "test_bases.py", "test_family_matrix.py")


def run(python: str) -> dict[str, dict]:
    """Run the integration modules (with their assertions) and return the figures they recorded."""
    if not os.environ.get("COMFYUI_DIR"):
        raise SystemExit("bench.families needs COMFYUI_DIR: a ComfyUI checkout (see tests/integration/server.py)")
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "figures.json"
        command = [python, "-m", "pytest", "-c", str(ROOT / "tests" / "pytest.ini"), "-q", "-p", "no:cacheprovider",
                   *(str(ROOT / "tests" / "integration" / m) for m in MODULES)]
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, "LORA_TRAINER_FIGURES": str(figures)})
        if done.returncode != 0:
            raise SystemExit(f"the integration tests failed (exit {done.returncode}): no figures")
        return json.loads(figures.read_text())


def markdown(figures: dict[str, dict]) -> str:
    lines = ["| training | steps | s/step | extra peak RSS |", "|---|---|---|---|"]
    for name, f in figures.items():
        seconds = "?" if f["seconds_per_step"] is None else f"{f['seconds_per_step']:.3f}"
        memory = "?" if f["extra_peak_rss_mib"] is None else f"+{f['extra_peak_rss_mib']:.0f} MiB"
        lines.append(f"| {name} | {f['steps']} | {seconds} | {memory} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON", sys.executable),
                        help="the interpreter with ComfyUI's requirements and pytest (default: COMFYUI_PYTHON or this one)")
    args = parser.parse_args(argv)
    figures = run(args.python)
    print(markdown(figures))
    text = json.dumps(figures, indent=2)
    write_atomically(args.json, lambda tmp: Path(tmp).write_text(text), "results", overwrite=True)


if __name__ == "__main__":
    main()
