"""Runs stopped on purpose (run as a script by tests/test_checkpoint_interrupted.py).

    python tests/ckpt_interrupted.py rollback DB start|resume
        BOOK -> PAY -> SHIP (fails): the rollback compensates PAY, then BOOK, whose
        compensation SIGKILLs the driver on the first run; resume finishes the rollback
    python tests/ckpt_interrupted.py sigterm DB start|resume READY
        LOAD -> WAIT (sleeps in the pool on the first run, after creating READY) -> DONE

It prints the outcome as ``key=value`` lines.
"""

from __future__ import annotations

import enum
import os
import signal
import sys
import time

import numpy as np

from cano_mp import ProcessExecutor, RolledBack, SharedStore, TaskError, Terminated, Workflow


class T(enum.Enum):
    BOOK = 1
    PAY = 2
    SHIP = 3
    DONE = 4


def book(store: SharedStore) -> T:
    store["data"] = np.arange(1000.0)
    store["log"] = ["book"]
    return T.PAY


def pay(store: SharedStore) -> T:
    store["log"] = [*store["log"], "pay"]
    return T.SHIP


def ship(store: SharedStore) -> T:
    raise RuntimeError("the ship failed")


def undo_pay(store: SharedStore) -> None:
    store["undone"] = [*store.get("undone", []), "pay"]


def undo_book(store: SharedStore) -> None:
    if os.environ.get("CKPT_CRASH_IN_ROLLBACK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # the driver (inline executor) dies mid-rollback
    store["undone"] = [*store.get("undone", []), "book"]


def rollback(db: str, how: str) -> None:
    wf = (
        Workflow(start=T.BOOK, checkpoint=db, executor="inline")
        .register(T.BOOK, book, compensate=undo_book)
        .register(T.PAY, pay, compensate=undo_pay)
        .register(T.SHIP, ship)
        .add_exit_state(T.DONE)
    )
    try:
        if how == "start":
            wf.orchestrate(run_id="r")
        else:
            wf.resume("r")
    except RolledBack as exc:
        print("error=RolledBack")
        print("message=" + str(exc))
        print("compensated=" + ",".join(s.name for s in exc.compensated))  # type: ignore[attr-defined]
        print("compensation_errors=" + str(len(exc.compensation_errors)))  # type: ignore[attr-defined]
    except TaskError:
        print("error=TaskError")
    print("undone=" + ",".join(wf.store.get("undone", [])))
    print("data_sum=" + str(float(wf.store["data"].sum())))


class S(enum.Enum):
    LOAD = 1
    WAIT = 2
    DONE = 3


def load(store: SharedStore) -> S:
    store["data"] = np.arange(100_000.0)
    return S.WAIT


def wait(store: SharedStore) -> S:
    ready = store["ready"]
    if not os.path.exists(ready):
        open(ready, "w").close()
        time.sleep(60)  # SIGTERM comes now
    store["total"] = float(store["data"].sum())
    return S.DONE


def sigterm(db: str, how: str, ready: str) -> None:
    ex = ProcessExecutor(max_workers=1)
    wf = (
        Workflow(start=S.LOAD, checkpoint=db, executor=ex)
        .register(S.LOAD, load)
        .register(S.WAIT, wait)
        .add_exit_state(S.DONE)
    )
    wf.store["ready"] = ready
    try:
        final = wf.orchestrate(run_id="r") if how == "start" else wf.resume("r")
    except Terminated:
        print("error=Terminated", flush=True)
        raise SystemExit(3) from None
    finally:
        ex.close()
    print("final=" + final.name)
    print("total=" + str(wf.store["total"]))


if __name__ == "__main__":
    if sys.argv[1] == "rollback":
        rollback(sys.argv[2], sys.argv[3])
    else:
        sigterm(sys.argv[2], sys.argv[3], sys.argv[4])
