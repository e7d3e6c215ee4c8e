"""Headless training: run an API-format workflow on a ComfyUI server from the command line.

`python -m comfyui_lora_trainer run WORKFLOW.json [options]` submits the workflow through ComfyUI's
HTTP API (POST /prompt), follows it over the websocket (`/ws?clientId=`) or by polling
`/history/<prompt_id>`, and prints the outputs. Node inputs can be overridden (`--set`), swept
(`--sweep`) and repeated (`--queue`). The modules need only the standard library; the websocket
client (`websocket-client`, imported as `websocket`) is imported where it is used.

Modules: `workflow` (overrides and run plans), `client` (HTTP), `progress` (the terminal bar),
`follow` (events of one run), `report` (outputs, errors, summary), `cli` (the command).
"""
from __future__ import annotations

from .cli import main

__all__ = ["main"]
