"""A resumable ETL: checkpoint every state with its data, crash, resume.

    python examples/resumable_etl.py [--db runs.db] [--rows N]

The first time it runs, its driver process crashes on purpose while TRANSFORM runs
(``os._exit`` from an observer: as an OOM kill or a reboot would, nothing is cleaned up).
Run it again and it resumes that run: the store is restored as it was when TRANSFORM was
entered (the generated array included) and the run goes on from TRANSFORM instead of
starting over. Tasks at and after the resumed state run again, so they should be
idempotent (write keys, do not append twice).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from enum import Enum, auto

import numpy as np

from cano_mp import CheckpointStore, Observer, RunInfo, SharedStore, Workflow


class Step(Enum):
    EXTRACT = auto()
    TRANSFORM = auto()
    LOAD = auto()
    DONE = auto()


def extract(store: SharedStore) -> Step:
    rng = np.random.default_rng(16)
    store["raw"] = rng.normal(10.0, 2.0, size=store["rows"])
    return Step.TRANSFORM


class CrashOnce(Observer):
    """Kills the driver when TRANSFORM starts, the first time only (a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def on_task_start(self, run: RunInfo, state: object, task_name: str, attempt: int) -> None:
        if state is Step.TRANSFORM and os.path.exists(self.marker):
            os.unlink(self.marker)
            print("TRANSFORM: the driver crashes on purpose (os._exit)", flush=True)
            os._exit(3)


def transform(store: SharedStore) -> Step:
    raw = store["raw"]
    store["clean"] = raw[(raw > 4.0) & (raw < 16.0)]
    return Step.LOAD


def load(store: SharedStore) -> Step:
    clean = store["clean"]
    store["report"] = {"rows": int(clean.size), "mean": round(float(clean.mean()), 4)}
    return Step.DONE


def build(db: str, marker: str) -> Workflow[Step]:
    return (
        Workflow(
            start=Step.EXTRACT, checkpoint=db, name="resumable_etl", observers=[CrashOnce(marker)]
        )
        .register(Step.EXTRACT, extract)
        .register(Step.TRANSFORM, transform)
        .register(Step.LOAD, load)
        .add_exit_state(Step.DONE)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=os.path.join(tempfile.gettempdir(), "resumable_etl.db"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    marker = args.db + ".crash-once"
    flow = build(args.db, marker)
    unfinished = [
        r for r in CheckpointStore(args.db).runs() if r.resumable and r.status != "completed"
    ]
    if unfinished:
        run = unfinished[-1]
        print(f"resuming run {run.run_id} at {run.state} (its store restored)", flush=True)
        final = flow.resume(run.run_id)
    else:
        open(marker, "w").close()  # the first run crashes in TRANSFORM
        flow.store["rows"] = args.rows
        print("starting a new run", flush=True)
        final = flow.orchestrate()
    print(f"finished in {final.name}: {flow.store['report']}")


if __name__ == "__main__":
    main()
