#!/usr/bin/env bash
# Run the whole test suite on the other CPythons the project supports (.venv, where
# ./scripts/test runs everything else, is 3.11): for each of 3.12 and 3.13 (or the versions
# given as arguments), find the interpreter (pyenv's versions, then python3.X on PATH),
# install the project with the dev extra into .venv-3.X (reused while pyproject.toml is
# unchanged) and run pytest there. A missing interpreter is skipped with a line saying so;
# a failing suite does not stop the next interpreter, but fails this script.
# The runs are one after the other, not in parallel: the suite's timing assertions
# (scheduler lateness, prompt cancellation) need the CPUs to themselves.
# CANO_MP_SKIP_SLOW=1 leaves out the tests marked `slow` (the Dask cluster, the end-to-end
# example runs, the crash-and-resume trials: about a minute per interpreter); ./scripts/test
# sets it by default, since those tests run on 3.11 there and the whole command must stay
# under 15 minutes on the 2-core VM (CANO_MP_SKIP_SLOW=0 ./scripts/test runs them everywhere).
# CANO_MP_PYTHONS_SETUP_ONLY=1 only creates the venvs (./scripts/test does that in the
# background while the 3.11 suite runs).
#   ./scripts/test_pythons.sh            # 3.12 and 3.13
#   ./scripts/test_pythons.sh 3.13       # one of them
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ $# -eq 0 ]; then set -- 3.12 3.13; fi

# The path of a working CPython X.Y, or nothing. pyenv's shims answer for any installed
# version but fail unless it is selected, so every candidate is run once to check it.
find_python() {
  local version="$1" candidates=() dir cand
  if command -v pyenv >/dev/null 2>&1; then
    local root
    root="$(pyenv root)"
    for dir in $(ls -d "$root/versions/$version".* 2>/dev/null | sort -V -r); do
      candidates+=("$dir/bin/python$version")
    done
  fi
  for dir in $(ls -d "$HOME/.pyenv/versions/$version".* 2>/dev/null | sort -V -r); do
    candidates+=("$dir/bin/python$version")
  done
  if command -v "python$version" >/dev/null 2>&1; then
    candidates+=("$(command -v "python$version")")
  fi
  for cand in "${candidates[@]}"; do
    if [ -x "$cand" ] && [ "$("$cand" -c 'import sys; print("%d.%d" % sys.version_info[:2])' \
      2>/dev/null)" = "$version" ]; then
      echo "$cand"
      return
    fi
  done
}

failed=()
for version in "$@"; do
  py="$(find_python "$version")"
  if [ -z "$py" ]; then
    echo "-- python$version: SKIPPED, no CPython $version found (pyenv or python$version on PATH)"
    continue
  fi
  venv=".venv-$version"
  echo "-- python$version: $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
  started=$SECONDS
  if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
  fi
  stamp="$venv/.cano-installed-$(sha1sum pyproject.toml | cut -c1-12)-dev"
  if [ ! -f "$stamp" ]; then
    echo "   installing cano_mp[dev] into $venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -U pip >/dev/null
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
    touch "$stamp"
  fi
  echo "   setup took $((SECONDS - started))s"
  if [ "${CANO_MP_PYTHONS_SETUP_ONLY:-}" = "1" ]; then continue; fi
  started=$SECONDS
  marker=()
  if [ "${CANO_MP_SKIP_SLOW:-}" = "1" ]; then marker=(-m "not slow"); fi
  if "$venv/bin/python" -m pytest -q -x -p no:cacheprovider "${marker[@]}"; then
    echo "   python$version: the suite passed in $((SECONDS - started))s"
  else
    echo "   python$version: the suite FAILED after $((SECONDS - started))s"
    failed+=("$version")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "-- the suite failed on python ${failed[*]}"
  exit 1
fi
