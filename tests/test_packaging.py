"""What the wheel and the Comfy Registry read from pyproject.toml and setup.py: every package found (the
algorithms' subpackage included), web/ and the assets shipped, [tool.comfy] filled with an icon the
repository ships. scripts/wheel.sh (run by CI) builds and installs the wheel and runs the demo from it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import comfyui_lora_trainer as pack

ROOT = Path(pack.__file__).resolve().parent
tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))


def test_setuptools_finds_every_package_under_the_installed_name():
    from setuptools import find_packages

    found = set(find_packages(where=str(ROOT), exclude=("tests", "tests.*", "build", "build.*")))
    on_disk = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in ROOT.rglob("__init__.py")
               if p.parent != ROOT and not {".venv", "tests", "build"} & set(p.relative_to(ROOT).parts)}
    assert found == on_disk and "lora.algos" in found


def test_package_data_ships_web_and_the_assets():
    data = _pyproject()["tool"]["setuptools"]["package-data"]["comfyui_lora_trainer"]
    for shipped in ("web/progress.js", "assets/tiny_base.safetensors", "assets/icon.png",
                    "example_workflows/train_lora.json", "example_workflows/api/train_lora.json"):
        assert any(Path(shipped).match(pattern) for pattern in data), shipped
        assert (ROOT / shipped).is_file(), shipped


def test_the_registry_fields_are_filled_and_the_icon_is_shipped():
    comfy = _pyproject()["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith("/main/assets/icon.png")
    from PIL import Image

    with Image.open(ROOT / "assets" / "icon.png") as icon:
        assert icon.size[0] == icon.size[1] <= 400


def test_torch_is_comfyuis_and_an_extra_outside_it():
    """The Registry and ComfyUI-Manager read the dependencies and requirements.txt: the same list, without
    torch (ComfyUI's own must stay); `standalone` brings torch for use outside ComfyUI; the OS classifier."""
    project = _pyproject()["project"]
    required = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text("utf-8").splitlines()]
    assert sorted(project["dependencies"]) == sorted(r for r in required if r)
    assert not any(d.split(">")[0].split("=")[0].strip() == "torch" for d in project["dependencies"])
    assert project["optional-dependencies"]["standalone"] == ["torch"]
    assert "Operating System :: OS Independent" in project["classifiers"]


def test_comfy_cli_validates_the_node(tmp_path):
    """`comfy node validate` (comfy-cli, the Registry's own checker: pyproject's fields and its security scan
    of the code) passes, from comfy-cli installed in a throwaway venv."""
    import subprocess
    import venv

    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "comfy-cli==1.23.0"],
                               capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr[-2000:]
    done = subprocess.run([str(tmp_path / "venv" / "bin" / "comfy"), "--skip-prompt", "--no-enable-telemetry", "node",
                           "validate"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "All validation checks passed" in output, output[-3000:]
    assert "warning" not in output.lower(), output[-3000:]
