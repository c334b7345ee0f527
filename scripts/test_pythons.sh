#!/usr/bin/env bash
# Run the whole test suite on the other CPythons the project supports (.venv, where
# ./scripts/test runs everything else, is 3.11): for each of 3.12 and 3.13 (or the versions
# given as arguments), find the interpreter (pyenv's versions, then python3.X on PATH),
# install the project with the dev extra into .venv-3.X (reused while pyproject.toml is
# unchanged) and run pytest there. A missing interpreter is skipped with a line saying so;
# a failing suite does not stop the next interpreter, but fails this script.
# The suites run at the same time, one per interpreter, each into build/pytest-3.X.log: a
# suite keeps about 0.8 of a core busy (it mostly waits on worker start-ups, timeouts and
# subprocesses), so two of them on the 2-core VM take about 280 s together instead of
# about 470 s one after the other. Its timing assertions are generous, but they were
# written for a machine to themselves: a test that fails beside the other suite runs again
# alone afterwards (pytest --lf), with a line naming it; it counts as passed only if it
# passes then. CANO_MP_PYTHONS_SERIAL=1 runs the suites one after the other instead.
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
runs=()  # "version venv" of each suite to run
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
  # bytecode for this interpreter (see scripts/_venv.sh: PYTHONDONTWRITEBYTECODE)
  "$venv/bin/python" -m compileall -q -j 0 cano_mp tests examples >/dev/null || true
  runs+=("$version $venv")
done
if [ "${CANO_MP_PYTHONS_SETUP_ONLY:-}" = "1" ] || [ ${#runs[@]} -eq 0 ]; then exit 0; fi

marker=()
if [ "${CANO_MP_SKIP_SLOW:-}" = "1" ]; then marker=(-m "not slow"); fi
mkdir -p build
# pytest's cache (for --lf) goes to build/, one per interpreter, not to .pytest_cache.
suite() {  # version venv [pytest args...]
  local version="$1" venv="$2"
  shift 2
  "$venv/bin/python" -m pytest -q -o cache_dir="build/pytest-cache-$version" "$@"
}
if [ "${CANO_MP_PYTHONS_SERIAL:-}" = "1" ] || [ ${#runs[@]} -eq 1 ]; then
  for run in "${runs[@]}"; do
    read -r version venv <<<"$run"
    started=$SECONDS
    if suite "$version" "$venv" -x "${marker[@]}"; then
      echo "   python$version: the suite passed in $((SECONDS - started))s"
    else
      echo "   python$version: the suite FAILED after $((SECONDS - started))s"
      failed+=("$version")
    fi
  done
else
  started=$SECONDS
  pids=()
  for run in "${runs[@]}"; do
    read -r version venv <<<"$run"
    echo "-- python$version: the suite runs (build/pytest-$version.log)"
    suite "$version" "$venv" "${marker[@]}" >"build/pytest-$version.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!runs[@]}"; do
    read -r version venv <<<"${runs[$i]}"
    rc=0
    wait "${pids[$i]}" || rc=$?
    echo "-- python$version: $(tail -n 1 "build/pytest-$version.log") (exit $rc)"
    if [ $rc -eq 0 ]; then continue; fi
    grep -E "^(FAILED|ERROR) " "build/pytest-$version.log" || tail -n 30 "build/pytest-$version.log"
    if [ $rc -ne 1 ]; then  # not test failures (a crash, an interrupt, a usage error)
      failed+=("$version")
      continue
    fi
    echo "   python$version: running the tests that failed beside the other suite again, alone"
    if suite "$version" "$venv" --lf "${marker[@]}"; then
      echo "   python$version: they PASSED alone: they failed under the other suite's load" \
        "(see build/pytest-$version.log)"
    else
      failed+=("$version")
    fi
  done
  echo "   the suites took $((SECONDS - started))s"
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "-- the suite failed on python ${failed[*]}"
  exit 1
fi
