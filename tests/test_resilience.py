"""Circuit breakers and rate limiters hold across the processes of a real pool: one budget
and one breaker for the driver and every worker, and a worker killed inside the lock
stops nobody."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum, auto
from pathlib import Path

import pytest

from cano_mp import (
    CircuitBreaker,
    CircuitOpen,
    ConfigError,
    JoinConfig,
    JoinStrategy,
    MultiRateLimiter,
    ProcessExecutor,
    RateLimiter,
    SharedStore,
    Task,
    TaskConfig,
    WindowedRateLimiter,
    Workflow,
)

NO_RETRY = TaskConfig.minimal()


class S(Enum):
    SPLIT = auto()
    THEN = auto()
    DONE = auto()


@pytest.fixture(scope="module")
def pool8() -> Iterator[ProcessExecutor]:
    with ProcessExecutor(8, reuse=False) as ex:
        ex.warm()
        yield ex


def split(
    branches: list[Task[S]], executor: ProcessExecutor, need: int | None = None
) -> Workflow[S]:
    strategy = JoinStrategy.all() if need is None else JoinStrategy.quorum(need)
    return (
        Workflow(start=S.SPLIT, executor=executor)
        .register_split(S.SPLIT, branches, JoinConfig(strategy, S.DONE))
        .add_exit_state(S.DONE)
    )


def wait_until(t: float) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(min(left, 0.01))


def start_line(where: str, tag: int) -> float:
    """In a branch: say it arrived, then wait for the common start time the test sets once
    every branch has arrived (workers of a loaded machine start their calls seconds apart)."""
    Path(where, f"arrived-{tag}").touch()
    go = Path(where, "go")
    while not go.exists() or not go.read_text():
        time.sleep(0.005)
    t0 = float(go.read_text())
    wait_until(t0)
    return t0


@contextmanager
def starter(where: Path, branches: int, lead: float = 0.3) -> Iterator[None]:
    """The test's side of :func:`start_line`, in a thread while the workflow runs."""

    def release() -> None:
        deadline = time.monotonic() + 120
        while len(list(where.glob("arrived-*"))) < branches and time.monotonic() < deadline:
            time.sleep(0.005)
        tmp = where / "go.tmp"
        tmp.write_text(repr(time.monotonic() + lead))
        tmp.rename(where / "go")

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(130)


class Hammer(Task[S]):
    """Takes from ``limiter`` as fast as it can between t0 and t1; counts what it got."""

    config = NO_RETRY

    def __init__(self, tag: int, limiter: RateLimiter, where: str, seconds: float) -> None:
        self.tag, self.limiter, self.where, self.seconds = tag, limiter, where, seconds

    def run(self, store: SharedStore) -> S:
        t1 = start_line(self.where, self.tag) + self.seconds
        got = 0
        while (left := t1 - time.monotonic()) > 0:
            # counted only when taken inside the window (the take precedes this clock read)
            if self.limiter.acquire(timeout=left) and time.monotonic() <= t1:
                got += 1
        store[f"got{self.tag}"] = (got, os.getpid())
        return S.DONE


def test_eight_workers_share_one_token_bucket(pool8: ProcessExecutor, tmp_path: Path) -> None:
    limiter = RateLimiter(rate=100, per=1.0, burst=20)
    flow = split([Hammer(i, limiter, str(tmp_path), 3.0) for i in range(8)], pool8)
    with SharedStore() as store, starter(tmp_path, 8):
        flow.orchestrate(store=store)
        rows = [store[f"got{i}"] for i in range(8)]
    total = sum(got for got, _pid in rows)
    assert len({pid for _got, pid in rows}) >= 2  # really several processes
    assert total <= 20 + 100 * 3, rows  # the burst, then the rate
    assert total >= 0.9 * 320, rows
    assert limiter.stats["admitted"] >= total


class Fails(Task[S]):
    config = NO_RETRY

    def __init__(self, breaker: CircuitBreaker, times: int) -> None:
        self.breaker, self.times = breaker, times

    def run(self, store: SharedStore) -> S:
        for _ in range(self.times):
            try:
                with self.breaker:
                    raise OSError("the service is down")
            except OSError:
                pass
        store["opener"] = os.getpid()
        return S.THEN


class Probe(Task[S]):
    """One call through the breaker (after t0), held ``hold`` seconds; records the verdict."""

    config = NO_RETRY

    def __init__(
        self, tag: int, breaker: CircuitBreaker, where: str | None = None, hold: float = 0.0
    ) -> None:
        self.tag, self.breaker, self.where, self.hold = tag, breaker, where, hold

    def run(self, store: SharedStore) -> S:
        if self.where is not None:
            start_line(self.where, self.tag)
        try:
            with self.breaker:
                time.sleep(self.hold)
            verdict = "passed"
        except CircuitOpen:
            verdict = "refused"
        store[f"probe{self.tag}"] = (verdict, os.getpid())
        return S.DONE


def test_a_breaker_opened_in_one_worker_refuses_the_first_call_in_the_others(
    pool8: ProcessExecutor,
) -> None:
    # Every worker up (a test before may have had some killed by a cancel): a probe finds
    # another worker idle instead of waiting for one to start.
    pool8.warm()
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=60.0)
    flow = (
        Workflow(start=S.SPLIT, executor=pool8)
        .register(S.SPLIT, Fails(breaker, 3))
        .register_split(
            S.THEN, [Probe(i, breaker) for i in range(8)], JoinConfig(JoinStrategy.all(), S.DONE)
        )
        .add_exit_state(S.DONE)
    )
    with SharedStore() as store:
        flow.orchestrate(store=store)
        opener = store["opener"]
        probes = [store[f"probe{i}"] for i in range(8)]
    assert opener != os.getpid()
    assert all(verdict == "refused" for verdict, _pid in probes), probes
    assert any(pid != opener for _v, pid in probes)  # other workers: their first call
    assert breaker.state == "open"
    assert breaker.stats["refused"] == 8


def test_half_open_lets_exactly_its_probes_through(pool8: ProcessExecutor, tmp_path: Path) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.5, half_open_max_calls=2)
    with pytest.raises(OSError), breaker:
        raise OSError("down")
    assert breaker.state == "open"
    time.sleep(0.6)
    assert breaker.state == "half_open"
    # The probes hold their call 3 s: the other four all ask while both probes are out.
    flow = split([Probe(i, breaker, str(tmp_path), hold=3.0) for i in range(6)], pool8)
    with SharedStore() as store, starter(tmp_path, 6):
        flow.orchestrate(store=store)
        rows = [store[f"probe{i}"] for i in range(6)]
    verdicts = sorted(verdict for verdict, _pid in rows)
    assert verdicts == ["passed"] * 2 + ["refused"] * 4
    assert len({pid for _v, pid in rows}) >= 2  # the probes asked from several processes
    assert breaker.state == "closed"  # a probe succeeded


class KilledHoldingTheLock(Task[S]):
    """Takes the limiter's lock, says so, and is SIGKILLed while holding it."""

    config = NO_RETRY

    def __init__(self, limiter: RateLimiter, marker: str) -> None:
        self.limiter, self.marker = limiter, marker

    def run(self, store: SharedStore) -> S:
        self.limiter.cell.lock()
        Path(self.marker).write_text(str(os.getpid()))
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
        return S.DONE  # pragma: no cover


class Taker(Task[S]):
    config = NO_RETRY

    def __init__(self, tag: int, limiter: RateLimiter, marker: str) -> None:
        self.tag, self.limiter, self.marker = tag, limiter, marker

    def run(self, store: SharedStore) -> S:
        deadline = time.monotonic() + 30
        while not os.path.exists(self.marker) and time.monotonic() < deadline:
            time.sleep(0.005)
        started = time.monotonic()
        ok = all(self.limiter.acquire(timeout=20) for _ in range(5))
        store[f"taker{self.tag}"] = (ok, time.monotonic() - started)
        return S.DONE


def test_a_worker_killed_holding_the_lock_stops_nobody(
    pool8: ProcessExecutor, tmp_path: Path
) -> None:
    limiter = RateLimiter(rate=1000, burst=100)
    marker = str(tmp_path / "locked")
    branches: list[Task[S]] = [KilledHoldingTheLock(limiter, marker)]
    branches += [Taker(i, limiter, marker) for i in range(3)]
    started = time.monotonic()
    with SharedStore() as store:
        split(branches, pool8, need=3).orchestrate(store=store)
        takers = [store[f"taker{i}"] for i in range(3)]
    assert all(ok for ok, _t in takers), takers
    assert max(t for _ok, t in takers) >= 0.2  # they were blocked by the lock...
    assert time.monotonic() - started < 30  # ...and freed when its holder died
    assert limiter.acquire(timeout=5)  # the driver too


# -- the primitives, in one process ----------------------------------------------------------
def test_a_bucket_starts_full_then_refills_at_its_rate() -> None:
    rl = RateLimiter(rate=10, burst=3)
    assert [rl.try_acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.try_acquire()
    assert 0.0 < wait <= 0.1 + 1e-6
    assert rl.acquire(timeout=1.0)
    assert not rl.acquire(3, timeout=0.01)
    assert rl.stats["admitted"] == 4 and rl.stats["timed_out"] == 1


def test_burst_defaults_to_the_rate_and_bounds_n() -> None:
    assert RateLimiter(rate=5).burst == 5
    with pytest.raises(ConfigError, match="burst is 5"):
        RateLimiter(rate=5).acquire(6)
    for bad in (dict(rate=0), dict(rate=float("nan")), dict(rate=1, burst=0), dict(rate=1, per=-1)):
        with pytest.raises(ConfigError):
            RateLimiter(**bad)  # type: ignore[arg-type]


def test_a_window_admits_its_limit_then_waits_for_the_next() -> None:
    wl = WindowedRateLimiter(limit=3, window=0.2)
    took = sum(wl.acquire(timeout=0) for _ in range(10))
    assert took == 3 or took == 6  # 6 only if a window boundary fell inside the loop
    assert wl.acquire(timeout=1.0)


def test_multi_tier_takes_from_every_tier_or_none() -> None:
    fast = RateLimiter(rate=1000, burst=10)
    window = WindowedRateLimiter(limit=2, window=30.0)
    both = MultiRateLimiter([fast, window])
    assert both.try_acquire() == 0.0 and both.try_acquire() == 0.0
    assert both.try_acquire() > 0  # the window says no...
    assert fast.stats["admitted"] == 2  # ...so nothing was taken from the bucket
    with pytest.raises(ConfigError):
        both.acquire(3)


def test_same_name_is_one_breaker_and_other_settings_are_refused() -> None:
    a = CircuitBreaker(failure_threshold=1, name="svc-test-same")
    b = pickle.loads(pickle.dumps(a))
    with pytest.raises(ValueError), a:
        raise ValueError
    assert b.state == "open"
    with pytest.raises(CircuitOpen) as info:
        CircuitBreaker(failure_threshold=1, name="svc-test-same").allow()
    assert info.value.breaker == "svc-test-same" and info.value.retry_after > 0
    with pytest.raises(ConfigError, match="other settings"):
        CircuitBreaker(failure_threshold=2, name="svc-test-same").allow()
    a.reset()
    assert b.state == "closed"


def test_a_new_shared_cell_is_never_seen_before_it_is_whole(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Eight workers that first use one limiter at the same moment all make its cell: one
    that was descheduled between creating the file and sizing it made the others see a
    0-byte cell and fail with StoreError (seen on a loaded CI run)."""
    from cano_mp._resilience import shared

    path = str(tmp_path / "cell")
    real = os.posix_fallocate
    other: list[int] = []

    def slow_maker(fd: int, offset: int, length: int) -> None:
        if not other:  # the maker is descheduled here; another process opens the cell
            other.append(-1)
            other[0] = shared._open_cell(path)
        real(fd, offset, length)

    monkeypatch.setattr(shared.os, "posix_fallocate", slow_maker)
    mine = shared._open_cell(path)
    try:
        a, b = os.fstat(mine), os.fstat(other[0])
        assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)  # one cell, both whole
        assert a.st_size == shared.CELL_BYTES
        assert os.listdir(tmp_path) == ["cell"]  # no half-made file left behind
    finally:
        os.close(mine)
        if other and other[0] >= 0:
            os.close(other[0])
