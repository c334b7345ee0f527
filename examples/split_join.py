"""Split / join: fetch three sources in parallel, then aggregate what they returned.

    python examples/split_join.py

    FETCH       a split: three branches, one per source, run in parallel in the pool;
                each "downloads" (sleeps) and parses (CPU work) deterministic records
                and writes them under "source:<name>"                     -> AGGREGATE
    AGGREGATE   reads the three sources and writes the combined report   -> DONE

The join is ``JoinStrategy.all()``: every source must succeed, and the branches' writes are
applied in branch-index order once all of them have finished. The SplitResult is kept in the
store under "fetch" (``JoinConfig(result_key=...)``).

Everything here is defined in ``__main__``: cloudpickle sends it to the worker processes.
"""

from __future__ import annotations

import time
from enum import Enum, auto

import numpy as np

from cano_mp import (
    JoinConfig,
    JoinStrategy,
    RetryPolicy,
    SharedStore,
    Task,
    TaskConfig,
    Workflow,
)

SOURCES = {"orders": (11, 0.4), "inventory": (22, 0.6), "customers": (33, 0.5)}  # seed, latency


class Step(Enum):
    FETCH = auto()
    AGGREGATE = auto()
    DONE = auto()


class FetchSource(Task[Step]):
    """Fetch one source: simulated network latency, then parsing that costs CPU."""

    config = TaskConfig(retry=RetryPolicy.fixed(2, 0.1), timeout=30.0)
    next_states = (Step.AGGREGATE,)

    def __init__(self, source: str, seed: int, latency: float) -> None:
        self.source, self.seed, self.latency = source, seed, latency

    @property
    def name(self) -> str:
        return f"fetch_{self.source}"

    def run(self, store: SharedStore) -> Step:
        time.sleep(self.latency)  # waiting on the "remote" source
        rng = np.random.default_rng(self.seed)
        records = rng.integers(1, 1_000, size=200_000)
        checksum = 0
        for value in records[:50_000].tolist():  # "parsing": pure-Python CPU work
            checksum = (checksum * 31 + value) % 1_000_003
        store[f"source:{self.source}"] = records  # a large array: lives in shared memory
        store[f"checksum:{self.source}"] = checksum
        return Step.AGGREGATE


def aggregate(store: SharedStore) -> Step:
    report = {}
    for source in SOURCES:
        records = store[f"source:{source}"]  # zero-copy, read-only view
        report[source] = {
            "records": int(records.size),
            "sum": int(records.sum()),
            "checksum": store[f"checksum:{source}"],
        }
    store["report"] = report
    store["total"] = sum(r["sum"] for r in report.values())
    return Step.DONE


def build() -> Workflow[Step]:
    return (
        Workflow(start=Step.FETCH, name="split_join")
        .register_split(
            Step.FETCH,
            [FetchSource(name, seed, latency) for name, (seed, latency) in SOURCES.items()],
            JoinConfig(JoinStrategy.all(), Step.AGGREGATE, timeout=60.0, result_key="fetch"),
        )
        .register(Step.AGGREGATE, aggregate)
        .add_exit_state(Step.DONE)
    )


def main() -> None:
    flow = build()
    with SharedStore() as store:
        started = time.monotonic()
        final = flow.orchestrate(store=store)
        elapsed = time.monotonic() - started
        print(f"final state: {final.name}")
        print(f"split: {store['fetch']!r}")
        for source, row in store["report"].items():
            print(
                f"  {source:<10} records={row['records']:,} sum={row['sum']:,} "
                f"checksum={row['checksum']}"
            )
        print(f"aggregated total: {store['total']:,}")
        slowest = max(latency for _, latency in SOURCES.values())
        print(f"took {elapsed:.2f}s (the slowest source alone waits {slowest:.1f}s)")


if __name__ == "__main__":
    main()
