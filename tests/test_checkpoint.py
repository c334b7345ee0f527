"""Checkpoints and resume (issue 16): a run records each state it enters with the store's
contents, and resume() continues a failed run with its data."""

from __future__ import annotations

import enum
import os
import stat
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cano_mp import (
    BatchTask,
    CheckpointStore,
    ConfigError,
    InlineExecutor,
    JoinConfig,
    JoinError,
    JoinStrategy,
    Observer,
    ProcessExecutor,
    RunInfo,
    SharedStore,
    StoreError,
    TaskConfig,
    TaskError,
    Workflow,
    task,
)


class S(enum.Enum):
    LOAD = 1
    DOUBLE = 2
    SUM = 3
    DONE = 4


def load(store: SharedStore) -> S:
    store["rows"] = np.arange(100_000.0)
    store["count"] = 1
    return S.DOUBLE


def double(store: SharedStore) -> S:
    if Path(store["marker"]).exists():
        raise RuntimeError("failing on purpose")
    store["doubled"] = store["rows"] * 2
    return S.SUM


def total(store: SharedStore) -> S:
    store["total"] = float(store["doubled"].sum())
    return S.DONE


class Recorder(Observer):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_checkpoint(self, run: RunInfo, state: Any, seq: int, bytes_written: int) -> None:
        self.events.append(("checkpoint", state, seq, bytes_written))

    def on_resume(self, run: RunInfo, state: Any, seq: int) -> None:
        self.events.append(("resume", state, seq))


def pipeline(db: Path | CheckpointStore, executor: Any, **kw: Any) -> Workflow[S]:
    return (
        Workflow(start=S.LOAD, checkpoint=db, executor=executor, **kw)
        .register(S.LOAD, load)
        .register(S.DOUBLE, double, config=TaskConfig.minimal())
        .register(S.SUM, total)
        .add_exit_state(S.DONE)
    )


@pytest.fixture(params=["process", "inline"])
def ex(request: pytest.FixtureRequest, pool: ProcessExecutor) -> Any:
    return pool if request.param == "process" else InlineExecutor()


def test_a_failed_run_resumes_with_its_data(tmp_path: Path, ex: Any) -> None:
    marker = tmp_path / "fail"
    marker.touch()
    rec = Recorder()
    wf = pipeline(tmp_path / "runs.db", ex, observers=[rec])
    wf.store["marker"] = str(marker)
    with pytest.raises(TaskError):
        wf.orchestrate(run_id="r1")
    assert wf.last_run_id == "r1"
    (run,) = CheckpointStore(tmp_path / "runs.db").runs()
    assert (run.run_id, run.status, run.state, run.live) == ("r1", "failed", "DOUBLE", False)
    assert run.started.tzinfo is UTC and run.updated >= run.started
    assert [e[:3] for e in rec.events] == [("checkpoint", S.LOAD, 1), ("checkpoint", S.DOUBLE, 2)]
    marker.unlink()
    wf.store.clear()  # resume restores the store as it was when DOUBLE was entered
    assert wf.resume("r1") == S.DONE
    assert wf.store["total"] == float(np.arange(100_000.0).sum() * 2)
    assert rec.events[-1] == ("resume", "DOUBLE", 2) or ("resume", "DOUBLE", 2) in rec.events
    assert CheckpointStore(tmp_path / "runs.db").runs()[0].status == "completed"


def test_a_completed_run_returns_its_final_state_and_leaves_the_store_alone(
    tmp_path: Path, pool: ProcessExecutor
) -> None:
    wf = pipeline(tmp_path / "runs.db", pool)
    wf.store["marker"] = str(tmp_path / "absent")
    assert wf.orchestrate() == S.DONE
    run_id = wf.last_run_id
    assert run_id is not None and len(run_id) == 32
    wf.store.clear()
    wf.store["mine"] = 1
    assert wf.resume(run_id) == S.DONE
    assert wf.store.keys() == ["mine"]


def test_an_existing_run_id_is_a_config_error(tmp_path: Path) -> None:
    wf = pipeline(tmp_path / "runs.db", "inline")
    wf.store["marker"] = str(tmp_path / "absent")
    wf.orchestrate(run_id="same")
    with pytest.raises(ConfigError, match="already exists"):
        wf.orchestrate(run_id="same")


def test_an_unknown_run_and_a_workflow_without_checkpoint_are_config_errors(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="no run"):
        pipeline(tmp_path / "runs.db", "inline").resume("nope")
    with pytest.raises(ConfigError, match="no checkpoint"):
        Workflow(start=S.LOAD).register(S.LOAD, load).add_exit_state(S.DONE).resume("x")


def test_a_recorded_state_that_no_longer_exists_is_a_clear_config_error(tmp_path: Path) -> None:
    marker = tmp_path / "fail"
    marker.touch()
    wf = pipeline(tmp_path / "runs.db", "inline")
    wf.store["marker"] = str(marker)
    with pytest.raises(TaskError):
        wf.orchestrate(run_id="r")

    class T(enum.Enum):
        LOAD = 1
        DONE = 4

    other = (
        Workflow(start=T.LOAD, checkpoint=tmp_path / "runs.db", executor="inline")
        .register(T.LOAD, lambda s: T.DONE)
        .add_exit_state(T.DONE)
    )
    with pytest.raises(ConfigError, match="'DOUBLE'"):
        other.resume("r")
    marker.unlink()
    assert wf.resume("r") == S.DONE  # the failed attempt left it resumable


def test_a_state_that_did_not_touch_an_array_writes_no_bytes_for_it(tmp_path: Path) -> None:
    rec = Recorder()
    wf = pipeline(tmp_path / "runs.db", "inline", observers=[rec])
    wf.store["marker"] = str(tmp_path / "absent")
    wf.orchestrate()
    sizes = [e[3] for e in rec.events]
    assert sizes[0] < 10_000  # only small values: the store is empty at LOAD
    assert sizes[1] >= 800_000  # rows
    assert 800_000 <= sizes[2] < 900_000  # doubled only; rows unchanged: 0 bytes


def test_a_resumed_run_does_not_write_its_restored_arrays_again(tmp_path: Path) -> None:
    marker = tmp_path / "fail"
    marker.touch()
    rec = Recorder()
    wf = pipeline(tmp_path / "runs.db", "inline", observers=[rec], checkpoint_keep=True)
    wf.store["marker"] = str(marker)
    with pytest.raises(TaskError):
        wf.orchestrate(run_id="r")
    before = set(os.listdir(tmp_path / "runs.db.data"))
    marker.unlink()
    assert wf.resume("r") == S.DONE
    after_resume = [e for e in rec.events if e[0] == "checkpoint"][2:]
    assert [e[1] for e in after_resume] == [S.SUM]
    assert 800_000 <= after_resume[0][3] < 900_000  # doubled only: rows is its old file
    names = set(os.listdir(tmp_path / "runs.db.data"))
    assert before <= names and len(names - before) == 1  # one new file: doubled's


def test_writable_arrays_are_compared_each_time(tmp_path: Path) -> None:
    rec = Recorder()
    store = SharedStore()
    arr = store.array("a", 1000)

    def fill(s: SharedStore) -> S:
        arr[:] = 7  # in place, in the driver (inline)
        return S.SUM

    wf = (
        Workflow(start=S.LOAD, checkpoint=tmp_path / "r.db", executor="inline", observers=[rec])
        .register(S.LOAD, lambda s: S.DOUBLE)
        .register(S.DOUBLE, fill)
        .register(S.SUM, lambda s: S.DONE)
        .add_exit_state(S.DONE)
    )
    try:
        wf.orchestrate(store=store)
    finally:
        store.close()
    sizes = [e[3] for e in rec.events]
    assert sizes[0] == 8000 and sizes[1] == 0 and sizes[2] == 8000


def test_success_releases_data_files_unless_kept(tmp_path: Path) -> None:
    for keep in (False, True):
        db = tmp_path / f"{keep}.db"
        wf = pipeline(db, "inline", checkpoint_keep=keep)
        wf.store["marker"] = str(tmp_path / "absent")
        wf.orchestrate()
        files = [f for f in os.listdir(f"{db}.data") if not f.startswith(".")]
        assert bool(files) is keep


def test_files_are_private(tmp_path: Path) -> None:
    marker = tmp_path / "fail"
    marker.touch()
    wf = pipeline(tmp_path / "runs.db", "inline")
    wf.store["marker"] = str(marker)
    with pytest.raises(TaskError):
        wf.orchestrate()
    assert stat.S_IMODE(os.stat(tmp_path / "runs.db").st_mode) == 0o600
    data = tmp_path / "runs.db.data"
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    for f in os.listdir(data):
        assert stat.S_IMODE(os.stat(data / f).st_mode) == 0o600
    os.chmod(data, 0o755)
    with pytest.raises(StoreError, match="mode 755"):
        CheckpointStore(tmp_path / "runs.db")


def test_delete_and_prune_forget_runs_and_their_data(tmp_path: Path) -> None:
    marker = tmp_path / "fail"
    marker.touch()
    wf = pipeline(tmp_path / "runs.db", "inline")
    wf.store["marker"] = str(marker)
    for rid in ("a", "b"):
        with pytest.raises(TaskError):
            wf.orchestrate(run_id=rid)
    cs = CheckpointStore(tmp_path / "runs.db")
    data = tmp_path / "runs.db.data"
    assert [f for f in os.listdir(data) if not f.startswith(".")]
    cs.delete("a")
    assert [r.run_id for r in cs.runs()] == ["b"]
    assert cs.prune(older_than=3600) == []
    assert cs.prune(older_than=0) == ["b"]
    assert cs.runs() == []
    assert [f for f in os.listdir(data) if not f.startswith(".")] == []


def test_disk_full_fails_the_checkpoint_and_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cano_mp._checkpoint import files

    wf = pipeline(tmp_path / "runs.db", "inline")
    wf.store["marker"] = str(tmp_path / "absent")
    real = files.DataFiles._write_file

    def full(self: Any, tmp: str, view: memoryview, *rest: Any) -> None:
        if view.nbytes >= 800_000:
            raise OSError(28, "No space left on device")
        real(self, tmp, view, *rest)

    monkeypatch.setattr(files.DataFiles, "_write_file", full)
    with pytest.raises(StoreError, match="no space left"):
        wf.orchestrate(run_id="full")
    (run,) = CheckpointStore(tmp_path / "runs.db").runs()
    assert (run.state, run.seq, run.status) == ("LOAD", 1, "failed")
    assert not [f for f in os.listdir(tmp_path / "runs.db.data") if f.endswith(".tmp")]
    monkeypatch.undo()
    assert wf.resume("full") == S.DONE


def test_two_processes_cannot_resume_one_run(tmp_path: Path) -> None:
    cs = CheckpointStore(tmp_path / "r.db")
    cs.create_run("x", "wf")  # owned by this (live) process
    assert cs.runs()[0].live
    with pytest.raises(ConfigError, match="right now"):
        cs.load("x")


def test_data_files_are_written_where_preallocation_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctypes
    import errno

    from cano_mp._checkpoint import files

    calls: list[int] = []

    def refused(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append(length)
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(files, "_fallocate", lambda: refused)
    marker = tmp_path / "fail"
    marker.touch()
    wf = pipeline(tmp_path / "runs.db", "inline")
    wf.store["marker"] = str(marker)
    with pytest.raises(TaskError):
        wf.orchestrate(run_id="r")
    assert calls  # the big array's file asked for its blocks, and was written anyway
    marker.unlink()
    wf.store.clear()
    assert wf.resume("r") == S.DONE
    assert wf.store["total"] == float(np.arange(100_000.0).sum() * 2)


def test_a_data_file_has_its_blocks_reserved_and_the_exact_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cano_mp._checkpoint import files as files_module
    from cano_mp._checkpoint.files import DataFiles

    real = files_module._fallocate()
    if real is None:
        pytest.skip("no fallocate(2) here")
    asked: list[tuple[int, int, int]] = []

    def spy(fd: int, mode: int, offset: int, length: int) -> int:
        asked.append((mode, offset, length))
        return real(fd, mode, offset, length)

    monkeypatch.setattr(files_module, "_fallocate", lambda: spy)
    files = DataFiles(str(tmp_path / "d"), fsync=False)
    data = np.arange(1_000_000, dtype=np.float64)
    name = files.new_name()
    assert files.write(name, memoryview(data)) == data.nbytes
    assert asked == [(1, 0, data.nbytes)]  # FALLOC_FL_KEEP_SIZE, the whole file, once
    assert files.write(name, memoryview(data)) == 0  # there already
    st = os.stat(files.path(name))
    assert st.st_size == data.nbytes  # FALLOC_FL_KEEP_SIZE: no tail past the data
    assert np.array_equal(np.fromfile(files.path(name), np.float64), data)


def test_the_async_entry_points_checkpoint_and_resume(tmp_path: Path, ex: Any) -> None:
    import asyncio

    marker = tmp_path / "fail"
    marker.touch()
    cs = CheckpointStore(tmp_path / "runs.db")  # a CheckpointStore instance, not a path
    wf = pipeline(cs, ex)
    assert wf.checkpoint_store is cs
    wf.store["marker"] = str(marker)
    with pytest.raises(TaskError):
        asyncio.run(wf.orchestrate_async(run_id="a1"))
    assert wf.last_run_id == "a1"
    (run,) = cs.runs()
    assert (run.run_id, run.status, run.state) == ("a1", "failed", "DOUBLE")
    marker.unlink()
    with SharedStore() as other:  # resume into another store: it gets the checkpoint's data
        assert asyncio.run(wf.resume_async("a1", store=other)) == S.DONE
        assert other["total"] == float(np.arange(100_000.0).sum() * 2)
    assert cs.runs()[0].status == "completed"
    assert asyncio.run(wf.resume_async("a1")) == S.DONE  # completed: nothing runs again


def test_a_database_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "runs.db"
    CheckpointStore(db).close()
    with sqlite3.connect(db) as conn:
        (version,) = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert int(version) >= 1
        conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.close()
    with pytest.raises(ConfigError, match="schema version 99"):
        CheckpointStore(db)


def test_resume_removes_what_a_crash_left_in_the_data_directory(tmp_path: Path) -> None:
    marker = tmp_path / "fail"
    marker.touch()
    wf = pipeline(tmp_path / "runs.db", "inline")
    wf.store["marker"] = str(marker)
    with pytest.raises(TaskError):
        wf.orchestrate(run_id="r")
    data = tmp_path / "runs.db.data"
    named = {f for f in os.listdir(data) if not f.startswith(".")}
    assert named  # the arrays of the checkpoints
    # A driver killed mid-write leaves a temp file; killed between the rename and the row's
    # commit, a complete file that no row names.
    for leftover in (".0123456789abcdef.0123456789ab.tmp", "f" * 32):
        fd = os.open(data / leftover, os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, b"x" * 1000)
        os.close(fd)
    marker.unlink()
    wf.store.clear()
    assert wf.resume("r") == S.DONE
    assert wf.store["total"] == float(np.arange(100_000.0).sum() * 2)
    left = set(os.listdir(data))
    assert ".0123456789abcdef.0123456789ab.tmp" not in left and "f" * 32 not in left


class W(enum.Enum):
    BATCH = 1
    SPLIT = 2
    DONE = 3


class Journal:
    """Lines "<what> <n>" appended to a file: what ran, in which run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def note(self, what: str) -> None:
        with open(self.path, "a") as f:
            f.write(what + "\n")

    def lines(self) -> list[str]:
        return Path(self.path).read_text().splitlines() if os.path.exists(self.path) else []


class Items(BatchTask[W, int, int]):
    config = TaskConfig.minimal()
    chunk_size = 1

    def __init__(self, journal: Journal, fail: Path) -> None:
        self.journal, self.fail = journal, str(fail)

    def load(self, store: SharedStore) -> range:
        return range(4)

    def process(self, item: int) -> int:
        self.journal.note(f"item {item}")
        if item == 2 and os.path.exists(self.fail):
            raise RuntimeError("item 2 fails on purpose")
        return item * 10

    def finish(self, store: SharedStore, results: list[int]) -> W:
        store["items"] = results
        return W.SPLIT


def branch(journal: Journal, k: int, fail: Path) -> Any:
    @task(config=TaskConfig.minimal())
    def run(store: SharedStore) -> W:
        journal.note(f"branch {k}")
        if k == 2 and fail.exists():
            raise RuntimeError("branch 2 fails on purpose")
        store[f"b{k}"] = k
        return W.DONE

    return run


def test_a_batch_and_a_split_resume_as_a_whole(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    fail_item, fail_branch = tmp_path / "fail-item", tmp_path / "fail-branch"
    fail_item.touch()
    fail_branch.touch()
    wf = (
        Workflow(start=W.BATCH, checkpoint=tmp_path / "runs.db", executor="inline")
        .register(W.BATCH, Items(journal, fail_item))
        .register_split(
            W.SPLIT,
            [branch(journal, k, fail_branch) for k in range(3)],
            JoinConfig(JoinStrategy.all(), W.DONE),
        )
        .add_exit_state(W.DONE)
    )
    with pytest.raises(TaskError):
        wf.orchestrate(run_id="r")
    assert journal.lines() == ["item 0", "item 1", "item 2"]  # item 3 never ran
    fail_item.unlink()
    with pytest.raises(JoinError):
        wf.resume("r")  # the batch again, whole; then the split fails
    ran = journal.lines()[3:]
    assert ran[:4] == ["item 0", "item 1", "item 2", "item 3"]
    assert sorted(ran[4:]) == ["branch 0", "branch 1", "branch 2"]
    assert CheckpointStore(tmp_path / "runs.db").get("r").state == "SPLIT"  # type: ignore[union-attr]
    fail_branch.unlink()
    wf.store.clear()
    assert wf.resume("r") == W.DONE
    again = journal.lines()[3 + len(ran) :]
    assert sorted(again) == ["branch 0", "branch 1", "branch 2"]  # every branch, not only 2
    assert wf.store["items"] == [0, 10, 20, 30]  # restored from the SPLIT checkpoint
    assert [wf.store[f"b{k}"] for k in range(3)] == [0, 1, 2]
