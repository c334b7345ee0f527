"""A cron-like daemon: a periodic report, a nightly maintenance flow and a manual backfill.

    cano-mp serve examples/daemon.py:build --status-file /tmp/cano_mp_daemon/status.json
    python examples/daemon.py                        # the same, without the CLI

    kill -USR1 <pid>     # trigger the manual "backfill" flow
    kill -TERM <pid>     # graceful stop: no new runs, wait for running ones, exit 0

Flows:

    report       every REPORT_EVERY seconds (default 5): a pool task summarises fresh numbers
                 and appends one line to reports.log
    maintenance  cron "0 3 * * *" (03:00 local time): prunes reports.log to its last 1,000
                 lines
    backfill     manual: recomputes the last day's summary from scratch (a split of 4)

Everything is written under CANO_MP_DAEMON_DIR (default: <tmp>/cano_mp_daemon).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from enum import Enum, auto
from pathlib import Path

import numpy as np

from cano_mp import (
    Backoff,
    JoinConfig,
    JoinStrategy,
    Scheduler,
    SharedStore,
    Workflow,
    task,
)

OUT = Path(os.environ.get("CANO_MP_DAEMON_DIR", Path(tempfile.gettempdir()) / "cano_mp_daemon"))
REPORT_EVERY = float(os.environ.get("REPORT_EVERY", "5"))


class Step(Enum):
    RUN = auto()
    WRITE = auto()
    DONE = auto()


@task(next=(Step.WRITE,))
def summarise(store: SharedStore) -> Step:
    rng = np.random.default_rng()
    values = rng.lognormal(3.0, 0.4, 2_000_000)
    store["line"] = f"mean={values.mean():.4f} p99={np.percentile(values, 99):.2f}"
    return Step.WRITE


@task(inline=True, next=(Step.DONE,))
def append_report(store: SharedStore) -> Step:
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "reports.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {store['line']}\n")
    return Step.DONE


@task(inline=True, next=(Step.DONE,))
def prune(store: SharedStore) -> Step:
    log = OUT / "reports.log"
    if log.exists():
        lines = log.read_text().splitlines(keepends=True)[-1000:]
        tmp = log.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        os.replace(tmp, log)
    return Step.DONE


def partial_day(store: SharedStore) -> Step:
    part = np.random.default_rng().normal(size=1_000_000)
    store.append("parts", float(part.sum()))
    return Step.WRITE


@task(inline=True, next=(Step.DONE,))
def write_backfill(store: SharedStore) -> Step:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "backfill.txt").write_text(f"{sum(store['parts']):.3f}\n")
    return Step.DONE


def build() -> Scheduler:
    report = (
        Workflow(start=Step.RUN, name="report")
        .register(Step.RUN, summarise)
        .register(Step.WRITE, append_report)
        .add_exit_state(Step.DONE)
    )
    maintenance = (
        Workflow(start=Step.RUN, name="maintenance")
        .register(Step.RUN, prune)
        .add_exit_state(Step.DONE)
    )
    backfill = (
        Workflow(start=Step.RUN, name="backfill")
        .register_split(Step.RUN, [partial_day] * 4, JoinConfig(JoinStrategy.all(), Step.WRITE))
        .register(Step.WRITE, write_backfill)
        .add_exit_state(Step.DONE)
    )
    sched = Scheduler(max_concurrent_runs=4)
    sched.every_seconds(
        "report", report, Step.RUN, REPORT_EVERY, backoff=Backoff(initial=5, max_delay=300)
    )
    sched.cron("maintenance", maintenance, Step.RUN, "0 3 * * *")
    sched.manual("backfill", backfill, Step.RUN, overlap="queue")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda *_: sched.trigger("backfill"))
    return sched


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    build().run_forever()
