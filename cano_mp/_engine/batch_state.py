"""BatchState: the driver side of one ``BatchTask`` state.

::

    load(store) --items, pulled lazily--> chunks --pool--> results --> finish(store, results)

Items are grouped into *chunks*, one call each, at most ``in_flight`` chunks at once (two
per worker, or ``max_parallel``), so a generator is pulled only as fast as the pool works
and memory stays bounded. Chunk sizes adapt to the measured time per item
(:class:`~.chunks.ChunkSizer`) unless ``chunk_size`` is set.

Failures are per item: an item that raises, overruns its timeout or kills its worker spends
one attempt (``attempts.retry_or_fail``) and is retried alone after its delay; the other
items of its chunk are not charged (a chunk cut short by a timeout or a crash is sent again
without that item). The pool reports which item a chunk works on through shared memory
(the executor's ``progress``): that is how one item of a chunk times out, and how a dead
worker's item is found.

Each pass of :meth:`BatchState.drive` is: collect finished chunks, expire overdue items,
start chunks while there is room, sleep until a chunk finishes or the nearest deadline.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence, Sized
from concurrent.futures import Future
from typing import Any

import cloudpickle

from .._batch import BatchTask, ItemFailure, batch_problems
from .._calls import block_of, run_batch_chunk
from .._context import NO_RESOURCES, TaskContext, _set_context
from .._errors import ConfigError, TaskError
from .._executors import Executor
from .._log import get_logger
from .._progress import progress_bar
from .._store import Snapshot, TaskStore
from .._store.results import RESULTS_TAG
from .._store.results import drop as drop_results
from .._store.results import unpack as unpack_results
from .._wire import AHEAD_MAX_BYTES, Call, ChunkOutcome, ItemFailed, WorkerDied, decode_error
from .attempts import Failed, Subject, check_transition, crash_error, retry_or_fail, submit
from .attempts import timeout_error as make_timeout_error
from .chunks import Chunk, ChunkSizer, Items, split_at
from .gates import rate_wait, record, refused_items
from .plan import StateEntry, describe
from .scope import RunScope
from .task_state import _INLINE

__all__ = ["BatchState"]

log = get_logger("cano_mp.batch")

# Item failures logged at WARNING before the rest go to DEBUG.
WARN_FAILURES = 10

# Makes the error of an item stopped inside a chunk (timeout, crash): (index, attempt).
ErrorMaker = Callable[[int, int], BaseException]


class BatchState:
    """Runs one BatchTask state; :meth:`run` returns the next state (or raises, as a task
    would)."""

    def __init__(self, scope: RunScope, entry: StateEntry, snap: Snapshot) -> None:
        ref = entry.units[0]
        self.scope, self.entry, self.snap, self.ref = scope, entry, snap, ref
        self.unit: BatchTask[Any, Any, Any] = ref.unit
        self.name, self.state, self.cfg = ref.name, entry.state, ref.config
        problems = batch_problems(self.unit)
        if problems:  # set after registration (validate() checks them too)
            raise ConfigError("; ".join(problems))
        self.inline = self.cfg.inline or not scope.remote
        self.executor: Executor = _INLINE if self.inline else scope.executor
        caps = scope.caps
        workers = 1 if self.inline else self.executor.max_workers
        self.in_flight = 1 if self.inline else workers * caps.in_flight_per_worker
        cap = self.unit.max_parallel
        if cap is not None:
            self.in_flight, workers = min(self.in_flight, cap), min(workers, cap)
        self.workers = workers
        self.progress_of = None if self.inline else scope.progress
        self.token = scope.new_token()
        self.view = TaskStore(snap.data(), self.token)  # load() and finish() see one view
        self.ctx = TaskContext(
            scope.run_id,
            self.state,
            1,
            None,
            scope.is_cancelled,
            resources=ref.spec.resources or NO_RESOURCES,
        )
        self.b = Items()
        self.seq = itertools.count()
        self.source: Any = None
        self.items: Iterator[Any] | None = None
        self.sliceable = False
        self.sizer = ChunkSizer(self.unit.chunk_size, workers, None, self.in_flight)
        self.bar: Any = None
        self.gated = self.cfg.rate_limit is not None or self.cfg.circuit_breaker is not None
        # A chunk takes one token per item, all at once: never more than the burst.
        lim = self.cfg.rate_limit
        self.max_chunk = int(lim.capacity) if lim is not None else None
        self.rate_at: float | None = None
        self.rate_told = False

    # -- the state -------------------------------------------------------------------------
    def run(self) -> Any:
        scope, started = self.scope, time.monotonic()
        obs, error = scope.observers, None
        if obs:
            obs.emit("on_task_start", scope.info, self.state, self.name, 1)
        try:
            self.load()
            self.drive()
            return self.finish()
        except BaseException as exc:
            error = exc
            self.stop(scope.stop_grace(exc))
            raise
        finally:
            self.close()
            if obs:
                obs.emit(
                    "on_task_end",
                    scope.info,
                    self.state,
                    self.name,
                    1,
                    error=error,
                    duration=time.monotonic() - started,
                )

    def fail_whole(self, what: str, exc: BaseException) -> TaskError:
        err = TaskError(
            f"{what} of batch task {self.name!r} of state {describe(self.state)} failed: "
            f"{type(exc).__name__}: {exc}",
            state=self.state,
            task_name=self.name,
            attempts=1,
        )
        err.__cause__ = exc
        return err

    def load(self) -> None:
        previous = _set_context(self.ctx)
        try:
            self.source = self.unit.load(self.view)
            self.items = iter(self.source)
            total = len(self.source) if isinstance(self.source, Sized) else None
        except Exception as exc:
            raise self.fail_whole("load()", exc) from exc
        finally:
            _set_context(previous)
        self.sliceable = type(self.source) in (list, tuple, range)
        caps = self.scope.caps
        self.sizer = ChunkSizer(
            self.unit.chunk_size,
            self.workers,
            total,
            self.in_flight,
            caps.chunk_seconds,
            caps.eager_chunks,
        )
        self.bar = progress_bar(
            self.unit.progress, total, f"{describe(self.state)} {self.name}", "item"
        )

    def drive(self) -> None:
        """Until every item has a result or a failure (or one failure is fatal)."""
        scope, b = self.scope, self.b
        while True:
            scope.wake.clear()
            self.collect()
            now = time.monotonic()
            self.expire(now)
            if b.fatal is not None:
                raise b.fatal
            if b.finished:
                break
            scope.check_stop(self.state, now)
            self.start(now)
            if b.done or b.fatal is not None or b.finished:
                continue
            wake_at = [c.check_at for c in b.running if c.check_at is not None]
            if b.retries:
                wake_at.append(b.retries[0][0])
            if self.rate_at is not None:
                wake_at.append(self.rate_at)
            scope.wait_until(wake_at)
        assert b.outstanding == 0, b.outstanding

    def finish(self) -> Any:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        previous = _set_context(self.ctx)
        try:
            nxt = self.unit.finish(self.view, self.b.results)
        except Exception as exc:
            raise self.fail_whole("finish()", exc) from exc
        finally:
            _set_context(previous)
        self.b.results = []
        check_transition(self.scope, self.ref, nxt, kind="batch task")
        self.scope.store._commit(self.view._finish(True))
        return nxt

    def stop(self, grace: float) -> None:
        for ch in self.b.running:
            if ch.future is not None:
                self.executor.cancel(ch.future, grace)
                ch.future.add_done_callback(_drop_outcome)  # results nobody will take
        for ch in self.b.stopping:
            if ch.future is not None:
                ch.future.add_done_callback(_drop_outcome)
        self.b.running.clear()
        self.view._finish(False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if not self.inline:  # results of chunks whose worker died while sending them
            self.scope.store._discard(self.token + RESULTS_TAG)
        close = getattr(self.items, "close", None)  # a generator: run its finally blocks
        if close is not None:
            try:
                close()
            except Exception:
                log.debug("closing the items of %r failed", self.name, exc_info=True)

    # -- starting chunks ---------------------------------------------------------------------
    def start(self, now: float) -> None:
        """Send chunks (requeued, due retries, then new items) while there is room."""
        b, self.rate_at = self.b, None
        while len(b.running) + len(b.stopping) < self.in_flight and b.fatal is None:
            ch: Chunk | None = None
            if b.requeued:
                ch = b.requeued[0]
            elif b.retries and b.retries[0][0] <= now:
                _, _, index, item, attempt = b.retries[0]
                ch = Chunk([index], [item], attempt)
            elif b.exhausted:
                return
            quota = self.scope.quota if not self.inline else None
            if quota is not None and not quota.try_acquire(self.scope.wake):
                return
            try:
                if ch is None:
                    ch = self.pull()  # only once a pool slot is ours
                    if ch is None:
                        if quota is not None:
                            quota.release()
                        return
                elif b.requeued and ch is b.requeued[0]:
                    b.requeued.popleft()
                else:
                    heapq.heappop(b.retries)
                if self.gated and (ch := self.gate(ch, now)) is None:
                    if quota is not None:
                        quota.release()
                    if self.rate_at is not None:
                        return
                    continue
                ch.quota = quota is not None
                self.submit(ch)
            except BaseException:
                if quota is not None and (ch is None or ch.quota):
                    quota.release()  # never handed to a future
                raise
            if b.done:  # inline: finished already; collect before pulling more
                return

    def pull(self) -> Chunk | None:
        assert self.items is not None
        b = self.b
        first = len(b.results)
        size = self.sizer.next()
        if self.max_chunk is not None:
            size = min(size, self.max_chunk)
        items: Sequence[Any]
        try:
            if self.sliceable:  # a slice: a memcpy for lists, three ints for a range
                items = self.source[first : first + size]
            else:
                items = list(itertools.islice(self.items, size))
        except Exception as exc:
            raise self.fail_whole(f"load() (after {first} items)", exc) from exc
        if len(items) < size:
            b.exhausted = True
        if not items:
            return None
        b.results.extend(itertools.repeat(None, len(items)))
        b.outstanding += len(items)
        return Chunk(range(first, first + len(items)), items, 1)

    def submit(self, ch: Chunk) -> None:
        """Send ``ch``; once its future exists, the future releases the quota slot."""
        scope, cfg = self.scope, self.cfg
        payload: Any = ch.items
        if not self.inline:
            try:
                payload = cloudpickle.dumps(ch.items)
            except Exception as exc:
                raise ConfigError(
                    f"items {ch.indices[0]}..{ch.indices[-1]} of batch task {self.name!r} "
                    f"cannot be sent to a worker process: {type(exc).__name__}: {exc}. "
                    "Make the items picklable (or send keys and keep the data in the "
                    "store), or set config=TaskConfig(inline=True)"
                ) from exc
            self.sizer.observe_bytes(len(ch.items), len(payload))
        first: Any = ch.indices.start if isinstance(ch.indices, range) else ch.indices
        index = 0 if self.inline else self.ref.index
        remote = not self.inline
        args = (index, payload, first, ch.attempt, cfg.timeout, scope.run_id, self.token, remote)
        ch.submitted = time.monotonic()
        ch.check_at = ch.submitted + cfg.timeout if cfg.timeout is not None else None
        wake, done = scope.wake, self.b.done

        def finished(_f: Future[Any]) -> None:
            done.append(ch)
            wake.set()

        if self.inline:
            # In the driver: the run's own cancellation is the chunk's cancel flag.
            fut: Future[Any] = Future()
            fut.set_result(
                run_batch_chunk(scope.is_cancelled, None, (self.ref.spec,), self.snap.data(), *args)
            )
            fut.add_done_callback(finished)
        else:
            # Short and small: it may wait in a busy worker's pipe (pre-feed).
            ahead = len(payload) <= AHEAD_MAX_BYTES
            call = Call(run_batch_chunk, (scope.units, self.snap.blob), args, ahead=ahead)
            holds_quota, ch.quota = ch.quota, False  # submit() releases it, or the future
            fut = submit(
                scope,
                self.executor,
                call,
                Subject(self.state, self.name, cfg),
                holds_quota=holds_quota,
                on_done=finished,
                hint="set config=TaskConfig(inline=True)",
            )
        self.b.running.add(ch)
        ch.future = fut

    def gate(self, ch: Chunk, now: float) -> Chunk | None:
        """Rate limit (one token per item) and breaker (per item) for ``ch``: what may go
        now, or None (waiting for tokens: ``rate_at`` is set; or every item refused)."""
        subject = Subject(self.state, self.name, self.cfg)
        wait = rate_wait(self.scope, subject, len(ch.items), self.rate_told)
        self.rate_told = wait > 0.0
        if wait > 0.0:
            self.b.requeued.appendleft(ch)  # first to go when the tokens are there
            self.rate_at = now + wait
            return None
        refused = refused_items(self.scope, self.subject, ch.indices)
        for k, err in refused.items():
            self.item_failed(ch.indices[k], ch.items[k], ch.attempt, err, None)
        if not refused:
            return ch
        keep = [k for k in range(len(ch.items)) if k not in refused]
        items, indices = [ch.items[k] for k in keep], [ch.indices[k] for k in keep]
        return Chunk(indices, items, ch.attempt) if keep else None

    # -- finished and overdue chunks ---------------------------------------------------------
    def collect(self) -> None:
        b = self.b
        while b.done:
            ch = b.done.popleft()
            if ch in b.stopping:  # a timed-out chunk has really stopped: its slot is free
                b.stopping.discard(ch)
                _drop_outcome(ch.future)
                continue
            if ch not in b.running:
                _drop_outcome(ch.future)
                continue
            b.running.discard(ch)
            fut = ch.future
            assert fut is not None
            ch.future = None  # no cycle chunk <-> future (its callbacks hold the chunk)
            try:
                out = fut.result()
            except WorkerDied as died:
                self.charge(ch, died.position, self.crashed(died))
                ch.items = []
                continue
            except Exception as exc:  # the call itself failed (the unit cannot load...)
                raise self.fail_whole("a chunk", exc) from exc
            self.settle(ch, out)
            ch.items = []

    def settle(self, ch: Chunk, out: ChunkOutcome) -> None:
        """Place a finished chunk's results; its failed items spend an attempt each."""
        b, scope = self.b, self.scope
        try:
            values, failures = out.packed if self.inline else unpack_results(out.packed)
        except Exception as exc:  # results that cannot be loaded here
            exc.add_note("(while loading the chunk's results in the driver)")
            for k in range(len(ch.items)):
                self.item_failed(ch.indices[k], ch.items[k], ch.attempt, exc, None)
            return
        if self.unit.chunk_size is None:
            self.sizer.observe(len(ch.items), out.timing.ended - out.timing.started)
        if scope.observers.wants("on_task_timing"):
            scope.observers.emit(
                "on_task_timing",
                scope.info,
                self.state,
                f"{self.name}[{ch.indices[0]}..{ch.indices[-1]}]",
                ch.attempt,
                pid=out.timing.pid,
                started=out.timing.started,
                ended=out.timing.ended,
            )
        n = len(values)
        failed_positions = {f.position for f in failures}
        if isinstance(ch.indices, range) and not failed_positions and n == len(ch.items):
            b.results[ch.indices.start : ch.indices.stop] = values
        else:
            for k in range(n):
                if k not in failed_positions:
                    b.results[ch.indices[k]] = values[k]
        finished = n - len(failed_positions)
        if finished:
            record(self.cfg.circuit_breaker, None, finished)
        b.outstanding -= finished
        if self.bar is not None and finished:
            self.bar.update(finished)
        for failed in failures:
            self.item_error(ch, failed)
        if n < len(ch.items):  # stopped early (cancelled): send the rest again
            b.requeued.append(Chunk(ch.indices[n:], ch.items[n:], ch.attempt))

    def item_error(self, ch: Chunk, failed: ItemFailed) -> None:
        index, item = ch.indices[failed.position], ch.items[failed.position]
        if failed.kind == "timeout" or failed.failure is None:
            self.item_failed(index, item, ch.attempt, self.timed_out(index, ch.attempt), None)
            return
        tb = failed.failure.traceback
        self.item_failed(index, item, ch.attempt, decode_error(failed.failure), tb)

    def expire(self, now: float) -> None:
        """Stop chunks whose running item overran its timeout."""
        timeout = self.cfg.timeout
        if timeout is None:
            return
        b = self.b
        for ch in list(b.running):
            if ch.check_at is None or now < ch.check_at:
                continue
            fut = ch.future
            assert fut is not None
            if fut.done():
                continue
            if self.progress_of is None:
                # The executor cannot say which item runs: time the chunk as a whole.
                if now < ch.submitted + timeout * len(ch.items):
                    ch.check_at = ch.submitted + timeout * len(ch.items)
                    continue
                position = None
            else:
                where = self.progress_of(fut)
                if where is None:  # not started yet
                    ch.check_at = now + timeout
                    continue
                position, item_started = where
                if now < item_started + timeout:
                    ch.check_at = item_started + timeout
                    continue
            b.running.discard(ch)
            b.stopping.add(ch)  # holds its pool slot until it has stopped
            self.executor.cancel(fut, self.scope.cancel_grace)
            self.charge(ch, position, self.timed_out)
            ch.items = []

    # -- failures ------------------------------------------------------------------------------
    def subject(self, index: int) -> Subject:
        return Subject(self.state, self.name, self.cfg, index)

    def timed_out(self, index: int, attempt: int) -> BaseException:
        return make_timeout_error(self.subject(index), attempt)

    def crashed(self, died: WorkerDied) -> ErrorMaker:
        def make(index: int, attempt: int) -> BaseException:
            return crash_error(self.subject(index), attempt, died)

        return make

    def charge(self, ch: Chunk, position: int | None, make: ErrorMaker) -> None:
        """A chunk stopped at ``position`` (timeout, crash): that item spends an attempt;
        the others go again unchanged (see :func:`.chunks.split_at`)."""
        again, culprit = split_at(
            ch, block_of(position) if position is not None else None, position
        )
        self.b.requeued.extend(again)
        if culprit is not None:
            index = ch.indices[culprit]
            self.item_failed(index, ch.items[culprit], ch.attempt, make(index, ch.attempt), None)

    def item_failed(
        self, index: int, item: Any, attempt: int, exc: BaseException, tb: str | None
    ) -> None:
        b = self.b
        record(self.cfg.circuit_breaker, exc)
        level = logging.WARNING if b.failures_logged < WARN_FAILURES else logging.DEBUG
        decision = retry_or_fail(self.scope, self.subject(index), attempt, exc, tb, level=level)
        if not isinstance(decision, Failed):
            b.failures_logged += 1
            if b.failures_logged == WARN_FAILURES:
                log.warning(
                    "%s run %s: further item failures of batch task %r are logged at DEBUG",
                    self.scope.plan.name,
                    self.scope.run_id,
                    self.name,
                    extra=self.scope.log_extra(self.state, self.name),
                )
            heapq.heappush(b.retries, (decision.at, next(self.seq), index, item, attempt + 1))
            return
        b.outstanding -= 1
        if self.bar is not None:
            self.bar.update(1)
        if self.unit.on_error == "collect":
            b.results[index] = ItemFailure(index, decision.cause, attempt)
        elif b.fatal is None:
            b.fatal = decision.error


def _drop_outcome(fut: Future[Any] | None) -> None:
    """Remove the shared-memory results of a chunk nobody will settle (stopped, cancelled)."""
    if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
        out = fut.result()
        if isinstance(out, ChunkOutcome):
            drop_results(out.packed)
