#!/usr/bin/env bash
# Train a LoRA on the bundled tiny model from the bundled images (installs what it needs first).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec "$PY" -m comfyui_lora_trainer demo "$@"
