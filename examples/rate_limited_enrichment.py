"""Rate-limited enrichment: call a (simulated) remote API for many records from a pool of
worker processes, within one pool-wide rate limit, behind one circuit breaker, with one
API client per worker process.

    python examples/rate_limited_enrichment.py                    # 120 records, 60 calls/s
    python examples/rate_limited_enrichment.py --records 600 --rate 200 --workers 4

States:

    LOAD      makes the records (ids)                                      -> "ids"
    ENRICH    BatchTask over the ids: each item is one API call. The engine takes one
              token per item from the RateLimiter (in the driver, before a chunk is
              sent: a waiting chunk holds no worker), checks the CircuitBreaker before
              each item, and the client comes from task_context().resources["api"]:
              made once per worker process, closed when the pool closes.     -> "enriched"
    REPORT    prints what happened                                        -> DONE

The API fails ~5 % of calls (seeded): each failed item is retried; a run of failures
would open the breaker for every worker at once.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from enum import Enum, auto
from typing import Any

from cano_mp import (
    BatchTask,
    CircuitBreaker,
    ProcessExecutor,
    RateLimiter,
    Resource,
    RetryPolicy,
    SharedStore,
    TaskConfig,
    Workflow,
    task,
    task_context,
)


class Step(Enum):
    LOAD = auto()
    ENRICH = auto()
    REPORT = auto()
    DONE = auto()


class ApiClient:
    """Stands for an HTTP session: costly to open, one per process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.calls = 0

    def lookup(self, record_id: int) -> dict[str, Any]:
        self.calls += 1
        time.sleep(0.002)  # the network
        # Seeded by the id and the attempt, so a retry may succeed: ~5 % of calls fail.
        rng = random.Random(record_id * 1000 + task_context().attempt)
        if rng.random() < 0.05:
            raise ConnectionError(f"API timeout for record {record_id}")
        return {"id": record_id, "score": rng.randint(0, 100), "by": self.pid}

    def close(self) -> None:
        pass


class Enrich(BatchTask[Step, int, dict[str, Any]]):
    next_states = (Step.REPORT,)

    def __init__(self, config: TaskConfig) -> None:
        self.config = config

    def load(self, store: SharedStore) -> list[int]:
        ids: list[int] = store["ids"]
        return ids

    def process(self, item: int) -> dict[str, Any]:
        client: ApiClient = task_context().resources["api"]
        return client.lookup(item)

    def finish(self, store: SharedStore, results: list[dict[str, Any]]) -> Step:
        store["enriched"] = results
        return Step.REPORT


def build(records: int, rate: float, executor: ProcessExecutor) -> Workflow[Step]:
    limiter = RateLimiter(rate=rate, burst=max(1, int(rate // 10)), name="enrichment-api")
    breaker = CircuitBreaker(failure_threshold=10, reset_timeout=5.0, name="enrichment-api")
    config = TaskConfig(
        retry=RetryPolicy.fixed(3, 0.05), timeout=10, rate_limit=limiter, circuit_breaker=breaker
    )

    @task
    def load(store: SharedStore) -> Step:
        store["ids"] = list(range(records))
        return Step.ENRICH

    @task
    def report(store: SharedStore) -> Step:
        rows = store["enriched"]
        by_worker: dict[int, int] = {}
        for r in rows:
            by_worker[r["by"]] = by_worker.get(r["by"], 0) + 1
        mean = sum(r["score"] for r in rows) / len(rows)
        print(f"enriched {len(rows)} records; mean score {mean:.1f}")
        print(f"calls per worker process: {sorted(by_worker.values())}")
        print(f"rate limiter: {limiter.stats['admitted']} tokens taken")
        print(f"circuit breaker: {breaker.state}, {breaker.stats['failures_total']} failures")
        return Step.DONE

    return (
        Workflow(
            start=Step.LOAD,
            executor=executor,
            name="enrichment",
            resources={"api": Resource(setup=ApiClient, teardown=ApiClient.close)},
        )
        .register(Step.LOAD, load)
        .register(Step.ENRICH, Enrich(config))
        .register(Step.REPORT, report)
        .add_exit_state(Step.DONE)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=120)
    parser.add_argument("--rate", type=float, default=60.0, help="API calls per second")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with ProcessExecutor(args.workers, reuse=False) as executor:
        flow = build(args.records, args.rate, executor)
        started = time.monotonic()
        final = flow.orchestrate()
        took = time.monotonic() - started
    print(f"finished in {final.name} after {took:.1f}s (at most {args.rate:g} calls/s)")
    print(f"health: {flow.check_health()}")


if __name__ == "__main__":
    main()
