#!/usr/bin/env bash
# Run scripts/bench.py on a machine without network access (the 16-vCPU device): install
# the pure-Python dependencies from wheels carried in .whl/ into a side directory (numpy,
# joblib and psutil are expected in the machine's python already), then run the cases
# given as arguments.
#   ./scripts/device_bench.sh tiny medium instances
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --find-links .whl --target /tmp/cano-deps \
    loky cloudpickle croniter tqdm tzdata typing_extensions python-dateutil >/dev/null 2>&1
export PYTHONPATH="$PWD:/tmp/cano-deps"
python3 -c "import cano_mp, loky, croniter, numpy, joblib, psutil; print('deps ok', cano_mp.__version__)"
exec python3 scripts/bench.py "$@"
