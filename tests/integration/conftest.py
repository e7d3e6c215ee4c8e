"""Fixtures that run the pack inside a real ComfyUI server (skipped unless COMFYUI_DIR is set).

The server plumbing is in server.py (shared with bench/comfyui); see its docstring for the
environment variables. Tests reach the client helpers through the `comfy` fixture.
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


@pytest.fixture(scope="session")
def comfy(tmp_path_factory: pytest.TempPathFactory):
    """A ComfyUI server on CPU with this pack installed; see the module docstring."""
    try:
        comfy_dir = server.comfyui_dir()
    except server.NoComfyUI as why:
        pytest.skip(str(why))
    python = server.comfyui_python(comfy_dir)
    base = tmp_path_factory.mktemp("comfyui_base")
    server.make_base_dir(base, server.cached_checkpoint(comfy_dir, python))

    started = time.monotonic()
    client = server.start_server(comfy_dir, python, base)
    try:
        print(f"\nComfyUI up at {client.url} after {time.monotonic() - started:.1f} s (base {base})")
        yield client
    finally:
        server.stop(client.process)
