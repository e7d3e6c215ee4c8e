"""Fixtures that run the pack inside a real ComfyUI server (skipped unless COMFYUI_DIR is set).

The server plumbing is in server.py (shared with bench/comfyui); see its docstring for the
environment variables. Tests reach the client helpers through the `comfy` fixture (the tiny SD1.5
checkpoint, one server per session) or `comfy_flux` (a server of its own per test module, with the
tiny Flux model and VAE from make_flux.py and the test-only node it_flux_nodes.py).
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("lora_trainer_it_server", Path(__file__).with_name("server.py"))
server = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = server
_spec.loader.exec_module(server)


def _serve(comfy_dir: Path, python: str, base: Path):
    started = time.monotonic()
    client = server.start_server(comfy_dir, python, base)
    try:
        print(f"\nComfyUI up at {client.url} after {time.monotonic() - started:.1f} s (base {base})")
        yield client
    finally:
        server.stop(client.process)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory: pytest.TempPathFactory):
    """A ComfyUI server on CPU with this pack installed; see the module docstring."""
    comfy_dir, python = server.comfyui_or_skip()
    base = tmp_path_factory.mktemp("comfyui_base")
    server.make_base_dir(base, server.cached_checkpoint(comfy_dir, python))
    yield from _serve(comfy_dir, python, base)


@pytest.fixture(scope="module")
def comfy_flux(tmp_path_factory: pytest.TempPathFactory):
    """A ComfyUI server of its own with models/diffusion_models/tiny_flux.safetensors,
    models/vae/tiny_flux_vae.safetensors (make_flux.py) and the test-only ITFluxConditioning node."""
    comfy_dir, python = server.comfyui_or_skip()
    model, vae = server.cached_flux(comfy_dir, python)
    base = tmp_path_factory.mktemp("comfyui_flux_base")
    server.make_base_dir(base, None, {
        f"models/diffusion_models/{server.FLUX_MODEL_NAME}": model,
        f"models/vae/{server.FLUX_VAE_NAME}": vae,
        "custom_nodes/it_flux_nodes.py": Path(__file__).with_name("it_flux_nodes.py"),
    })
    yield from _serve(comfy_dir, python, base)
