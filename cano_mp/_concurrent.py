"""``ConcurrentWorkflow``: many instances of one workflow at once, each with its own store.

Each instance is one run of the workflow (``Run``), driven by a thread of a small driver
pool of ``max_concurrency`` threads; its pool calls go to the workflow's executor like any
run's. The coordinating thread (the caller's) waits for the instances and applies the
:class:`WaitStrategy`: when it is satisfied, instances still running are cancelled (their
in-flight calls get the cooperative flag, then are killed after ``cancel_grace``; their
uncommitted writes are discarded) and instances not yet started never start.
"""

from __future__ import annotations

import html
import threading
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from ._durations import limit
from ._engine import Frozen, Run, RunCancelled, describe
from ._errors import ConfigError, Terminated
from ._progress import progress_bar
from ._public import public
from ._store import SharedStore

if TYPE_CHECKING:
    from ._workflow import Workflow

__all__ = ["ConcurrentResult", "ConcurrentWorkflow", "InstanceResult", "WaitStrategy"]

S = TypeVar("S", bound=Hashable)
Status = Literal["completed", "failed", "cancelled"]


@dataclass(frozen=True, slots=True)
class WaitStrategy:
    """When ``ConcurrentWorkflow.execute`` returns. Build with the class methods::

    WaitStrategy.forever()                    # every instance has finished
    WaitStrategy.quota(10)                    # 10 have finished (completed or failed)
    WaitStrategy.duration(60.0)               # 60 s have passed
    WaitStrategy.quota_or_duration(10, 60.0)  # whichever comes first

    What has not finished when the strategy is met is cancelled.
    """

    kind: Literal["forever", "quota", "duration", "quota_or_duration"]
    n: int | None = None
    seconds: float | None = None

    @classmethod
    def forever(cls) -> WaitStrategy:
        """Wait for every instance."""
        return cls("forever")

    @classmethod
    def quota(cls, n: int) -> WaitStrategy:
        """Return once ``n`` instances have finished; cancel the rest."""
        return cls("quota", _count(n))

    @classmethod
    def duration(cls, seconds: float | timedelta) -> WaitStrategy:
        """Return after ``seconds``; cancel what still runs. ``math.inf``: ``forever()``."""
        wait = _wait_seconds(seconds)
        return cls("forever") if wait is None else cls("duration", None, wait)

    @classmethod
    def quota_or_duration(cls, n: int, seconds: float | timedelta) -> WaitStrategy:
        """Return at ``n`` finished instances or after ``seconds``, whichever is first.

        ``math.inf`` seconds: ``quota(n)``.
        """
        count, wait = _count(n), _wait_seconds(seconds)
        return cls("quota", count) if wait is None else cls("quota_or_duration", count, wait)

    def __repr__(self) -> str:
        args = ", ".join(str(a) for a in (self.n, self.seconds) if a is not None)
        return f"WaitStrategy.{self.kind}({args})"


def _count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"the quota must be an int >= 1, got {n!r}")
    return n


def _wait_seconds(value: float | timedelta) -> float | None:
    """The duration of a wait strategy; ``None`` for ``math.inf`` (no limit)."""
    if value is None:
        raise ConfigError("the duration must be a number of seconds or a timedelta, got None")
    return limit(value, "the duration")


@dataclass(eq=False)
class InstanceResult(Generic[S]):
    """How one instance ended.

    Attributes:
        index: its position in ``stores`` (or in ``range(n)``).
        status: ``"completed"`` (reached an exit state), ``"failed"`` (raised) or
            ``"cancelled"`` (stopped by the wait strategy or never started).
        final_state: the exit state reached, else ``None``.
        error: what ``orchestrate()`` would have raised (``None`` unless failed).
        store: the instance's store (see ``ConcurrentWorkflow.execute`` on who closes it).
        duration: seconds from its start to its end (0 if it never started).
    """

    index: int
    status: Status
    final_state: S | None
    error: BaseException | None
    store: SharedStore
    duration: float

    def __repr__(self) -> str:
        detail = (
            describe(self.final_state)
            if self.status == "completed"
            else f"{type(self.error).__name__}: {self.error}"
            if self.error is not None
            else ""
        )
        return (
            f"InstanceResult(#{self.index} {self.status}"
            + (f" {detail}" if detail else "")
            + f", {self.duration:.3f}s)"
        )


@dataclass(eq=False)
class ConcurrentResult(Generic[S]):
    """What ``ConcurrentWorkflow.execute`` returns: one :class:`InstanceResult` per
    instance, in instance order, and the counts.

    The stores it made for ``stores=n`` are closed by :meth:`close` (or the ``with`` block),
    or when the result is garbage-collected.
    """

    results: list[InstanceResult[S]]
    duration: float
    _owned: list[SharedStore] = field(default_factory=list, repr=False)

    @property
    def completed(self) -> int:
        """Instances that reached an exit state."""
        return sum(1 for r in self.results if r.status == "completed")

    @property
    def failed(self) -> int:
        """Instances that raised."""
        return sum(1 for r in self.results if r.status == "failed")

    @property
    def cancelled(self) -> int:
        """Instances stopped by the wait strategy, or never started."""
        return sum(1 for r in self.results if r.status == "cancelled")

    def close(self) -> None:
        """Close the stores ``execute`` created (``stores=n``); the caller's stay open."""
        for store in self._owned:
            store.close()

    def __enter__(self) -> ConcurrentResult[S]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ConcurrentResult({self.completed} completed, {self.failed} failed, "
            f"{self.cancelled} cancelled, of {len(self.results)}, in {self.duration:.3f}s)"
        )

    def _repr_html_(self) -> str:
        rows = []
        for r in self.results:
            if r.status == "completed":
                detail = describe(r.final_state)
            elif r.error is not None:
                detail = f"{type(r.error).__name__}: {r.error}"
            else:
                detail = ""
            rows.append(
                f"<tr><td>{r.index}</td><td>{html.escape(r.status)}</td><td>{html.escape(detail)}</td>"
                f"<td>{r.duration:.3f}</td></tr>"
            )
        return (
            f"<table><caption>{html.escape(repr(self))}</caption><tr><th>instance</th>"
            f"<th>status</th><th>final state / error</th><th>seconds</th></tr>"
            + "".join(rows)
            + "</table>"
        )


class ConcurrentWorkflow(Generic[S]):
    """Run many instances of ``workflow`` at once, each on its own store::

        batch = ConcurrentWorkflow(flow, max_concurrency=8)
        result = batch.execute(stores=100, wait=WaitStrategy.forever())
        print(result)                      # ConcurrentResult(100 completed, ...)

    Args:
        workflow: the workflow to run; its executor, timeout (per instance), observers and
            ``max_parallel`` (pool slots across all its instances) apply.
        max_concurrency: most instances in flight at once (default: all of them; set it
            for large counts, each instance in flight has a driver thread).
        progress: a progress bar of finished instances: ``True``/``False`` forces it,
            ``None`` shows it when stderr is a terminal or in Jupyter.
    """

    def __init__(
        self,
        workflow: Workflow[S],
        *,
        max_concurrency: int | None = None,
        progress: bool | None = None,
    ) -> None:
        from ._workflow import Workflow

        if not isinstance(workflow, Workflow):
            raise ConfigError(f"workflow must be a Workflow, got {workflow!r}")
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool)
            or not isinstance(max_concurrency, int)
            or max_concurrency < 1
        ):
            raise ConfigError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
        self.workflow = workflow
        self.max_concurrency = max_concurrency
        self.progress = progress

    def __repr__(self) -> str:
        return f"ConcurrentWorkflow({self.workflow!r}, max_concurrency={self.max_concurrency})"

    def execute(
        self,
        stores: int | Sequence[SharedStore],
        initial_state: S | None = None,
        *,
        wait: WaitStrategy | None = None,
    ) -> ConcurrentResult[S]:
        """Run one instance per store and return how each ended (never raises for an
        instance's failure: see ``InstanceResult.error``).

        ``stores=n`` makes ``n`` fresh stores: they stay open in the results and are
        closed by ``ConcurrentResult.close()`` or when the result is garbage-collected.
        Stores passed in are the caller's: never closed here. Ctrl-C cancels every
        instance's work at once and re-raises ``KeyboardInterrupt``.
        """
        job = self._prepare(stores, initial_state, wait)
        return job.run()

    async def execute_async(
        self,
        stores: int | Sequence[SharedStore],
        initial_state: S | None = None,
        *,
        wait: WaitStrategy | None = None,
    ) -> ConcurrentResult[S]:
        """``execute()`` for asyncio (in a thread); cancelling the awaiting task cancels
        every instance."""
        import asyncio

        job = self._prepare(stores, initial_state, wait)
        fut = asyncio.get_running_loop().run_in_executor(None, job.run)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            job.cancel()
            await asyncio.wait([fut])
            raise

    def _prepare(
        self,
        stores: int | Sequence[SharedStore],
        initial_state: S | None,
        wait: WaitStrategy | None,
    ) -> _Execution[S]:
        wait = WaitStrategy.forever() if wait is None else wait
        if not isinstance(wait, WaitStrategy):
            raise ConfigError(f"wait must be a WaitStrategy, got {wait!r}")
        owned: list[SharedStore] = []
        if isinstance(stores, int) and not isinstance(stores, bool):
            if stores < 0:
                raise ConfigError(f"stores must be >= 0 or a sequence of stores, got {stores}")
            owned = [SharedStore() for _ in range(stores)]
            chosen: list[SharedStore] = owned
        elif isinstance(stores, Sequence) and not isinstance(stores, str | bytes):
            chosen = list(stores)
            for s in chosen:
                if not isinstance(s, SharedStore):
                    raise ConfigError(f"stores must hold SharedStore objects, got {s!r}")
            if len({id(s) for s in chosen}) != len(chosen):
                raise ConfigError("stores: each instance needs its own store (a store repeats)")
        else:
            raise ConfigError(f"stores must be an int or a sequence of SharedStore, got {stores!r}")
        initial = self.workflow.initial_state(initial_state)
        frozen = self.workflow.freeze()  # validated now, in the caller's thread
        return _Execution(self, chosen, owned, initial, wait, frozen)


@dataclass(eq=False)
class _Instance:
    index: int
    store: SharedStore
    run: Run | None = None
    status: Status = "cancelled"
    final_state: Any = None
    error: BaseException | None = None
    started: float = 0.0
    ended: float = 0.0


class _Execution(Generic[S]):
    """One ``execute`` call: driver threads, the wait strategy, cancellation."""

    def __init__(
        self,
        owner: ConcurrentWorkflow[S],
        stores: list[SharedStore],
        owned: list[SharedStore],
        initial: Any,
        wait: WaitStrategy,
        frozen: Frozen,
    ) -> None:
        self.owner = owner
        self.workflow = owner.workflow
        self.frozen = frozen  # every instance runs the tasks as they were at execute()
        self.instances = [_Instance(i, s) for i, s in enumerate(stores)]
        self.owned = owned
        self.initial = initial
        self.wait = wait
        self.pending: deque[_Instance] = deque(self.instances)
        self.lock = threading.Condition()
        self.finished = 0  # completed or failed
        self.done = 0  # every instance that ended, cancelled ones included
        self.stopping = False
        self.cancel_grace: float | None = None

    def cancel(self, grace: float | None = None) -> None:
        """Stop: no new instance starts; running ones are cancelled."""
        with self.lock:
            self.stopping = True
            self.cancel_grace = grace
            running = [i.run for i in self.instances if i.run is not None and not i.ended]
            self.lock.notify_all()
        for run in running:
            run.cancel(grace)

    def _drive(self) -> None:
        """A driver thread: run instances until none is left or we are stopping."""
        while True:
            with self.lock:
                if self.stopping or not self.pending:
                    return
                inst = self.pending.popleft()
                inst.run = self.workflow.start_run(inst.store, self.initial, frozen=self.frozen)
                inst.started = time.monotonic()
            try:
                inst.final_state = inst.run.run()
                inst.status = "completed"
            except RunCancelled:
                inst.status = "cancelled"
            except BaseException as exc:
                inst.status = "failed"
                inst.error = exc
            with self.lock:
                inst.ended = time.monotonic()
                self.done += 1
                if inst.status != "cancelled":
                    self.finished += 1
                self.lock.notify_all()

    def _satisfied(self) -> bool:
        w = self.wait
        if self.done == len(self.instances):
            return True
        if w.kind in ("quota", "quota_or_duration") and w.n is not None:
            return self.finished >= min(w.n, len(self.instances))
        return False

    def run(self) -> ConcurrentResult[S]:
        t0 = time.monotonic()
        n = len(self.instances)
        width = min(n, self.owner.max_concurrency or n)
        deadline = t0 + self.wait.seconds if self.wait.seconds is not None else None
        bar = progress_bar(self.owner.progress, n, self.workflow.name, "instance") if n else None
        threads = [
            threading.Thread(target=self._drive, name=f"cano_mp-instance-{k}", daemon=True)
            for k in range(width)
        ]
        for t in threads:
            t.start()
        shown = 0
        try:
            with self.lock:
                while not self._satisfied():
                    timeout = None if deadline is None else deadline - time.monotonic()
                    if timeout is not None and timeout <= 0:
                        break
                    self.lock.wait(timeout)
                    if bar is not None and self.done > shown:
                        bar.update(self.done - shown)
                        shown = self.done
        except BaseException as exc:
            self.cancel(0.0 if isinstance(exc, (KeyboardInterrupt, Terminated)) else None)
            for t in threads:
                t.join()
            if bar is not None:
                bar.close()
            raise
        self.cancel()
        for t in threads:
            t.join()
        if bar is not None:
            bar.close()
        results: list[InstanceResult[S]] = [
            InstanceResult(
                i.index,
                i.status,
                i.final_state,
                i.error,
                i.store,
                (i.ended - i.started) if i.started else 0.0,
            )
            for i in self.instances
        ]
        return ConcurrentResult(results, time.monotonic() - t0, self.owned)


public(WaitStrategy, InstanceResult, ConcurrentResult, ConcurrentWorkflow)
