#!/usr/bin/env bash
# Run scripts/bench.py on a machine without network access (the 16-vCPU device): install
# the pure-Python dependencies from wheels carried in .whl/ (numpy, joblib and psutil are
# expected there already), then run the cases given as arguments.
#   ./scripts/device_bench.sh tiny medium instances
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv --system-site-packages /tmp/cano-venv >/dev/null
/tmp/cano-venv/bin/pip install -q --no-index --find-links .whl \
    loky cloudpickle croniter tqdm tzdata typing_extensions python-dateutil >/dev/null 2>&1 || true
export PYTHONPATH="$PWD"
/tmp/cano-venv/bin/python -c "import cano_mp, loky, croniter, numpy, joblib, psutil; print('deps ok', cano_mp.__version__)"
exec /tmp/cano-venv/bin/python scripts/bench.py "$@"
