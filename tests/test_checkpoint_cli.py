"""The example that crashes and resumes, `cano-mp runs` / `cano-mp resume`, and the
Scheduler's resume_unfinished option."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cano_mp import CheckpointStore, ConfigError, Scheduler, TaskError, Workflow
from cano_mp.cli import main

from .examples_run import EXAMPLES, ROOT, run_example


def test_resumable_etl_crashes_then_resumes(tmp_path: Path) -> None:
    db = str(tmp_path / "etl.db")
    first = subprocess.run(
        [sys.executable, str(EXAMPLES / "resumable_etl.py"), "--db", db, "--rows", "50000"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert first.returncode == 3, first.stderr
    assert "crashes on purpose" in first.stdout
    (rec,) = CheckpointStore(db).runs()
    assert (rec.status, rec.state, rec.live) == ("running", "TRANSFORM", False)
    out = run_example("resumable_etl.py", "--db", db, "--rows", "50000")
    assert f"resuming run {rec.run_id} at TRANSFORM" in out
    assert "finished in DONE" in out
    assert CheckpointStore(db).runs()[0].status == "completed"


FLOW = """
import os
from enum import Enum
from cano_mp import Workflow

class S(Enum):
    A = 1
    B = 2
    DONE = 3

def a(store):
    store["a"] = 1
    return S.B

def b(store):
    if os.path.exists(os.environ["FAIL_MARKER"]):
        raise RuntimeError("b fails")
    store["b"] = store["a"] + 1
    return S.DONE

flow = Workflow(start=S.A, executor="inline", checkpoint=os.environ["CKPT_DB"]).register(
    S.A, a).register(S.B, b).add_exit_state(S.DONE)
"""


def test_cli_runs_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "flowmod.py"
    script.write_text(textwrap.dedent(FLOW))
    db, marker = tmp_path / "r.db", tmp_path / "fail"
    marker.touch()
    monkeypatch.setenv("CKPT_DB", str(db))
    monkeypatch.setenv("FAIL_MARKER", str(marker))
    assert main(["run", f"{script}:flow"]) == 1
    (rec,) = CheckpointStore(db).runs()
    capsys.readouterr()
    assert main(["runs", str(db)]) == 0
    table = capsys.readouterr().out
    assert "RUN ID" in table and rec.run_id in table and "failed" in table and " B " in table
    marker.unlink()
    other = tmp_path / "other.db"
    monkeypatch.setenv("CKPT_DB", str(other))  # --checkpoint wins over the workflow's own
    assert main(["resume", f"{script}:flow", rec.run_id, "--checkpoint", str(db)]) == 0
    assert capsys.readouterr().out.strip().endswith("DONE")
    with pytest.raises(SystemExit) as exc:
        main(["resume", f"{script}:flow", "nope", "--checkpoint", str(db)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["runs", str(tmp_path / "absent.db")])


def test_scheduler_resumes_the_unfinished_run_at_start(tmp_path: Path) -> None:
    import enum

    class S(enum.Enum):
        A = 1
        B = 2
        DONE = 3

    marker = tmp_path / "fail"
    marker.touch()

    def a(store: object) -> S:
        store["a"] = 1  # type: ignore[index]
        return S.B

    def b(store: object) -> S:
        if marker.exists():
            raise RuntimeError("b fails")
        store["b"] = 2  # type: ignore[index]
        return S.DONE

    from cano_mp import TaskConfig

    wf = (
        Workflow(start=S.A, executor="inline", checkpoint=tmp_path / "r.db", name="sched")
        .register(S.A, a)
        .register(S.B, b, config=TaskConfig.minimal())
        .add_exit_state(S.DONE)
    )
    with pytest.raises(TaskError):
        wf.orchestrate(run_id="old")
    marker.unlink()
    sched = Scheduler().manual("f", wf, S.A, resume_unfinished=True)
    with sched:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            info = sched.status("f")
            if info is not None and info.run_count and not sched.has_running_flows():
                break
            time.sleep(0.05)
    assert [(r.run_id, r.status) for r in CheckpointStore(tmp_path / "r.db").runs()] == [
        ("old", "completed")
    ]
    plain = Workflow(start=S.A).register(S.A, a).add_exit_state(S.B)
    with pytest.raises(ConfigError, match="resume_unfinished=True needs a workflow with a check"):
        Scheduler().manual("g", plain, S.A, resume_unfinished=True)


def test_a_discarded_scheduler_job_gives_its_run_lease_back(tmp_path: Path) -> None:
    import enum

    from cano_mp._scheduler.flows import FlowSpec
    from cano_mp._scheduler.runs import Job

    class S(enum.Enum):
        A = 1
        DONE = 2

    db = tmp_path / "r.db"
    wf = (
        Workflow(start=S.A, executor="inline", checkpoint=db, name="lease")
        .register(S.A, lambda s: S.DONE)
        .add_exit_state(S.DONE)
    )
    spec = FlowSpec(id="f", workflow=wf, initial=S.A)
    for resume_id in (None, "old"):
        if resume_id is not None:  # a resumable run, as the scheduler would resume it
            with pytest.raises(ConfigError):
                wf.resume("old")  # unknown yet
            cs = CheckpointStore(db)
            cs.create_run("old", "lease")
            cs.save("old", 1, "A", {}, {}, {})
            cs.finish("old", "failed", None, keep=True, error="RuntimeError: x")
        job = Job(spec, resume_id)
        assert job._error is None
        (made,) = [r for r in CheckpointStore(db).runs() if r.live]
        job.discard()
        rec = CheckpointStore(db).get(made.run_id)
        assert rec is not None and not rec.live
        if resume_id is not None:
            assert wf.resume("old") == S.DONE  # this process can take it again
