"""Soak test: a scheduler with a mix of flows for N minutes while pool workers get killed.

    python scripts/soak.py --minutes 30
    python scripts/soak.py --minutes 1 --kill-every 3      # what CI runs

Flows: an interval flow of pool tasks, a cron flow with seconds, a concurrent flow (4
instances), and a split over numpy data kept in the store. Every ``--kill-every`` seconds a
random pool worker is SIGKILLed: the task it ran fails with WorkerCrashed and is retried.

Every minute, and at the end, it prints runs started / finished / failed, crash retries,
lateness p50 / p99, the driver's RSS, open file descriptors, files in its shared-memory
directory, and live child processes. Exit status 0 when the goals hold: no run lost, RSS
growth under the limit after warm-up, file descriptors and shared-memory files back to
their warm-up counts once idle, no child process left after the stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import statistics
import sys
import threading
import time
from enum import Enum, auto
from typing import Any

import numpy as np
import psutil

from cano_mp import (
    JoinConfig,
    JoinStrategy,
    Observer,
    ProcessExecutor,
    RetryPolicy,
    RunInfo,
    Scheduler,
    SharedStore,
    TaskConfig,
    WorkerCrashed,
    Workflow,
    task,
)
from cano_mp._store import shm as _shm

RETRY = TaskConfig(retry=RetryPolicy.exponential(5, base_delay=0.05))


class Step(Enum):
    A = auto()
    B = auto()
    DONE = auto()


@task(config=RETRY, next=(Step.B,))
def compute(store: SharedStore) -> Step:
    x = np.random.default_rng().normal(size=200_000)
    store["x"] = x
    time.sleep(0.05)
    return Step.B


@task(config=RETRY, next=(Step.DONE,))
def reduce(store: SharedStore) -> Step:
    store["mean"] = float(store["x"].mean())
    return Step.DONE


@task(inline=True, next=(Step.A,))
def load_table(store: SharedStore) -> Step:
    store["table"] = np.arange(1_000_000, dtype=np.float64)
    return Step.A


def part_sum(store: SharedStore) -> Step:
    table = store["table"]
    time.sleep(0.02)
    store.append("sums", float(table[::7].sum()))
    return Step.DONE


class Crashes(Observer):
    """Counts retries caused by killed workers."""

    def __init__(self) -> None:
        self.crash_retries = 0
        self.other_retries = 0
        self.lock = threading.Lock()

    def on_retry(
        self, run: RunInfo, state: Any, task_name: str, attempt: int, delay: float, error: Any
    ) -> None:
        with self.lock:
            if isinstance(error, WorkerCrashed):
                self.crash_retries += 1
            else:
                self.other_retries += 1


def build(executor: ProcessExecutor, crashes: Crashes) -> Scheduler:
    chain = (
        Workflow(start=Step.A, executor=executor, name="chain", observers=[crashes])
        .register(Step.A, compute)
        .register(Step.B, reduce)
        .add_exit_state(Step.DONE)
    )
    split = (
        Workflow(start=Step.B, executor=executor, name="split", observers=[crashes])
        .register(Step.B, load_table)
        .register_split(
            Step.A,
            [task(part_sum, config=RETRY)] * 4,
            JoinConfig(JoinStrategy.all(), Step.DONE),
        )
        .add_exit_state(Step.DONE)
    )
    sched = Scheduler(max_concurrent_runs=8)
    sched.every_seconds("interval", chain, Step.A, 0.5)
    sched.cron("cron", chain, Step.A, "* * * * * */2")
    sched.every_concurrent("concurrent", chain, Step.A, 3.0, instances=4, max_concurrency=2)
    sched.every_seconds("split", split, Step.B, 1.0)
    return sched


def shm_files() -> int:
    n = 0
    for d in _shm.process_dirs():
        for _root, _dirs, files in os.walk(d):
            n += sum(1 for f in files if "-flags" not in f)
    return n


def children(me: psutil.Process) -> list[psutil.Process]:
    return [
        c
        for c in me.children(recursive=True)
        if c.is_running() and "resource_tracker" not in " ".join(c.cmdline())
    ]


def snapshot(sched: Scheduler, me: psutil.Process, crashes: Crashes) -> dict[str, Any]:
    infos = sched.list()
    late = list(sched.lateness)
    return {
        "started": sum(i.run_count for i in infos),
        "failed": sum(i.failure_count for i in infos),
        "running": sched.running_count(),
        "crash_retries": crashes.crash_retries,
        "p50": statistics.median(late) if late else 0.0,
        "p99": sorted(late)[int(0.99 * (len(late) - 1))] if late else 0.0,
        "rss": me.memory_info().rss,
        "fds": me.num_fds(),
        "files": shm_files(),
        "children": len(children(me)),
    }


def show(label: str, s: dict[str, Any]) -> None:
    finished = s["started"] - s["running"]
    print(
        f"{label:>6}  runs started {s['started']:5d} finished {finished:5d} failed "
        f"{s['failed']:3d}  crash retries {s['crash_retries']:4d}  lateness p50 "
        f"{s['p50'] * 1e3:6.2f} ms p99 {s['p99'] * 1e3:7.2f} ms  RSS {s['rss'] / 2**20:7.1f} MB  "
        f"fds {s['fds']:4d}  shm files {s['files']:3d}  children {s['children']:2d}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between kills")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    executor = ProcessExecutor(args.workers, reuse=False).warm()
    crashes = Crashes()
    sched = build(executor, crashes)
    me = psutil.Process()
    total = args.minutes * 60
    # warm-up: imports, caches and pools settle; half of a short run, a fifth of a long one
    warmup = total * 0.5 if total <= 120 else min(60.0, max(15.0, total * 0.2))
    rng = random.Random(0)
    kills = 0
    stop = threading.Event()

    def killer() -> None:
        nonlocal kills
        while not stop.wait(args.kill_every):
            pids = executor.worker_pids()
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass

    t0 = time.monotonic()
    sched.start()
    threading.Thread(target=killer, daemon=True).start()
    baseline: dict[str, Any] | None = None
    next_report = 60.0
    while (elapsed := time.monotonic() - t0) < total:
        time.sleep(min(1.0, total - elapsed))
        elapsed = time.monotonic() - t0
        if baseline is None and elapsed >= warmup:
            baseline = snapshot(sched, me, crashes)
            show("warm", baseline)
        if elapsed >= next_report:
            show(f"{int(elapsed // 60)}m", snapshot(sched, me, crashes))
            next_report += 60.0
    stop.set()
    sched.stop(timeout=60)
    end = snapshot(sched, me, crashes)
    show("end", end)
    executor.close()
    time.sleep(0.5)
    left = children(me)

    base = baseline or end
    rss_growth = (end["rss"] - base["rss"]) / base["rss"]
    rss_limit = 0.05 if args.minutes >= 10 else 0.15  # short runs: allocator noise dominates
    checks = {
        f"no run lost (failed runs: {end['failed']})": end["failed"] == 0,
        f"workers killed: {kills}; tasks they were running, each retried: "
        f"{end['crash_retries']} (the others were idle)": (
            end["crash_retries"] >= 1 if kills > 5 else True
        ),
        f"RSS growth after warm-up {rss_growth * 100:+.1f}% (limit {rss_limit * 100:.0f}%)": (
            rss_growth < rss_limit
        ),
        f"fds {base['fds']} -> {end['fds']}": end["fds"] <= base["fds"] + 2,
        f"shm files once idle: {end['files']}": end["files"] <= base["files"],
        f"children left after the stop: {len(left)}": not left,
    }
    print()
    for label, ok in checks.items():
        print(f"  {'ok    ' if ok else 'FAILED'}  {label}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
