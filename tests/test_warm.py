"""Cold start: warm() starts the workers ahead, and the opt-in fork server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cano_mp import CanoError, ConfigError, ProcessExecutor, SharedStore, Workflow
from cano_mp._store import shm as _shm

ROOT = Path(__file__).resolve().parents[1]
STARTS = ["loky", "forkserver"]


def _live_children() -> set[int]:
    """This process's live descendants, less the resource trackers (process-wide)."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if "resource_tracker" in " ".join(proc.cmdline()):
                continue
        except psutil.Error:
            continue
        found.add(proc.pid)
    return found


def _own_files() -> set[str]:
    """Every entry under this process's shared-memory and temp directories, flags included."""
    found = set()
    for d in _shm.process_dirs():
        for root, dirs, files in os.walk(d):
            found.update(os.path.join(root, n) for n in dirs + files)
    return found


@pytest.fixture(params=STARTS)
def private(request: pytest.FixtureRequest) -> Iterator[ProcessExecutor]:
    ex = ProcessExecutor(max_workers=2, reuse=False, start_method=request.param)
    try:
        yield ex
    finally:
        ex.close()


def test_warm_starts_every_worker_before_the_first_task(private: ProcessExecutor) -> None:
    before = _live_children()
    assert private.worker_pids() == []  # on demand: nothing started yet
    assert private.warm() is private
    pids = private.worker_pids()
    assert len(pids) == 2
    assert set(pids) <= _live_children() - before  # real processes, children of ours


def test_warm_is_idempotent(private: ProcessExecutor) -> None:
    private.warm()
    pids = sorted(private.worker_pids())
    private.warm()
    private.warm(1)
    assert sorted(private.worker_pids()) == pids


def test_warm_at_creation_starts_workers_without_a_task() -> None:
    with ProcessExecutor(max_workers=2, reuse=False, warm=True) as ex:
        assert ex.warm(timeout=120) is ex
        assert len(ex.worker_pids()) == 2


def test_warm_reports_a_failing_initializer() -> None:
    ex = ProcessExecutor(max_workers=1, reuse=False, initializer=_fail)
    with ex, pytest.raises(CanoError, match="initializer failed"):
        ex.warm(timeout=120)


def _fail() -> None:
    raise RuntimeError("no")


@pytest.mark.parametrize("start", STARTS)
def test_closing_a_warmed_unused_pool_leaves_no_processes_or_files(start: str) -> None:
    before_procs, before_files = _live_children(), _own_files()
    ex = ProcessExecutor(max_workers=2, reuse=False, start_method=start)
    try:
        ex.warm()
        started = _live_children() - before_procs
        assert len(started) >= 2  # the workers (and the fork server, if any)
        assert _own_files() - before_files  # the pool's flags file
    finally:
        ex.close()
    procs = []
    for pid in started:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert _own_files() == before_files


MAIN_SCRIPT = """\
import os, sys
from cano_mp import ProcessExecutor, Workflow

with open(sys.argv[1], "a") as f:  # no __main__ guard: counts how often this runs
    f.write("imported\\n")

def work(store):
    store["where"] = os.getpid()
    return "done"

ex = ProcessExecutor(max_workers=2, reuse=False, start_method=sys.argv[2]).warm()
warm = set(ex.worker_pids())
flow = Workflow(start="work", executor=ex).register("work", work).add_exit_state("done")
print(flow.orchestrate(), flow.store["where"] in warm)
ex.close()
"""


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("how", ["file", "stdin"])  # stdin: __main__ has no file (a notebook)
def test_a_warmed_pool_runs_a_main_defined_function(start: str, how: str, tmp_path: Path) -> None:
    script, marks = tmp_path / "flow.py", tmp_path / "marks.txt"
    script.write_text(MAIN_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script) if how == "file" else "-", str(marks), start],
        input=None if how == "file" else MAIN_SCRIPT,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["done", "True"]  # ran in one of the warmed workers
    assert marks.read_text() == "imported\n"  # the script never re-ran in a worker


def test_the_fork_server_is_off_by_default(store: SharedStore) -> None:
    with ProcessExecutor(max_workers=1, reuse=False) as ex:
        assert "forkserver" not in repr(ex)
        ex.warm()
        (pid,) = ex.worker_pids()
        assert psutil.Process(pid).ppid() == os.getpid()  # a fresh interpreter of ours


def _where(store: SharedStore) -> str:
    store["parent"] = os.getppid()
    store["preloaded"] = "colorsys" in sys.modules
    return "done"


def test_the_fork_server_runs_tasks_with_preloaded_modules(store: SharedStore) -> None:
    with ProcessExecutor(
        max_workers=1, reuse=False, start_method="forkserver", preload=["colorsys"]
    ) as ex:
        assert "forkserver" in repr(ex)
        flow = Workflow(store, start="go", executor=ex).register("go", _where)
        assert flow.add_exit_state("done").orchestrate() == "done"
        assert store["preloaded"] is True
        assert store["parent"] != os.getpid()  # forked by the server, not by us
    with ProcessExecutor(max_workers=1, reuse=False) as ex:
        flow = Workflow(store, start="go", executor=ex).register("go", _where)
        assert flow.add_exit_state("done").orchestrate() == "done"
        assert store["preloaded"] is False  # nothing imports colorsys in a loky worker


def test_a_preload_module_that_does_not_import_is_skipped(store: SharedStore) -> None:
    with ProcessExecutor(
        max_workers=1, reuse=False, start_method="forkserver", preload=["cano_mp_no_such_mod"]
    ) as ex:
        flow = Workflow(store, start="go", executor=ex).register("go", _where)
        assert flow.add_exit_state("done").orchestrate() == "done"
        assert store["parent"] != os.getpid()


def _pid(store: SharedStore) -> str:
    store["pids"] = [*store["pids"], os.getpid()]
    return "done"


def test_fork_server_workers_are_replaced_after_max_tasks(store: SharedStore) -> None:
    with ProcessExecutor(
        max_workers=1, reuse=False, start_method="forkserver", max_tasks_per_worker=1
    ) as ex:
        flow = Workflow(store, start="go", executor=ex).register("go", _pid)
        flow.add_exit_state("done")
        store["pids"] = []
        for _ in range(3):
            assert flow.orchestrate() == "done"
        assert len(set(store["pids"])) == 3


def _draw(directory: str) -> None:
    import numpy as np

    Path(directory, str(os.getpid())).write_text(repr(np.random.rand()))


def test_forked_workers_do_not_share_numpy_s_global_random_state(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    with ProcessExecutor(
        max_workers=2,
        reuse=False,
        start_method="forkserver",
        preload=["numpy.random"],  # seeded in the server: each fork must reseed
        initializer=_draw,
        initargs=(str(tmp_path),),
    ) as ex:
        ex.warm()
        draws = [p.read_text() for p in tmp_path.iterdir()]
    assert len(draws) == 2 and draws[0] != draws[1]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"preload": ["numpy"]},  # needs the fork server
        {"start_method": "spawn"},
        {"start_method": "forkserver", "preload": "numpy"},  # a string, not a sequence
        {"start_method": "forkserver", "preload": [""]},
    ],
)
def test_bad_start_options_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ProcessExecutor(reuse=False, **kwargs)  # type: ignore[arg-type]


CLI_FLOW = """\
import os, sys, time
import psutil
from cano_mp import Workflow

OUT = os.environ["CANO_TEST_OUT"]
if os.environ.get("CANO_TEST_WAIT_WORKERS"):  # --warm: the workers start during this import
    deadline = time.monotonic() + 60
    while len(psutil.Process().children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(OUT + ".import", "w") as f:
        f.write(str(len(psutil.Process().children())))

def work(store):
    server = psutil.Process(os.getppid())
    with open(OUT, "w") as f:
        f.write(repr((os.getpid(), server.pid, server.ppid(), server.cmdline())))
    return "done"

flow = Workflow(start="work", name="cli").register("work", work).add_exit_state("done")
"""


def _cli(tmp_path: Path, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "cliflow.py").write_text(CLI_FLOW)
    return subprocess.run(
        [sys.executable, "-m", "cano_mp", "run", "cliflow.py:flow", "--workers", "2", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "CANO_TEST_OUT": str(tmp_path / "out"), **env},
    )


def test_cli_fork_server_forks_workers_from_a_copy_of_itself(tmp_path: Path) -> None:
    out = _cli(tmp_path, "--fork-server", "--warm")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
    worker, server, driver, server_cmdline = eval((tmp_path / "out").read_text())
    assert server != driver and worker != server
    # The server is a fork of the driver (its command line), not a fresh interpreter
    # (which would run "-c from multiprocessing.forkserver import main; ...").
    assert "cliflow.py:flow" in server_cmdline
    assert "multiprocessing.forkserver" not in " ".join(server_cmdline)


def test_cli_without_flags_runs_workers_as_fresh_interpreters(tmp_path: Path) -> None:
    out = _cli(tmp_path)
    assert out.returncode == 0, out.stderr
    _worker, _parent, _grand, parent_cmdline = eval((tmp_path / "out").read_text())
    assert "cliflow.py:flow" in parent_cmdline  # the worker's parent is the driver itself


def test_cli_warm_starts_workers_while_the_target_imports(tmp_path: Path) -> None:
    out = _cli(tmp_path, "--warm", CANO_TEST_WAIT_WORKERS="1")
    assert out.returncode == 0, out.stderr
    assert int((tmp_path / "out.import").read_text()) >= 2


def test_cli_fork_server_leaves_a_workflow_s_own_executor_alone(tmp_path: Path) -> None:
    (tmp_path / "inl.py").write_text(
        "import os\nfrom cano_mp import Workflow\n"
        "def work(store):\n    store['pid'] = os.getpid()\n    return 'done'\n"
        "flow = Workflow(start='work', executor='inline').register('work', work)\n"
        "flow.add_exit_state('done')\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "cano_mp", "run", "inl.py:flow", "--fork-server", "--warm"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
