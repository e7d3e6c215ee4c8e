#!/usr/bin/env bash
# Run the test suite (installs what it needs into .venv first). Extra args go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec "$PY" -m pytest -c tests/pytest.ini -q "$@"
