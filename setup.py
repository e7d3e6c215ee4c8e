"""Packaging: setuptools finds the subpackages (every folder with an __init__.py) and installs them under
`comfyui_lora_trainer`, the name the repository root has once installed (pyproject.toml's package-dir).
Tests, docs, scripts and the examples' data are not packages: the examples and assets go in as package
data (pyproject.toml)."""
from setuptools import find_packages, setup

NAME = "comfyui_lora_trainer"
subpackages = find_packages(where=".", exclude=("tests", "tests.*", "build", "build.*"))
setup(packages=[NAME, *(f"{NAME}.{package}" for package in subpackages)])
