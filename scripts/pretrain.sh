#!/usr/bin/env bash
# Pretrain the bundled tiny base from scratch (about 40 min on two idle CPU cores); rewrites assets/tiny_base.safetensors.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec "$PY" -m comfyui_lora_trainer.tiny.pretrain "$@"
