"""Store safety (issue 12): nobody else gets in, no array crashes the process, cleanup never
deletes a live store and always happens.

Scripts that could crash (a segfault in the old code) or that need a fresh process (signal
handlers, a private mount namespace) run in a subprocess; the test reads what they print.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from enum import Enum
from pathlib import Path

import numpy as np
import psutil
import pytest

from cano_mp import (
    InlineExecutor,
    ProcessExecutor,
    SharedStore,
    TaskError,
    WorkerCrashed,
    Workflow,
)
from cano_mp._store import janitor
from cano_mp._store import shm as _shm

ROOT = Path(__file__).resolve().parent.parent
ATTACKER_UID = 65534  # nobody: tests run as root and chown what the "attacker" makes

HEADER = """
import os, sys, time, signal, threading
from enum import Enum
import numpy as np
from cano_mp import *
from cano_mp._store import shm as _shm

class S(Enum):
    A = 1
    B = 2
    DONE = 3
"""


def run_script(
    body: str, *, timeout: float = 60, env: dict[str, str] | None = None, prefix: list[str] = ()
) -> subprocess.CompletedProcess[str]:
    code = HEADER + textwrap.dedent(body)
    return subprocess.run(
        [*prefix, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def start_script(body: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HEADER + textwrap.dedent(body)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown files to another uid")


def can_unshare(*flags: str) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", *flags, "true"], capture_output=True)
    return probe.returncode == 0


class S(Enum):
    A = 1
    B = 2
    DONE = 3


# -- who can get in ----------------------------------------------------------------------
def test_process_directory_is_private_locked_and_unguessable(store: SharedStore) -> None:
    d = os.path.dirname(store._dirs[0] or store._dirs[1])
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.geteuid()
    name = os.path.basename(d)
    pid, token = name[len(_shm.PREFIX) :].split("-")
    assert pid == str(os.getpid()) and len(token) == 16 and int(token, 16) >= 0
    assert os.path.exists(os.path.join(d, _shm.LOCK_NAME))


def test_precreated_directory_of_another_user_is_never_adopted(tmp_path: Path) -> None:
    needs_root()
    out = run_script(
        f"""
        names, real = iter(["a" * 16, "b" * 16]), _shm.secrets.token_hex
        _shm.secrets.token_hex = lambda n: next(names, None) or real(n)
        root = _shm.SHM_ROOT
        trap = os.path.join(root, f"{{_shm.PREFIX}}{{os.getpid()}}-" + "a" * 16)
        os.mkdir(trap, 0o777)
        os.chmod(trap, 0o777)
        planted = os.path.join(trap, "planted")
        open(planted, "w").write("attacker")
        os.chown(planted, {ATTACKER_UID}, {ATTACKER_UID})
        os.chown(trap, {ATTACKER_UID}, {ATTACKER_UID})
        import shutil
        try:
            s = SharedStore()
            s["x"] = np.ones(100_000)
            print(s._dirs[0])
            st = os.lstat(trap)
            print(st.st_uid, oct(st.st_mode & 0o777), sorted(os.listdir(trap)))
            s.close()
        finally:
            shutil.rmtree(trap)  # the attacker's directory, whatever happened
        """
    )
    assert out.returncode == 0, out.stderr
    used, trap_state = out.stdout.splitlines()[:2]
    assert used.split("/")[-2].endswith("b" * 16)
    assert trap_state == f"{ATTACKER_UID} 0o777 ['planted']"


def test_symlink_in_place_of_the_directory_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    os.chmod(target, 0o755)
    out = run_script(
        f"""
        names, real = iter(["c" * 16, "d" * 16]), _shm.secrets.token_hex
        _shm.secrets.token_hex = lambda n: next(names, None) or real(n)
        link = os.path.join(_shm.SHM_ROOT, f"{{_shm.PREFIX}}{{os.getpid()}}-" + "c" * 16)
        os.symlink({str(target)!r}, link)
        try:
            s = SharedStore()
            s["x"] = np.ones(100_000)
            print(s._dirs[0])
            s.close()
        finally:
            os.unlink(link)
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("/")[-2].endswith("d" * 16)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755  # never chmodded
    assert os.listdir(target) == []


def test_janitor_ignores_other_users_and_symlinks(tmp_path: Path) -> None:
    needs_root()
    theirs = Path(_shm.SHM_ROOT) / f"{_shm.PREFIX}1-{'e' * 16}"
    link = Path(_shm.SHM_ROOT) / f"{_shm.PREFIX}2-{'f' * 16}"
    target = tmp_path / "victim"
    target.mkdir()
    (target / "precious").write_text("keep me")
    try:
        theirs.mkdir(mode=0o700)
        os.utime(theirs, (0, 0))  # old: would count as dead if it were ours
        os.chown(theirs, ATTACKER_UID, ATTACKER_UID)
        link.symlink_to(target)
        removed = janitor.run_janitor(force=True)
        assert str(theirs) not in removed and theirs.is_dir()
        assert link.is_symlink() and (target / "precious").read_text() == "keep me"
    finally:
        shutil.rmtree(theirs, ignore_errors=True)
        link.unlink(missing_ok=True)


def _large_pickle_store() -> SharedStore:
    s = SharedStore()
    s["big"] = [f"row {i}" for i in range(60_000)]  # a pickle of > 256 KiB: in a segment
    return s


def test_worker_refuses_a_segment_planted_by_another_user(
    tmp_path: Path, one_worker: ProcessExecutor
) -> None:
    needs_root()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, (f"touch {marker}",))

    import pickle

    def read_big(store: SharedStore) -> S:
        store["n"] = len(store["big"])
        return S.DONE

    with _large_pickle_store() as s:
        (path, _nbytes), _refs = s._entries["big"][0]  # type: ignore[misc]
        assert isinstance(path, str) and os.path.exists(path)
        size = os.path.getsize(path)
        payload = pickle.dumps(Evil()).ljust(size, b".")
        os.unlink(path)
        with open(path, "wb") as f:
            f.write(payload)
        os.chown(path, ATTACKER_UID, ATTACKER_UID)
        flow = Workflow(executor=one_worker).register(S.A, read_big).add_exit_state(S.DONE)
        with pytest.raises(TaskError) as info:
            flow.orchestrate(S.A, store=s)
        assert "owned by uid" in str(info.value.__cause__)
        assert not marker.exists()


def test_worker_refuses_a_symlink_in_place_of_a_segment(
    tmp_path: Path, one_worker: ProcessExecutor
) -> None:
    decoy = tmp_path / "decoy"
    decoy.write_bytes(b"x" * 1_000_000)

    def read_big(store: SharedStore) -> S:
        store["n"] = len(store["big"])
        return S.DONE

    with _large_pickle_store() as s:
        (path, _nbytes), _refs = s._entries["big"][0]  # type: ignore[misc]
        os.unlink(path)
        os.symlink(decoy, path)
        flow = Workflow(executor=one_worker).register(S.A, read_big).add_exit_state(S.DONE)
        with pytest.raises(TaskError) as info:
            flow.orchestrate(S.A, store=s)
        assert "symlink" in str(info.value.__cause__)


def test_a_truncated_segment_is_an_error_not_sigbus(one_worker: ProcessExecutor) -> None:
    def read_arr(store: SharedStore) -> S:
        store["n"] = float(store["arr"].sum())
        return S.DONE

    with SharedStore() as s:
        s["arr"] = np.ones(1_000_000)
        path = s._entries["arr"][0][1][0][0]
        os.truncate(path, 4096)
        flow = Workflow(executor=one_worker).register(S.A, read_arr).add_exit_state(S.DONE)
        with pytest.raises(TaskError) as info:
            flow.orchestrate(S.A, store=s)
        assert not isinstance(info.value, WorkerCrashed)
        assert "holds 4096 bytes" in str(info.value.__cause__)


# -- arrays never crash the process ---------------------------------------------------------
SIZES = [0, 1, 8, 4096, 64 * 1024 - 8, 64 * 1024, 64 * 1024 + 8, 1_000_000]


@pytest.mark.parametrize("nbytes", SIZES)
def test_array_of_any_size_works_in_the_driver(store: SharedStore, nbytes: int) -> None:
    a = store.array("a", nbytes // 8 if nbytes >= 8 else nbytes, "float64" if nbytes >= 8 else "u1")
    a[:] = 7
    assert np.array_equal(store["a"], a) and (store["a"] == 7).all()


def _fill_in_task(n: int, dtype: str) -> object:
    def fill(store: SharedStore) -> S:
        a = store.array("a", n, dtype)
        a[:] = 7
        return S.B

    return fill


def _check(store: SharedStore) -> S:
    a = store["a"]
    store["ok"] = bool((a == 7).all()) and a.size == store["n"]
    return S.DONE


@pytest.mark.parametrize("nbytes", SIZES)
def test_array_of_any_size_filled_in_a_task_is_committed(
    executor: object, store: SharedStore, nbytes: int
) -> None:
    n, dtype = (nbytes // 8, "float64") if nbytes >= 8 else (nbytes, "u1")
    store["n"] = n
    flow = (
        Workflow(executor=executor)  # type: ignore[arg-type]
        .register(S.A, _fill_in_task(n, dtype))
        .register(S.B, _check)
        .add_exit_state(S.DONE)
    )
    flow.orchestrate(S.A, store=store)
    assert store["ok"] is True
    assert (store["a"] == 7).all()


@pytest.mark.parametrize("how", ["close", "with", "overwrite", "delete", "clear"])
@pytest.mark.parametrize("n", [10, 1_000_000])
def test_array_outlives_its_store_entry_without_a_signal(how: str, n: int) -> None:
    out = run_script(
        f"""
        how = {how!r}
        s = SharedStore()
        if how == "with":
            with SharedStore() as s2:
                a = s2.array("a", {n})
        else:
            a = s.array("a", {n})
            if how == "close": s.close()
            elif how == "overwrite": s["a"] = 1
            elif how == "delete": del s["a"]
            elif how == "clear": s.clear()
        a[:] = 3
        print(float(a.sum()))
        """
    )
    assert out.returncode == 0, out.stderr  # the old code died here with SIGSEGV (-11)
    assert float(out.stdout) == 3.0 * n


def keep_array(store: SharedStore) -> S:
    import builtins

    a = store.array("kept", 100_000)
    a[:] = 1
    builtins._cano_kept = a  # type: ignore[attr-defined]
    return S.B


def touch_kept(store: SharedStore) -> S:
    import builtins

    a = builtins._cano_kept  # type: ignore[attr-defined]
    a[:] = 2
    store["sum"] = float(a.sum())
    return S.DONE


def test_task_that_keeps_an_array_does_not_crash_the_next_task(
    one_worker: ProcessExecutor,
) -> None:
    flow = (
        Workflow(executor=one_worker)
        .register(S.A, keep_array)
        .register(S.B, touch_kept)
        .add_exit_state(S.DONE)
    )
    with SharedStore() as s:
        flow.orchestrate(S.A, store=s)
        pid = one_worker.worker_pids()
        flow.orchestrate(S.A, store=s)
        assert s["sum"] == 200_000.0
        assert one_worker.worker_pids() == pid  # the same worker, alive


# -- a full tmpfs is a fallback or an error, never SIGBUS -----------------------------------
needs_mount_ns = pytest.mark.skipif(
    not can_unshare("-m", "--propagation", "private"),
    reason="needs a private mount namespace (unshare -m) to mount a small tmpfs",
)


def run_in_small_tmpfs(
    body: str, shm_mb: int, tmp_mb: int | None = None
) -> subprocess.CompletedProcess[str]:
    mounts = f"mount -t tmpfs -o size={shm_mb}m tmpfs /dev/shm"
    env = {}
    if tmp_mb is not None:
        small = "/run/cano_small"
        mounts += f" && mkdir -p {small} && mount -t tmpfs -o size={tmp_mb}m tmpfs {small}"
        env["TMPDIR"] = "/run/cano_small"
    code = HEADER + textwrap.dedent(body)
    script = Path("/tmp") / f"cano_small_{os.getpid()}_{threading.get_ident()}.py"
    script.write_text(code)
    try:
        return subprocess.run(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                f'{mounts} && exec "{sys.executable}" {script}',
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env={**os.environ, **env},
        )
    finally:
        script.unlink()


@needs_mount_ns
def test_concurrent_fills_larger_than_tmpfs_fall_back_instead_of_sigbus() -> None:
    out = run_in_small_tmpfs(
        """
        _shm.SHM_FREE_MARGIN = 0  # only the reservation protects us now
        s = SharedStore()
        n = 110 * 1024 * 1024 // 8
        arrays = {}
        def fill(k):
            a = s.array(f"a{k}", n)
            a[:] = k
            arrays[k] = a
        ts = [threading.Thread(target=fill, args=(k,)) for k in (1, 2)]
        for t in ts: t.start()
        for t in ts: t.join()
        print(sorted(p.split("/")[1] for p in (s._entries[k][0][1][0][0] for k in ("a1", "a2"))))
        print(float(s["a1"][-1]), float(s["a2"][-1]))
        s.close()
        """,
        shm_mb=200,
    )
    assert out.returncode == 0, out.stderr  # SIGBUS is -7
    roots, values = out.stdout.splitlines()[:2]
    assert "dev" in roots and values == "1.0 2.0"  # one in tmpfs, one fell back to disk
    assert "is full" in out.stderr or "lacks room" in out.stderr


@needs_mount_ns
def test_no_space_anywhere_is_a_store_error() -> None:
    out = run_in_small_tmpfs(
        """
        _shm.SHM_FREE_MARGIN = 0
        s = SharedStore()
        try:
            s.array("a", 100 * 1024 * 1024 // 8)
        except StoreError as e:
            print("StoreError:", e)
        try:
            s["b"] = np.ones(100 * 1024 * 1024 // 8)
        except StoreError as e:
            print("StoreError:", e)
        s["small"] = np.ones(1000)
        print("still usable", s["small"].sum())
        s.close()
        """,
        shm_mb=32,
        tmp_mb=16,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("StoreError: no space left") and lines[1].startswith("StoreError")
    assert lines[2] == "still usable 1000.0"


# -- cleanup never deletes a live store -----------------------------------------------------
@pytest.mark.skipif(not can_unshare("-p", "-f"), reason="needs a PID namespace (unshare -p)")
def test_janitor_keeps_a_live_store_of_another_pid_namespace() -> None:
    code = HEADER + textwrap.dedent(
        """
        s = SharedStore()
        s["x"] = np.ones(1_000_000)
        print(s._dirs[0], flush=True)
        sys.stdin.readline()
        print(float(s["x"].sum()), flush=True)
        """
    )
    proc = subprocess.Popen(
        ["unshare", "-p", "-f", sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        store_dir = proc.stdout.readline().strip()
        # its pid in its namespace (1 or 2) means nothing here
        assert os.path.basename(os.path.dirname(store_dir)).split("-")[1] in ("1", "2")
        removed = janitor.run_janitor(force=True)
        assert os.path.dirname(store_dir) not in removed and os.path.isdir(store_dir)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "1000000.0"
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0  # unshare -f waits for the namespace's process
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(store_dir)  # it cleaned up after itself at exit


# -- SIGTERM cleans up like Ctrl-C ----------------------------------------------------------
SLOW_FLOW = """
def slow(store):
    print("running", flush=True)
    time.sleep(60)
    return S.DONE

store = SharedStore()
store["big"] = np.ones(2_000_000)
print(os.path.dirname(store._dirs[0]), flush=True)
flow = Workflow(executor=ProcessExecutor(1)).register(S.A, slow).add_exit_state(S.DONE)
"""


def _wait_line(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert text in line, (line, proc.stderr.read() if proc.stderr else "")


def test_sigterm_during_orchestrate_stops_the_run_and_cleans_up() -> None:
    proc = start_script(
        SLOW_FLOW
        + """
try:
    flow.orchestrate(S.A, store=store)
except Terminated as e:
    print("Terminated:", e, flush=True)
    raise
"""
    )
    assert proc.stdout is not None
    shm_dir = proc.stdout.readline().strip()
    _wait_line(proc, "running")
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True)]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 15
    assert "Terminated: " in out and "SIGTERM" in out
    assert proc.returncode == 1  # the Terminated error ended the script
    assert not os.path.exists(shm_dir)
    _gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive


def test_sigterm_to_cano_mp_run_cleans_up(tmp_path: Path) -> None:
    flow_file = tmp_path / "slowflow.py"
    flow_file.write_text(
        textwrap.dedent(
            """
            import os, time
            from enum import Enum
            import numpy as np
            from cano_mp import Workflow, SharedStore

            class S(Enum):
                A = 1
                DONE = 2

            def slow(store):
                print("dir", os.environ.get("CANO_MP_OWNER"), flush=True)
                time.sleep(60)
                return S.DONE

            store = SharedStore()
            store["big"] = np.ones(2_000_000)
            flow = Workflow(store, start=S.A).register(S.A, slow).add_exit_state(S.DONE)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "cano_mp", "run", f"{flow_file}:flow", "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("dir cano_mp-"), (line, proc.stderr.read() if proc.stderr else "")
    owner = line.split()[1]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert not os.path.exists(os.path.join(_shm.SHM_ROOT, owner))


def test_sigterm_outside_a_run_cleans_up_and_dies_by_sigterm() -> None:
    proc = start_script(
        """
        s = SharedStore()
        s["big"] = np.ones(1_000_000)
        print(os.path.dirname(s._dirs[0]), flush=True)
        time.sleep(60)
        """
    )
    assert proc.stdout is not None
    shm_dir = proc.stdout.readline().strip()
    assert os.path.isdir(shm_dir)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM
    assert not os.path.exists(shm_dir)


def test_a_users_own_sigterm_handler_is_left_alone() -> None:
    proc = start_script(
        """
        def mine(signum, frame):
            print("user handler", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGTERM, mine)
        s = SharedStore()
        s["big"] = np.ones(1_000_000)
        flow = Workflow(s).register(S.A, lambda st: S.DONE).add_exit_state(S.DONE)
        flow.orchestrate(S.A)
        assert signal.getsignal(signal.SIGTERM) is mine
        print(os.path.dirname(s._dirs[0]), flush=True)
        time.sleep(60)
        """
    )
    assert proc.stdout is not None
    shm_dir = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert "user handler" in out
    assert not os.path.exists(shm_dir)  # cleanup still ran at exit


# -- children of a task never outlive their worker --------------------------------------------
def spawn_then_exit(store: SharedStore) -> S:
    child = subprocess.Popen(["sleep", "600"])
    with open(store["pidfile"], "w") as f:
        f.write(str(child.pid))
    os._exit(1)


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_children_of_a_task_die_with_its_worker(
    tmp_path: Path, one_worker: ProcessExecutor
) -> None:
    pidfile = tmp_path / "child.pid"
    from cano_mp import TaskConfig

    flow = (
        Workflow(executor=one_worker)
        .register(S.A, spawn_then_exit, config=TaskConfig.minimal())
        .add_exit_state(S.DONE)
    )
    with SharedStore() as s:
        s["pidfile"] = str(pidfile)
        with pytest.raises(WorkerCrashed):
            flow.orchestrate(S.A, store=s)
    child = int(pidfile.read_text())
    try:
        assert _wait_gone(child), "the task's child outlived its worker"
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_children_of_a_task_are_killed_after_the_driver_is_sigkilled(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    proc = start_script(
        f"""
        import subprocess
        def spawn(store):
            child = subprocess.Popen(["sleep", "600"])
            open({str(pidfile)!r}, "w").write(str(child.pid))
            time.sleep(60)
            return S.DONE
        flow = Workflow(executor=ProcessExecutor(1)).register(S.A, spawn).add_exit_state(S.DONE)
        flow.orchestrate(S.A)
        """
    )
    child = None
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pidfile.read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.5)
        assert psutil.pid_exists(child)  # the driver could not clean up: the janitor must
        out = run_script("SharedStore().close()")  # any later cano_mp process
        assert out.returncode == 0, out.stderr
        assert _wait_gone(child), "the janitor left a dead driver's task child running"
    finally:
        proc.kill()
        proc.wait()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- concurrent runs on one store -----------------------------------------------------------
def increment(store: SharedStore) -> S:
    store["n"] = store.get("n", 0) + 1
    store["mine"] = store.get("mine", 0) + 1
    return S.A if store["mine"] % 30 else S.DONE


@pytest.mark.parametrize("kind", ["process", "inline"])
def test_two_runs_on_one_store_never_lose_updates(kind: str, pool: ProcessExecutor) -> None:
    executor = pool if kind == "process" else InlineExecutor()

    def counted(store: SharedStore) -> S:
        time.sleep(0.001)
        return increment(store)

    flow = Workflow(executor=executor).register(S.A, counted).add_exit_state(S.DONE)
    with SharedStore() as s:
        errors: list[BaseException] = []

        def run() -> None:
            try:
                flow.orchestrate(S.A, store=s)
            except BaseException as exc:  # pragma: no cover - shown below
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert s["n"] == 60


def test_a_run_waiting_for_its_store_respects_the_workflow_timeout() -> None:
    from cano_mp import WorkflowTimeout

    release = threading.Event()

    def hold(store: SharedStore) -> S:
        release.wait(30)
        return S.DONE

    with SharedStore() as s:
        slow = Workflow(executor="inline").register(S.A, hold).add_exit_state(S.DONE)
        quick = Workflow(executor="inline", timeout=0.5).register(S.A, increment)
        quick.add_exit_state(S.DONE)
        t = threading.Thread(target=slow.orchestrate, args=(S.A,), kwargs={"store": s})
        t.start()
        try:
            time.sleep(0.2)
            with pytest.raises(WorkflowTimeout):
                quick.orchestrate(S.A, store=s)
        finally:
            release.set()
            t.join(30)


def test_trace_file_is_written_through_no_symlink(tmp_path: Path) -> None:
    from cano_mp import TraceRecorder

    victim = tmp_path / "victim"
    victim.write_text("keep me")
    link = tmp_path / "trace.json"
    link.symlink_to(victim)
    TraceRecorder().save(link)
    assert victim.read_text() == "keep me"
    assert not link.is_symlink() and link.read_text().startswith('{"traceEvents"')
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
