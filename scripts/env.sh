# Sourced by the quick-start scripts: make .venv (once) with the CPU torch pin and the pack installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import comfyui_lora_trainer, pytest, torch, bitsandbytes, pytorch_optimizer, schedulefree" 2>/dev/null; then
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "torch==2.13.0"   # CPU build; inside ComfyUI, ComfyUI's torch is used
  "$VENV/bin/pip" install -q -e "$ROOT[dev]"
fi
PY="$VENV/bin/python"
