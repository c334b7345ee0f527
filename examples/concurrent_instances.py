"""Process each of N data partitions as its own workflow instance.

    python examples/concurrent_instances.py                   # 12 partitions, 4 at a time
    python examples/concurrent_instances.py --partitions 40 --max-concurrency 8
    python examples/concurrent_instances.py --duration 1.5    # stop whatever still runs at 1.5 s

Every instance runs the same three-state workflow on its own SharedStore:

    LOAD      generates the partition's readings (numpy, into shared memory)
    CLEAN     drops outliers; partition 5 is corrupt and fails here (no retries)
    SUMMARISE per-partition statistics                                  -> DONE

The table printed at the end is the ConcurrentResult: one line per instance, in order.
"""

from __future__ import annotations

import argparse
import time
from enum import Enum, auto

import numpy as np

from cano_mp import (
    ConcurrentWorkflow,
    RetryPolicy,
    SharedStore,
    TaskConfig,
    WaitStrategy,
    Workflow,
    task,
)

CORRUPT = 5


class Step(Enum):
    LOAD = auto()
    CLEAN = auto()
    SUMMARISE = auto()
    DONE = auto()


@task(next=(Step.CLEAN,))
def load(store: SharedStore) -> Step:
    part = store["partition"]
    rng = np.random.default_rng(part)
    readings = rng.normal(100.0 + part, 15.0, store["rows"])
    if part == CORRUPT:
        readings[::1000] = np.nan  # broken sensor
    store["readings"] = readings
    return Step.CLEAN


@task(next=(Step.SUMMARISE,), retry=RetryPolicy.none())
def clean(store: SharedStore) -> Step:
    readings = store["readings"]  # zero-copy, read-only view
    if np.isnan(readings).any():
        raise ValueError(f"partition {store['partition']}: NaN readings")
    mean, std = readings.mean(), readings.std()
    store["clean"] = readings[np.abs(readings - mean) < 3 * std]
    time.sleep(store["delay"])  # stands in for slower I/O
    return Step.SUMMARISE


@task(next=(Step.DONE,))
def summarise(store: SharedStore) -> Step:
    clean = store["clean"]
    store["summary"] = {
        "rows": int(clean.size),
        "mean": float(clean.mean()),
        "p99": float(np.percentile(clean, 99)),
    }
    return Step.DONE


def build() -> Workflow[Step]:
    return (
        Workflow(start=Step.LOAD, name="partition")
        .register(Step.LOAD, load)
        .register(Step.CLEAN, clean, config=TaskConfig(retry=RetryPolicy.none()))
        .register(Step.SUMMARISE, summarise)
        .add_exit_state(Step.DONE)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.2, help="seconds of I/O per partition")
    parser.add_argument("--duration", type=float, default=None, help="stop after this long")
    args = parser.parse_args()

    stores = []
    for part in range(args.partitions):
        store = SharedStore()
        store["partition"], store["rows"], store["delay"] = part, args.rows, args.delay
        stores.append(store)
    wait = WaitStrategy.forever() if args.duration is None else WaitStrategy.duration(args.duration)
    instances = ConcurrentWorkflow(build(), max_concurrency=args.max_concurrency)
    result = instances.execute(stores, wait=wait)

    print(result)
    print(f"{'#':>3}  {'status':<10} {'seconds':>7}  detail")
    for r in result.results:
        if r.status == "completed":
            s = r.store["summary"]
            detail = f"rows={s['rows']:,} mean={s['mean']:.2f} p99={s['p99']:.2f}"
        elif r.error is not None:
            detail = f"{type(r.error).__name__}: {r.error.__cause__ or r.error}"
        else:
            detail = "stopped by the wait strategy"
        print(f"{r.index:>3}  {r.status:<10} {r.duration:7.3f}  {detail}")
    for store in stores:
        store.close()


if __name__ == "__main__":
    main()
