"""Batch ETL: parse and aggregate many generated CSV files with BatchTasks.

    python examples/batch_etl.py                       # 200 files of 2,000 rows
    python examples/batch_etl.py --files 2000 --rows 500 --workers 4

States:

    DISCOVER   generates the CSV files (once) and lists them             -> "paths"
    PARSE      BatchTask over the paths: each worker parses whole files
               and returns per-store totals; one file is corrupt on
               purpose, and on_error="collect" keeps the rest            -> "totals", "bad_files"
    ENRICH     BatchTask over index ranges of a big price table kept in
               the store: process() reads it zero-copy from shared memory
               (the items are ranges, the data stays in the store)       -> "price_stats"
    REPORT     prints the top stores and writes report.csv              -> DONE

Items are file paths and ranges, not data: that is the pattern for large inputs.
"""

from __future__ import annotations

import argparse
import csv
import random
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from enum import Enum, auto
from pathlib import Path

import numpy as np

from cano_mp import (
    BatchTask,
    ItemFailure,
    ProcessExecutor,
    RetryPolicy,
    SharedStore,
    TaskConfig,
    Workflow,
    task,
    task_context,
)

STORES = 50


class Step(Enum):
    DISCOVER = auto()
    PARSE = auto()
    ENRICH = auto()
    REPORT = auto()
    DONE = auto()


@task(next=(Step.PARSE,))
def discover(store: SharedStore) -> Step:
    """Write the input files (deterministic; kept between runs) and list them."""
    out = Path(store["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    n_files, rows = store["files"], store["rows"]
    paths = []
    for i in range(n_files):
        path = out / f"sales_{i:05d}_{rows}.csv"
        paths.append(str(path))
        if path.exists():
            continue
        rng = random.Random(i)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["store", "sku", "qty", "price"])
            for _ in range(rows):
                w.writerow(
                    [
                        rng.randrange(STORES),
                        rng.randrange(10_000),
                        rng.randint(1, 5),
                        f"{rng.uniform(1, 100):.2f}",
                    ]
                )
            if i == 7:
                f.write("17,123,three,9.99\n")  # a corrupt line: this file fails to parse
    store["paths"] = paths
    # A large table for ENRICH: 8 M prices (64 MB), in shared memory once, read zero-copy.
    store["prices"] = np.random.default_rng(0).lognormal(3.0, 0.5, 8_000_000)
    return Step.PARSE


class ParseFiles(BatchTask[Step, str, dict[int, float]]):
    """One item per file: revenue per store. Runs in the pool, files in parallel."""

    config = TaskConfig(retry=RetryPolicy.none(), timeout=30.0)
    on_error = "collect"
    next_states = (Step.ENRICH,)

    def load(self, store: SharedStore) -> list[str]:
        paths: list[str] = store["paths"]
        return paths

    def process(self, path: str) -> dict[int, float]:
        revenue: Counter[int] = Counter()
        with open(path, newline="") as f:
            reader = csv.reader(f)
            next(reader)
            for line_no, (shop, _sku, qty, price) in enumerate(reader, start=2):
                try:
                    revenue[int(shop)] += int(qty) * float(price)
                except ValueError as exc:
                    raise ValueError(f"{Path(path).name}, line {line_no}: {exc}") from None
        return dict(revenue)

    def finish(self, store: SharedStore, results: list[dict[int, float] | ItemFailure]) -> Step:
        totals: Counter[int] = Counter()
        bad = []
        for r in results:
            if isinstance(r, ItemFailure):
                bad.append(f"{Path(store['paths'][r.index]).name}: {r.error}")
            else:
                totals.update(r)
        store["totals"] = dict(totals)
        store["bad_files"] = bad
        return Step.ENRICH


class PriceStats(BatchTask[Step, range, tuple[float, float, int]]):
    """Items are index ranges of the shared price table; the table is never copied."""

    next_states = (Step.REPORT,)

    def load(self, store: SharedStore) -> Iterator[range]:
        n = len(store["prices"])
        step = 250_000
        return (range(lo, min(lo + step, n)) for lo in range(0, n, step))  # a generator

    def process(self, rows: range) -> tuple[float, float, int]:
        prices = task_context().store.get("prices")  # type: ignore[union-attr]
        part = prices[rows.start : rows.stop]  # a view of shared memory
        return float(part.sum()), float(part.max()), int((part > 50).sum())

    def finish(self, store: SharedStore, results: list[tuple[float, float, int]]) -> Step:
        total = sum(r[0] for r in results)
        store["price_stats"] = {
            "mean": total / len(store["prices"]),
            "max": max(r[1] for r in results),
            "over_50": sum(r[2] for r in results),
        }
        return Step.REPORT


@task(next=(Step.DONE,))
def report(store: SharedStore) -> Step:
    totals: dict[int, float] = store["totals"]
    out = Path(store["out_dir"]) / "report.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["store", "revenue"])
        for shop in sorted(totals):
            w.writerow([shop, f"{totals[shop]:.2f}"])
    store["report"] = str(out)
    return Step.DONE


def build(workers: int | None = None) -> Workflow[Step]:
    return (
        Workflow(start=Step.DISCOVER, executor=ProcessExecutor(workers), name="batch_etl")
        .register(Step.DISCOVER, discover)
        .register(Step.PARSE, ParseFiles())
        .register(Step.ENRICH, PriceStats())
        .register(Step.REPORT, report)
        .add_exit_state(Step.DONE)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--rows", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "cano_mp_batch_etl"))
    args = parser.parse_args()

    flow = build(args.workers)
    with SharedStore() as store:
        store["out_dir"], store["files"], store["rows"] = args.out, args.files, args.rows
        t0 = time.perf_counter()
        final = flow.orchestrate(store=store)
        elapsed = time.perf_counter() - t0
        totals: dict[int, float] = store["totals"]
        print(f"final state: {final.name}")
        print(f"files parsed: {args.files - len(store['bad_files'])} of {args.files}")
        for line in store["bad_files"]:
            print(f"failed: {line}")
        print("top stores by revenue:")
        for shop, revenue in sorted(totals.items(), key=lambda kv: -kv[1])[:3]:
            print(f"  store {shop:>2}  {revenue:>14,.2f}")
        print(f"total revenue: {sum(totals.values()):,.2f}")
        stats = store["price_stats"]
        print(
            f"price table: mean {stats['mean']:.3f}, max {stats['max']:.2f}, "
            f"{stats['over_50']:,} over 50"
        )
        print(f"report: {store['report']}")
        print(f"took {elapsed:.2f} s")


if __name__ == "__main__":
    main()
