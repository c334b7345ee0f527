"""Checkpointed runs stopped from outside (issue 16): a driver killed during its rollback
resumes the rollback, and a SIGTERM leaves the run resumable (each in a subprocess, driven
by tests/ckpt_interrupted.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cano_mp import CheckpointStore

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "ckpt_interrupted.py"


def _start(*args: str, crash: bool = False) -> subprocess.Popen[str]:
    env = dict(os.environ, CKPT_CRASH_IN_ROLLBACK="1" if crash else "0")
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        cwd=HERE.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _outcome(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_a_crash_during_rollback_resumes_the_rollback(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    first = _start("rollback", str(db), "start", crash=True)
    _out, err = first.communicate(timeout=120)
    assert first.returncode == -signal.SIGKILL, err
    (rec,) = CheckpointStore(db).runs()
    assert rec.status == "running" and not rec.live and rec.resumable

    second = _start("rollback", str(db), "resume")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    got = _outcome(out)
    assert got["error"] == "RolledBack"
    assert "the ship failed" in got["message"]
    # PAY's compensation had committed before the crash: it does not run again
    assert got["compensated"] == "PAY,BOOK"
    assert got["compensation_errors"] == "0"
    assert got["undone"] == "pay,book"
    assert float(got["data_sum"]) == float(sum(range(1000)))
    (rec,) = CheckpointStore(db).runs()
    assert rec.status == "failed" and not rec.resumable
    assert rec.error is not None and "the ship failed" in rec.error
    files = [f for f in os.listdir(f"{db}.data") if not f.startswith(".")]
    assert files == []  # a rolled-back run's data is released


def test_sigterm_leaves_a_checkpointed_run_resumable(tmp_path: Path) -> None:
    db, ready = tmp_path / "runs.db", tmp_path / "ready"
    first = _start("sigterm", str(db), "start", str(ready))
    deadline = time.monotonic() + 90
    while not ready.exists():
        assert first.poll() is None, first.communicate()[1]
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 3, err
    assert _outcome(out)["error"] == "Terminated"
    (rec,) = CheckpointStore(db).runs()
    assert (rec.status, rec.state, rec.live, rec.resumable) == ("failed", "WAIT", False, True)
    assert rec.error is not None and rec.error.startswith("Terminated")

    second = _start("sigterm", str(db), "resume", str(ready))
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    got = _outcome(out)
    assert got["final"] == "DONE"
    assert float(got["total"]) == float(sum(range(100_000)))
    (rec,) = CheckpointStore(db).runs()
    assert rec.status == "completed"
