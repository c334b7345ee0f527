"""The crash test's pipeline (run as a script by tests/test_checkpoint_crash.py).

    python tests/ckpt_pipeline.py DB RUN_ID start|resume OUT.npz

Six states, an array of ARRAY_MB MiB made in the pool, a split of three branches, a state
that does not touch the array; at the end the store's contents are saved to OUT.npz.
"""

from __future__ import annotations

import enum
import os
import sys
import time

import numpy as np

from cano_mp import JoinConfig, JoinStrategy, ProcessExecutor, SharedStore, Workflow

ARRAY_MB = float(os.environ.get("CKPT_ARRAY_MB", "8"))
PAUSE = 0.05


class S(enum.Enum):
    MAKE = 1
    SCALE = 2
    SPLIT = 3
    MERGE = 4
    NOTE = 5
    TOTAL = 6
    DONE = 7


def make(store: SharedStore) -> S:
    time.sleep(PAUSE)
    store["data"] = np.arange(int(ARRAY_MB * 2**20 / 8), dtype=np.float64)
    return S.SCALE


def scale(store: SharedStore) -> S:
    time.sleep(PAUSE)
    store["data"] = store["data"] * 3.0
    return S.SPLIT


def branch(k: int):  # type: ignore[no-untyped-def]
    def run(store: SharedStore) -> S:
        time.sleep(PAUSE)
        store[f"part{k}"] = float(store["data"][k::3].sum())
        store.append("log", f"branch{k}")
        return S.MERGE

    return run


def merge(store: SharedStore) -> S:
    time.sleep(PAUSE)
    store["parts"] = store["part0"] + store["part1"] + store["part2"]
    return S.NOTE


def note(store: SharedStore) -> S:
    time.sleep(PAUSE)
    store.append("log", "note")
    return S.TOTAL


def total(store: SharedStore) -> S:
    time.sleep(PAUSE)
    store["total"] = float(store["data"].sum())
    return S.DONE


def flow(db: str) -> Workflow[S]:
    return (
        Workflow(start=S.MAKE, checkpoint=db, executor=ProcessExecutor(max_workers=2))
        .register(S.MAKE, make)
        .register(S.SCALE, scale)
        .register_split(
            S.SPLIT, [branch(k) for k in range(3)], JoinConfig(JoinStrategy.all(), S.MERGE)
        )
        .register(S.MERGE, merge)
        .register(S.NOTE, note)
        .register(S.TOTAL, total)
        .add_exit_state(S.DONE)
    )


def main() -> None:
    db, run_id, how, out = sys.argv[1:5]
    wf = flow(db)
    wf.store["seed"] = {"n": 1}
    final = wf.orchestrate(run_id=run_id) if how == "start" else wf.resume(run_id)
    assert final is S.DONE, final
    values = {
        k: np.asarray(wf.store[k], dtype=object if k in ("log", "seed") else None) for k in wf.store
    }
    np.savez(out, **values)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
