"""`cano-mp serve --control` / `cano-mp ctl` against a live daemon, and `--metrics-port`."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

FLOWS = """\
from enum import Enum
from pathlib import Path
from cano_mp import Scheduler, Workflow, task

MARK = Path(__file__).with_name("ok")


class S(Enum):
    GO = 1
    DONE = 2


@task
def go(store):
    return S.DONE


@task
def picky(store):
    if not MARK.exists():
        raise RuntimeError("no mark")
    return S.DONE


flow = Workflow(start=S.GO, name="good").register(S.GO, go).add_exit_state(S.DONE)
bad = Workflow(start=S.GO, name="bad").register(S.GO, picky).add_exit_state(S.DONE)
sched = (
    Scheduler()
    .manual("job", flow, S.GO)
    .manual("fragile", bad, S.GO, trip_after=1)
    .every_seconds("tick", flow, S.GO, 3600)
)
"""


class Serve:
    """A `cano-mp serve` subprocess whose stderr is read as it comes."""

    def __init__(self, tmp_path: Path, *extra: str) -> None:
        script = tmp_path / "flows.py"
        script.write_text(FLOWS)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cano_mp", "serve", f"{script}:sched", *extra],
            cwd=ROOT,
            env={**os.environ, "CANO_MP_DAEMON_DIR": str(tmp_path)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.lines):
                if text in line:
                    return line
            assert self.proc.poll() is None, "".join(self.lines)
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not seen in:\n{''.join(self.lines)}")

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        rc = self.proc.wait(30)
        self.reader.join(10)
        return rc


@pytest.fixture
def serve_at(tmp_path: Path) -> Iterator[Any]:
    started: list[Serve] = []

    def make(*extra: str) -> Serve:
        started.append(Serve(tmp_path, *extra))
        return started[-1]

    yield make
    for s in started:
        s.close()


def ctl(path: str | Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cano_mp", "ctl", str(path), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def flows(path: Path) -> dict[str, Any]:
    out = ctl(path, "list")
    assert out.returncode == 0, out.stderr
    return {f["id"]: f for f in json.loads(out.stdout)["flows"]}


def wait_until(pred: Any, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.1)


def test_ctl_drives_a_live_daemon(tmp_path: Path, serve_at: Any) -> None:
    sock = tmp_path / "ctl.sock"
    daemon = serve_at("--control", str(sock))
    daemon.wait_for("control socket at")
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600

    assert set(flows(sock)) == {"job", "fragile", "tick"}
    out = ctl(sock, "trigger", "job")
    assert out.returncode == 0 and json.loads(out.stdout) == {"ok": True}
    # run_count counts runs started: wait for the run to end too (it may still run under load)
    wait_until(lambda: flows(sock)["job"]["status"] == "completed")
    assert flows(sock)["job"]["run_count"] == 1

    # pause / resume
    assert ctl(sock, "pause", "tick").returncode == 0
    assert flows(sock)["tick"]["paused"] is True
    assert ctl(sock, "resume", "tick").returncode == 0
    assert flows(sock)["tick"]["paused"] is False

    # a tripped flow, reset
    assert ctl(sock, "trigger", "fragile").returncode == 0
    wait_until(lambda: flows(sock)["fragile"]["tripped"])
    assert flows(sock)["fragile"]["status"] == "failed"
    (tmp_path / "ok").touch()
    assert ctl(sock, "reset", "fragile").returncode == 0
    info = flows(sock)["fragile"]
    assert not info["tripped"] and info["consecutive_failures"] == 0
    assert ctl(sock, "trigger", "fragile").returncode == 0
    wait_until(lambda: flows(sock)["fragile"]["status"] == "completed")

    # an unknown flow, a bad use: one line, exit 2
    out = ctl(sock, "trigger", "nope")
    assert out.returncode == 2 and "no flow with id 'nope'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert ctl(sock, "pause").returncode == 2

    out = ctl(sock, "stop")
    assert out.returncode == 0
    assert daemon.proc.wait(60) == 0
    assert not sock.exists()  # removed on the way out
    out = ctl(sock, "list")  # nobody listens any more
    assert out.returncode == 2 and "cannot connect" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_the_default_socket_lives_in_a_private_directory(serve_at: Any) -> None:
    daemon = serve_at("--control", "--log-level", "INFO")
    path = daemon.wait_for("control socket at").rsplit("control socket at ", 1)[1].strip()
    directory = os.path.dirname(path)
    assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
    assert os.lstat(directory).st_uid == os.geteuid()
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert ctl(path, "stop").returncode == 0
    assert daemon.proc.wait(60) == 0
    assert not os.path.exists(directory)


OTHER_UID = """\
import json, os, socket, sys
os.setgid(65534)
os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect": type(exc).__name__}))
    raise SystemExit(0)
try:
    s.sendall(b'{"op": "stop"}\\n')
except OSError:  # refused at once: the server may have closed before we wrote
    pass
data = b""
try:
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
except OSError as exc:
    data += f"<{type(exc).__name__}>".encode()
print(json.dumps({"reply": data.decode()}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
def test_another_uid_is_refused(serve_at: Any) -> None:
    # A directory others may enter and a socket others may write: only SO_PEERCRED is left
    # to refuse them.
    directory = tempfile.mkdtemp(prefix="cano-ctl-test-")
    try:
        os.chmod(directory, 0o711)
        sock = os.path.join(directory, "ctl.sock")
        daemon = serve_at("--control", sock)
        daemon.wait_for("control socket at")

        def as_other_uid() -> dict[str, str]:
            out = subprocess.run(
                [sys.executable, "-I", "-c", OTHER_UID, sock],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            return dict(json.loads(out.stdout))

        assert as_other_uid() == {"connect": "PermissionError"}  # 0600: not even connect
        os.chmod(sock, 0o666)
        seen = as_other_uid()
        assert "refused: uid 65534" in seen["reply"] and '"ok":false' in seen["reply"]
        daemon.wait_for("refused a connection from uid 65534")
        assert daemon.proc.poll() is None  # its stop was not obeyed
        assert ctl(sock, "list").returncode == 0  # the owner still gets in
    finally:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


def test_metrics_endpoint_serves_prometheus_text(tmp_path: Path, serve_at: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sock = tmp_path / "ctl.sock"
    daemon = serve_at("--metrics-port", str(port), "--control", str(sock))
    daemon.wait_for("control socket at")
    assert ctl(sock, "trigger", "job").returncode == 0
    wait_until(lambda: flows(sock)["job"]["run_count"] == 1 and flows(sock)["tick"]["run_count"])
    wait_until(lambda: flows(sock)["job"]["status"] == "completed")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    assert "# TYPE cano_mp_runs_total counter" in text
    assert 'cano_mp_runs_total{workflow="good",outcome="completed"}' in text
    assert "cano_mp_task_duration_seconds_bucket" in text
    assert ctl(sock, "stop").returncode == 0
    assert daemon.proc.wait(60) == 0
