# Sourced by scripts/demo and scripts/test: create or reuse .venv and install the project
# with the given extras, re-installing only when pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
EXTRAS="$1"
STAMP=".venv/.cano-installed-$(cat pyproject.toml | sha1sum | cut -c1-12)-${EXTRAS//,/_}"
if [ ! -f "$STAMP" ]; then
  echo "installing cano_mp[$EXTRAS] into .venv" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -U pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
  touch "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
# Python here may be told not to write bytecode (PYTHONDONTWRITEBYTECODE=1): then every
# worker process and every subprocess of the tests compiles the project's sources again
# (~90 ms for the engine's modules). Compile them once; unchanged files are skipped, and a
# stale .pyc is never used (its source's mtime is checked on import).
.venv/bin/python -m compileall -q -j 0 cano_mp tests examples >/dev/null || true
