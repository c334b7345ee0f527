#!/usr/bin/env bash
# Interleaved before/after benchmark runs: `scripts/bench.py CASES` of another commit (in a
# detached worktree of its own, with its own scripts/bench.py) and of this tree, in turn,
# ROUNDS times (A B A B ...), so that the machine's drift hits both alike; compare medians.
#   ./scripts/ab_bench.sh 4902e90 chain fanout tiny instances      # ROUNDS=3 by default
#   ROUNDS=8 ./scripts/ab_bench.sh HEAD~5 chain
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ $# -ge 2 ] || { echo "usage: $0 BASE_REF CASE..." >&2; exit 2; }
base_ref="$1"; shift
source "$ROOT/scripts/_venv.sh" dev,bench
BASE="$(mktemp -d /tmp/cano-ab-XXXXXX)"
trap 'git -C "$ROOT" worktree remove --force "$BASE" >/dev/null 2>&1 || rm -rf "$BASE"' EXIT
git -C "$ROOT" worktree add --detach "$BASE" "$base_ref" >/dev/null
for r in $(seq "${ROUNDS:-3}"); do
  for tree in "$BASE" "$ROOT"; do
    echo "=== round $r: $( [ "$tree" = "$ROOT" ] && echo "this tree" || echo "$base_ref")"
    (cd "$tree" && PYTHONPATH="$tree" python scripts/bench.py "$@")
  done
done
