"""ETL demo: generate sensor CSV files, parse them in parallel, clean, transform, report.

    python examples/etl_pipeline.py                  # small data set (~10 MB)
    python examples/etl_pipeline.py --size 300       # ~300 MB of CSV
    python examples/etl_pipeline.py --workers 4 --out /tmp/etl

States and what travels through the store:

    GENERATE   writes deterministic CSV files (skipped when they exist)   -> "files"
    PARSE      a split: one branch per worker parses its share of files   -> "part0".."partN"
    CLEAN      joins the parts, drops bad rows, sorts by sensor           -> "clean" (array)
    TRANSFORM  a split: each branch reads "clean" zero-copy from shared
               memory and computes per-sensor features (CPU-heavy numpy)  -> "feat0".."featN"
    REPORT     aggregates the features into report.csv                    -> "report"
    DONE

Everything defined here — tasks, the Enum, the observer — is sent to the worker processes
with cloudpickle: nothing needs to be importable.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from enum import Enum, auto
from pathlib import Path
from typing import Any

import numpy as np

from cano_mp import (
    Executor,
    JoinConfig,
    JoinStrategy,
    Observer,
    ProcessExecutor,
    RunInfo,
    SharedStore,
    Task,
    TaskConfig,
    Workflow,
)

BYTES_PER_ROW = 24.7  # a CSV row as written below: measured over 100,000 rows
ROWS_PER_MB = int(1_000_000 / BYTES_PER_ROW)
SENSORS = 64


class Step(Enum):
    GENERATE = auto()
    PARSE = auto()
    CLEAN = auto()
    TRANSFORM = auto()
    REPORT = auto()
    DONE = auto()


def generate(store: SharedStore) -> Step:
    out = Path(store["out_dir"])
    size_mb = float(store["size_mb"])
    n_files = max(2, int(size_mb // 25) + 2)
    rows = int(size_mb * ROWS_PER_MB / n_files)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_files):
        path = out / f"sensors_{i:03d}_{rows}.csv"
        files.append(str(path))
        if path.exists():
            continue
        rng = np.random.default_rng(i)
        ts = np.sort(rng.integers(1_700_000_000, 1_700_086_400, rows))
        sensor = rng.integers(0, SENSORS, rows)
        value = rng.normal(20.0, 5.0, rows) + sensor * 0.5
        quality = rng.integers(0, 100, rows)
        value[rng.random(rows) < 0.01] = np.nan  # a few broken readings
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write("timestamp,sensor,value,quality\n")
            np.savetxt(
                f,
                np.column_stack([ts, sensor, value, quality]),
                fmt=["%d", "%d", "%.4f", "%d"],
                delimiter=",",
            )
        os.replace(tmp, path)
    store["files"] = files
    return Step.PARSE


class ParseShare(Task[Step]):
    """Parse every ``n``-th file, starting at ``i``, into one float array."""

    config = TaskConfig.minimal()

    def __init__(self, i: int, n: int) -> None:
        self.i, self.n = i, n

    @property
    def name(self) -> str:
        return f"parse[{self.i}]"

    def run(self, store: SharedStore) -> Step:
        files = store["files"][self.i :: self.n]
        parts = [np.loadtxt(f, delimiter=",", skiprows=1, ndmin=2) for f in files]
        store[f"part{self.i}"] = np.concatenate(parts) if parts else np.empty((0, 4))
        return Step.CLEAN


def clean(store: SharedStore) -> Step:
    parts = [store[k] for k in sorted(store.keys()) if k.startswith("part")]
    data = np.concatenate(parts)
    ok = ~np.isnan(data[:, 2]) & (data[:, 3] >= 5)
    data = data[ok]
    data = data[np.argsort(data[:, 1], kind="stable")]
    store["rows_in"] = int(sum(len(p) for p in parts))
    store["clean"] = np.ascontiguousarray(data)
    for k in [k for k in store if k.startswith("part")]:
        del store[k]
    return Step.TRANSFORM


class Features(Task[Step]):
    """Per-sensor features for sensors ``lo..hi``: CPU-heavy numpy on a zero-copy array."""

    config = TaskConfig.minimal()

    def __init__(self, lo: int, hi: int, idx: int) -> None:
        self.lo, self.hi, self.idx = lo, hi, idx

    @property
    def name(self) -> str:
        return f"features[{self.lo}:{self.hi}]"

    def run(self, store: SharedStore) -> Step:
        data = store["clean"]  # read-only view of shared memory: no copy
        sensors = data[:, 1]
        rows = []
        for s in range(self.lo, self.hi):
            lo, hi = np.searchsorted(sensors, [s, s + 1])
            v = data[lo:hi, 2]
            if len(v) < 8:
                continue
            window = min(64, len(v))
            smooth = np.convolve(v, np.ones(window) / window, mode="valid")
            spectrum = np.abs(np.fft.rfft(v - v.mean()))
            dominant = int(np.argmax(spectrum[1:]) + 1) if len(spectrum) > 1 else 0
            rows.append(
                [
                    s,
                    len(v),
                    v.mean(),
                    v.std(),
                    np.percentile(v, 95),
                    smooth.max() - smooth.min(),
                    dominant,
                ]
            )
        store[f"feat{self.idx}"] = np.array(rows, dtype=float).reshape(-1, 7)
        return Step.REPORT


def report(store: SharedStore) -> Step:
    feats = np.concatenate([store[k] for k in sorted(store.keys()) if k.startswith("feat")])
    feats = feats[np.argsort(feats[:, 0])]
    path = Path(store["out_dir"]) / "report.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sensor", "rows", "mean", "std", "p95", "smooth_range", "dominant_freq"])
        for r in feats:
            w.writerow([int(r[0]), int(r[1]), *(f"{x:.4f}" for x in r[2:6]), int(r[6])])
    store["report"] = str(path)
    store["sensors"] = len(feats)
    return Step.DONE


class StateTimer(Observer):
    """Records how long each state took (hooks run in the driver)."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self._last: tuple[Any, float] | None = None

    def on_state_enter(self, run: RunInfo, state: Any) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append((self._last[0].name, now - self._last[1]))
        self._last = (state, now)


def build(
    workers: int | None = None,
    timer: StateTimer | None = None,
    executor: Executor | None = None,
) -> Workflow[Step]:
    """The pipeline; ``cano-mp run examples/etl_pipeline.py:build`` runs it too.

    ``executor``: where the tasks run (default: a pool of ``workers`` processes);
    ``examples/dask_cluster.py`` passes a Dask one.
    """
    if executor is None:
        n = workers or ProcessExecutor().max_workers
        executor = ProcessExecutor(max_workers=n)
    else:
        n = workers or executor.max_workers
    flow: Workflow[Step] = Workflow(
        start=Step.GENERATE,
        name="etl",
        executor=executor,
        observers=[timer] if timer else [],
    )
    step = -(-SENSORS // n)
    flow.register(Step.GENERATE, generate)
    flow.register_split(
        Step.PARSE, [ParseShare(i, n) for i in range(n)], JoinConfig(JoinStrategy.all(), Step.CLEAN)
    )
    flow.register(Step.CLEAN, clean)
    flow.register_split(
        Step.TRANSFORM,
        [Features(lo, min(lo + step, SENSORS), i) for i, lo in enumerate(range(0, SENSORS, step))],
        JoinConfig(JoinStrategy.all(), Step.REPORT),
    )
    flow.register(Step.REPORT, report)
    flow.add_exit_state(Step.DONE)
    flow.store["out_dir"] = os.environ.get("CANO_ETL_OUT", "out/etl")
    flow.store["size_mb"] = float(os.environ.get("CANO_ETL_SIZE", "10"))
    return flow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=float, default=10.0, help="MB of CSV to generate")
    parser.add_argument("--out", default="out/etl", help="where data and report go")
    parser.add_argument("--workers", type=int, default=None, help="worker processes")
    args = parser.parse_args()
    timer = StateTimer()
    flow = build(args.workers, timer)
    with flow.store as store:
        store["out_dir"] = args.out
        store["size_mb"] = args.size
        started = time.perf_counter()
        final = flow.orchestrate()
        total = time.perf_counter() - started
        print(
            f"finished in {final.name} after {total:.2f}s on "
            f"{flow.executor.max_workers} worker processes"
        )
        for name, seconds in timer.times:
            print(f"  {name:<10} {seconds:8.3f}s")
        print(f"rows parsed: {store['rows_in']:,}; sensors reported: {store['sensors']}")
        print(f"report: {os.path.abspath(store['report'])}")


if __name__ == "__main__":
    main()
