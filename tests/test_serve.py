"""`cano-mp serve`: the daemon example under signals, with its status file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent


def read_status(path: Path) -> dict[str, Any]:
    try:
        flows = json.loads(path.read_text())["flows"]
    except (OSError, ValueError, KeyError):
        return {}
    return {f["id"]: f for f in flows}


def wait_until(pred: Any, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.05)


def start(tmp_path: Path, target: str, *extra: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cano_mp", "serve", target, *extra],
        cwd=ROOT,
        env={**os.environ, "CANO_MP_DAEMON_DIR": str(tmp_path), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_daemon_runs_flows_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    status = tmp_path / "status.json"
    proc = start(
        tmp_path, "examples/daemon.py:build", "--status-file", str(status), REPORT_EVERY="0.3"
    )
    try:
        wait_until(lambda: read_status(status).get("report", {}).get("run_count", 0) >= 3)
        proc.send_signal(signal.SIGUSR1)  # the example's manual trigger
        wait_until(lambda: read_status(status).get("backfill", {}).get("status") == "completed")
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    flows = read_status(status)
    assert set(flows) == {"report", "maintenance", "backfill"}
    report = flows["report"]
    assert report["status"] == "completed" and report["failure_count"] == 0
    assert report["last_duration"] > 0 and report["schedule"] == "every 0.3s"
    assert flows["maintenance"]["run_count"] == 0 and flows["maintenance"]["next_run"]
    assert flows["backfill"]["run_count"] == 1 and flows["backfill"]["next_run"] is None
    lines = (tmp_path / "reports.log").read_text().splitlines()
    assert len(lines) >= 3 and all("mean=" in line for line in lines)
    assert (tmp_path / "backfill.txt").read_text().strip()
    assert "flow 'report' run 1 completed at DONE in" in err  # one line per run
    assert "SIGTERM received: stopping" in err and "scheduler stopped" in err
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive  # no worker outlives the daemon


def test_a_stop_timeout_cancels_a_running_flow_and_exits_1(tmp_path: Path) -> None:
    script = tmp_path / "stuck.py"
    script.write_text(
        "import time\n"
        "from enum import Enum\n"
        "from cano_mp import Scheduler, Workflow, task\n"
        "class S(Enum):\n"
        "    GO = 1\n"
        "    DONE = 2\n"
        "@task\n"
        "def stuck(store):\n"
        "    time.sleep(600)\n"
        "    return S.DONE\n"
        "flow = Workflow(start=S.GO).register(S.GO, stuck).add_exit_state(S.DONE)\n"
        "sched = Scheduler().every_seconds('stuck', flow, S.GO, 60)\n"
    )
    proc = start(tmp_path, f"{script}:sched", "--stop-timeout", "0.5")
    try:
        time.sleep(3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    assert "did not stop within 0.5s" in err and "'stuck'" in err
    assert took < 10


def test_serve_rejects_what_is_not_a_scheduler(tmp_path: Path) -> None:
    proc = start(tmp_path, "examples/split_join.py:build")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "not a Scheduler" in err or "defines no" in err


def test_serve_marks_its_status_file_stopped_and_private(tmp_path: Path) -> None:
    script = tmp_path / "idle.py"
    script.write_text(
        "from enum import Enum\n"
        "from cano_mp import Scheduler, Workflow, task\n"
        "class S(Enum):\n"
        "    GO = 1\n"
        "    DONE = 2\n"
        "@task(inline=True)\n"
        "def go(store):\n"
        "    return S.DONE\n"
        "flow = Workflow(start=S.GO, executor='inline').register(S.GO, go).add_exit_state(S.DONE)\n"
        "sched = Scheduler().manual('idle', flow, S.GO).every_seconds('tick', flow, S.GO, 0.2)\n"
    )
    status = tmp_path / "status.json"
    proc = start(tmp_path, f"{script}:sched", "--status-file", str(status), "--stop-timeout", "inf")
    try:
        wait_until(lambda: read_status(status).get("tick", {}).get("run_count", 0) >= 2)
        assert json.loads(status.read_text())["stopped"] is False
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    data = json.loads(status.read_text())
    assert data["stopped"] is True and data["stopped_at"].endswith("+00:00")
    assert "waiting as long as they take for running flows" in err
    assert oct(status.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idle.py", "status.json"]


def test_serve_status_file_shows_resource_health(tmp_path: Path) -> None:
    script = tmp_path / "res.py"
    up = tmp_path / "up"
    up.touch()
    script.write_text(
        "import os\n"
        "from enum import Enum\n"
        "from cano_mp import Resource, Scheduler, Workflow, task, task_context\n"
        "class S(Enum):\n"
        "    GO = 1\n"
        "    DONE = 2\n"
        "@task(inline=True)\n"
        "def go(store):\n"
        "    task_context().resources['db']\n"
        "    return S.DONE\n"
        f"db = Resource(setup=dict, health=lambda v: os.path.exists({str(up)!r}))\n"
        "flow = Workflow(start=S.GO, executor='inline', resources={'db': db})\n"
        "flow.register(S.GO, go).add_exit_state(S.DONE)\n"
        "sched = Scheduler().every_seconds('tick', flow, S.GO, 0.2)\n"
    )
    status = tmp_path / "status.json"
    proc = start(tmp_path, f"{script}:sched", "--status-file", str(status))
    try:
        wait_until(lambda: read_status(status).get("tick", {}).get("resources") == {"db": True})
        up.unlink()
        wait_until(lambda: read_status(status).get("tick", {}).get("resources") == {"db": False})
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads(status.read_text())["flows"][0]["resources"] == {"db": False}


def test_serve_rejects_a_bad_stop_timeout_in_one_line(tmp_path: Path) -> None:
    for bad in ("nan", "-1"):
        proc = start(tmp_path, "examples/daemon.py:build", "--stop-timeout", bad)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        assert err.startswith("cano-mp: error: --stop-timeout must") and err.count("\n") == 1
