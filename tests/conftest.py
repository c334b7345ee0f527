"""Shared fixtures: real pools, stores that are always closed, and leak checks."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest

from cano_mp import InlineExecutor, ProcessExecutor, SharedStore
from cano_mp._executors import shutdown_shared_pools
from cano_mp._store import shm as _shm


@pytest.fixture(scope="session")
def pool() -> Iterator[ProcessExecutor]:
    """A private 2-worker pool shared by the tests of the session."""
    with ProcessExecutor(max_workers=2, reuse=False) as ex:
        yield ex


@pytest.fixture(params=["process", "inline"])
def executor(request: pytest.FixtureRequest, pool: ProcessExecutor) -> object:
    """Each contract test runs on a real pool and on the inline executor."""
    return pool if request.param == "process" else InlineExecutor()


@pytest.fixture
def one_worker() -> Iterator[ProcessExecutor]:
    """A private pool of one worker, its own (not reused) loky executor, closed after."""
    with ProcessExecutor(max_workers=1, reuse=False) as ex:
        yield ex


@pytest.fixture
def store() -> Iterator[SharedStore]:
    s = SharedStore()
    try:
        yield s
    finally:
        s.close()


def cano_files() -> list[str]:
    """Every file under this process's shared-memory directories (store segments)."""
    found = []
    for d in _shm.process_dirs():
        for root, _dirs, files in os.walk(d):
            found.extend(
                os.path.join(root, f) for f in files if not f.startswith(".") and "flags" not in f
            )
    return found


@pytest.fixture(scope="session", autouse=True)
def no_orphans_at_end() -> Iterator[None]:
    yield
    shutdown_shared_pools()
    me = psutil.Process()
    children = [c for c in me.children(recursive=True) if _is_live_worker(c)]
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"worker processes left running: {alive}"


def _is_live_worker(proc: psutil.Process) -> bool:
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False  # dead, only not reaped yet
        return "resource_tracker" not in " ".join(proc.cmdline())
    except psutil.Error:
        return False
