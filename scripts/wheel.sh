#!/usr/bin/env bash
# Build the wheel, install it (not editable) into a fresh venv beside the CPU torch pin, and run the
# demo from it, outside the checkout: what `pip install .` users get must import and train.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 -m venv "$WORK/venv"
PIP="$WORK/venv/bin/pip"
"$PIP" install -q --upgrade pip
"$PIP" install -q "torch==2.13.0"   # CPU build; the standalone extra's unpinned torch is then satisfied
# built from a copy of the files git tracks (or would), so no build/ or egg-info lands in the checkout
mkdir "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf -) | tar -xf - -C "$WORK/src"
"$PIP" wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/comfyui_lora_trainer-*.whl)"
"$PIP" install -q "$WHEEL[standalone]"   # outside ComfyUI: torch comes with the extra (here, the pin above)
cd "$WORK"   # nothing of the checkout on the path: the import comes from site-packages
"$WORK/venv/bin/python" - <<'PY'
import importlib.resources, pathlib, comfyui_lora_trainer as pack
root = pathlib.Path(pack.__file__).parent
assert "site-packages" in str(root), root
for shipped in ("web/progress.js", "lora/algos/lora.py", "assets/tiny_base.safetensors", "assets/icon.png",
                "example_workflows/train_lora.json"):
    assert (root / shipped).is_file(), f"the wheel lacks {shipped}"
assert len(pack.NODE_CLASS_MAPPINGS) == 21 and pack.WEB_DIRECTORY == "./web"
print(f"wheel: installed at {root}, {len(pack.NODE_CLASS_MAPPINGS)} nodes, web/ and assets shipped")
PY
"$WORK/venv/bin/python" -m comfyui_lora_trainer demo --steps 2 --out "$WORK/demo"
ls "$WORK/demo"/*.safetensors > /dev/null
echo "wheel: the demo ran from the installed wheel"
