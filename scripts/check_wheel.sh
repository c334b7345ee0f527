#!/usr/bin/env bash
# Test what users install. Build the sdist and the wheel (`python -m build` builds the wheel
# from the sdist, so a file missing from the sdist fails here), check their metadata with
# `twine check --strict`, install the wheel into build/wheel-venv and run
# scripts/smoke_installed.py with that venv's python from a directory outside the source
# tree: the smoke test, every example and the `cano-mp` command, all on the installed package.
# The venv and the dependencies the wheel declares are reused while pyproject.toml is
# unchanged; the wheel itself is rebuilt and reinstalled on every run.
# ./scripts/test runs it; alone, it sets up .venv (build and twine are in the dev extra).
# --deps-only: only create the venv and install the dependencies pyproject.toml declares
# (./scripts/test does that in the background while the 3.11 suite runs: pip waits on the
# network and the disk); the run that follows installs the wheel with --no-deps, and
# `pip check` fails it should the wheel declare anything that venv lacks.
source "$(dirname "$0")/_venv.sh" dev
DIST=build/dist
VENV=build/wheel-venv
EXTRAS=numpy,dask
mkdir -p build
STAMP="$VENV/.deps-$(sha1sum pyproject.toml | cut -c1-12)"
if [ "${1:-}" = "--deps-only" ]; then
  if [ ! -f "$STAMP" ]; then
    rm -rf "$VENV"
    python -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip >/dev/null
    mapfile -t deps < <(python -c '
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project.get("optional-dependencies", {})
print("\n".join(project["dependencies"] + [d for e in sys.argv[1].split(",") for d in extras[e]]))
' "$EXTRAS")
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${deps[@]}"
    touch "$STAMP"
  fi
  echo "-- $VENV has the dependencies of cano_mp[$EXTRAS]"
  exit 0
fi
rm -rf "$DIST"

echo "-- python -m build (sdist, then the wheel from the sdist)"
if ! python -m build --outdir "$DIST" . >build/build.log 2>&1; then
  cat build/build.log
  exit 1
fi
# The build's own output is long: show only its warnings (there should be none; a new
# setuptools deprecation shows here without failing the run).
grep -E "[A-Za-z]Warning\b|[Dd]eprecat" build/build.log | sed 's/^/   build: /' || true
ls "$DIST"

echo "-- twine check --strict"
python -m twine check --strict "$DIST"/*

shopt -s nullglob
wheels=("$DIST"/*.whl)
if [ ${#wheels[@]} -ne 1 ]; then
  echo "expected one wheel in $DIST, found ${#wheels[@]}" >&2
  exit 1
fi
WHEEL="$ROOT/${wheels[0]}"

if [ ! -f "$STAMP" ]; then
  echo "-- creating $VENV and installing the wheel with its dependencies (numpy, dask extras)"
  rm -rf "$VENV"
  python -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip >/dev/null
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$WHEEL[$EXTRAS]"
  touch "$STAMP"
else
  echo "-- installing the new wheel into $VENV (dependencies reused: pyproject.toml unchanged)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
    "$WHEEL"
fi
"$VENV/bin/python" -m pip check --disable-pip-version-check

echo "-- smoke test and examples against the installed wheel"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
cp -r examples "$TMP/examples"
# -I: no PYTHONPATH, no user site, no script directory on sys.path; cwd outside the tree
(cd "$TMP" && env -u PYTHONPATH "$ROOT/$VENV/bin/python" -I "$ROOT/scripts/smoke_installed.py" \
  --examples "$TMP/examples" --work "$TMP/work")
