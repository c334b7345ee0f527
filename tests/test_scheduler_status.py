"""The status file: atomic, 0600, never written through a planted link, a last "stopped"."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from datetime import UTC, datetime
from enum import Enum, auto
from pathlib import Path

import pytest

from cano_mp import (
    FlowInfo,
    FlowStatus,
    Resource,
    Scheduler,
    SharedStore,
    Workflow,
    task,
    task_context,
)
from cano_mp._scheduler.status import write_status_file

NOW = datetime(2026, 5, 1, 8, 30, tzinfo=UTC)
INFO = FlowInfo("f", FlowStatus.IDLE, 0, 0, None, None, None, None)


class S(Enum):
    GO = auto()
    DONE = auto()


@task(inline=True)
def step(store: SharedStore) -> S:
    return S.DONE


def flow() -> Workflow[S]:
    return Workflow(start=S.GO, executor="inline").register(S.GO, step).add_exit_state(S.DONE)


def test_the_status_file_is_private_to_its_owner_and_complete(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write_status_file(str(path), [INFO], NOW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["stopped"] is False and data["stopped_at"] is None
    assert data["updated"] == "2026-05-01T08:30:00+00:00" and data["pid"] == os.getpid()
    assert data["flows"] == [INFO.to_json()]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_a_link_at_the_old_predictable_temp_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "status.json"
    # Until 0.1 the temporary file was "<path>.<pid>.<thread id>.tmp": plant links there.
    for tid in {threading.get_ident(), *(t.ident for t in threading.enumerate())}:
        os.symlink(victim, f"{path}.{os.getpid()}.{tid}.tmp")
    sched = Scheduler(status_file=str(path))
    sched.manual("m", flow(), S.GO)
    sched.start()
    sched.stop()
    assert victim.read_text() == "precious\n"
    assert json.loads(path.read_text())["stopped"] is True


def test_a_link_at_a_guessed_temp_name_fails_the_write_and_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("cano_mp._files.secrets.token_hex", lambda n: "guessed")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "status.json"
    os.symlink(victim, tmp_path / ".status.json.guessed.tmp")
    with pytest.raises(FileExistsError):
        write_status_file(str(path), [INFO], NOW)
    assert victim.read_text() == "precious\n" and not path.exists()
    # In the scheduler the failure is logged; it never stops the scheduler.
    sched = Scheduler(status_file=str(path))
    with caplog.at_level(logging.ERROR, logger="cano_mp.scheduler"):
        sched.start()
        sched.stop()
    assert "could not write the status file" in caplog.text
    assert victim.read_text() == "precious\n"


def test_a_link_at_the_status_path_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim.json"
    victim.write_text("precious\n")
    path = tmp_path / "status.json"
    os.symlink(victim, path)
    write_status_file(str(path), [INFO], NOW)
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink() and json.loads(path.read_text())["flows"][0]["id"] == "f"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_unwritable_directory_is_an_os_error_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        write_status_file(str(tmp_path / "missing" / "status.json"), [INFO], NOW)


def test_stop_writes_a_last_status_with_stopped_and_its_time(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    sched = Scheduler(status_file=str(path))
    sched.manual("m", flow(), S.GO)
    sched.start()
    running = json.loads(path.read_text())
    assert running["stopped"] is False and running["stopped_at"] is None
    before = datetime.now(UTC)
    sched.stop()
    data = json.loads(path.read_text())
    assert data["stopped"] is True
    stopped_at = datetime.fromisoformat(data["stopped_at"])
    assert before <= stopped_at <= datetime.now(UTC) and data["updated"] == data["stopped_at"]
    assert data["flows"][0]["id"] == "m" and data["flows"][0]["paused"] is False
    sched.stop()  # a second stop does not write again, nor does a pause after the stop
    sched.pause("m")
    assert json.loads(path.read_text()) == data


@task(inline=True)
def use_db(store: SharedStore) -> S:
    store["db"] = task_context().resources["db"]["n"]
    return S.DONE


def test_the_status_file_shows_resource_health(tmp_path: Path) -> None:
    up = tmp_path / "db-is-up"
    up.touch()
    probes = tmp_path / "probes"

    def health(value: dict[str, int]) -> bool:
        with probes.open("a") as f:
            f.write("probe\n")
        return up.exists()

    resources = {
        "db": Resource(setup=lambda: {"n": 1}, health=health),
        "cache": Resource(setup=dict, health=lambda v: False),
    }
    with_res = (
        Workflow(start=S.GO, executor="inline", resources=resources)
        .register(S.GO, use_db)
        .add_exit_state(S.DONE)
    )
    path = tmp_path / "status.json"
    sched = Scheduler(status_file=str(path))
    sched.manual("res", with_res, S.GO).manual("plain", flow(), S.GO)
    sched.start()
    try:
        flows = {f["id"]: f for f in json.loads(path.read_text())["flows"]}
        assert flows["res"]["resources"] == {"db": True, "cache": False}
        assert "resources" not in flows["plain"]  # no resources: nothing to report
        up.unlink()  # the database goes down: the next file written says so
        sched.trigger("res")
        end = time.monotonic() + 60
        while True:
            flows = {f["id"]: f for f in json.loads(path.read_text())["flows"]}
            if flows["res"]["run_count"] == 1 and flows["res"]["status"] == "completed":
                break
            assert time.monotonic() < end, flows
            time.sleep(0.02)
        assert flows["res"]["resources"] == {"db": False, "cache": False}
        assert "resources" not in flows["plain"]
        probed = len(probes.read_text().splitlines())
    finally:
        sched.stop()
    data = json.loads(path.read_text())
    assert data["stopped"] is True
    assert data["flows"][0]["resources"] == {"db": False, "cache": False}  # the last verdicts
    assert len(probes.read_text().splitlines()) == probed  # stop() probes nothing
