"""The driver side of a ``BatchTask`` state.

::

    load(store) --items, pulled lazily--> chunks --pool--> results --> finish(store, results)

Items are grouped into *chunks*, one call each, at most ``in_flight`` chunks at once (two
per worker, or ``max_parallel``), so a generator is pulled only as fast as the pool works
and memory stays bounded. Chunk sizes adapt to the measured time per item (as joblib's
auto batching does) unless ``chunk_size`` is set.

Failures are per item: an item that raises, overruns its timeout or kills its worker
spends one attempt and is retried alone after its delay; the other items of its chunk are
not charged (a chunk cut short by a timeout or a crash is sent again without that item).
The pool reports which item a chunk works on through shared memory
(``ProcessExecutor.progress``); that is how one item of a chunk times out, and how a dead
worker's item is found.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterator, Sequence, Sized
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cloudpickle

from ._batch import BatchTask, ItemFailure, batch_problems, run_batch_chunk
from ._context import TaskContext, _set_context
from ._errors import CanoError, ConfigError, TaskError, TaskTimeout, WorkerCrashed
from ._executors import Call, Executor, WorkerDied, capabilities, progress_reader
from ._log import get_logger
from ._progress import progress_bar
from ._store import Snapshot, TaskStore
from ._wire import ItemFailed, decode_error

if TYPE_CHECKING:
    from ._engine import Run, StateEntry

__all__ = ["ChunkSizer", "run_batch_state"]

log = get_logger("cano_mp.batch")

# Auto chunking: aim for calls of about this many seconds of work. Long enough that the
# gap between two chunks on a worker (0.1-0.5 ms on a busy machine: the driver has to be
# scheduled to send the next) is noise; short enough that the last chunks balance.
TARGET_CHUNK_SECONDS = 0.1
MAX_CHUNK_ITEMS = 100_000
# Items in flight at once, all chunks together (auto chunking): bounds the driver's memory
# for a generator however many workers there are.
MAX_ITEMS_IN_FLIGHT = 500_000
# Bound on the pickled size of one chunk: large items belong in the store (send keys).
MAX_CHUNK_BYTES = 8 << 20
# With a known item count, at least this many chunks per worker (load balance).
MIN_CHUNKS_PER_WORKER = 4
# Item failures logged at WARNING before the rest go to DEBUG.
WARN_FAILURES = 10


class ChunkSizer:
    """Chooses chunk sizes: fixed, or from the measured time and size per item."""

    def __init__(
        self,
        fixed: int | None,
        workers: int,
        total: int | None,
        in_flight: int = 1,
        target: float = TARGET_CHUNK_SECONDS,
        eager: bool = False,
    ) -> None:
        self.fixed = fixed
        self.target = target
        self.size = 1
        self.per_item: float | None = None
        self._seconds = 0.0
        self._items = 0.0
        self.bytes_per_item: float | None = None
        self.cap = max(1, min(MAX_CHUNK_ITEMS, MAX_ITEMS_IN_FLIGHT // max(1, in_flight)))
        if total is not None:
            self.cap = max(1, min(self.cap, math.ceil(total / (workers * MIN_CHUNKS_PER_WORKER))))
            if eager:  # a high-latency executor: start balanced, not from one item
                self.size = self.cap

    def next(self) -> int:
        if self.fixed is not None:
            return self.fixed
        size = min(self.size, self.cap)
        if self.bytes_per_item:
            size = min(size, int(MAX_CHUNK_BYTES / self.bytes_per_item))
        return max(1, size)

    def observe(self, items: int, seconds: float) -> None:
        if items <= 0 or seconds <= 0:
            return
        # Seconds per item over recent chunks, weighted by their items (halved per chunk):
        # a big chunk outweighs the fixed cost that dominates a chunk of one item.
        self._seconds = self._seconds / 2 + seconds
        self._items = self._items / 2 + items
        self.per_item = self._seconds / self._items
        self.size = max(1, min(MAX_CHUNK_ITEMS, int(self.target / self.per_item)))

    def observe_bytes(self, items: int, nbytes: int) -> None:
        if items > 0:
            b = nbytes / items
            prev = self.bytes_per_item
            self.bytes_per_item = b if prev is None else (prev + b) / 2


@dataclass(eq=False, slots=True)
class _Chunk:
    indices: range | list[int]
    items: Sequence[Any]
    attempt: int
    future: Future[Any] | None = None
    submitted: float = 0.0
    check_at: float | None = None  # when to look at its items' timeouts next
    quota: bool = False


@dataclass(eq=False)
class _Batch:
    """Where the items of one batch are."""

    results: list[Any] = field(default_factory=list)
    running: set[_Chunk] = field(default_factory=set)
    stopping: set[_Chunk] = field(default_factory=set)  # timed out, not stopped yet
    done: deque[_Chunk] = field(default_factory=deque)
    requeued: deque[_Chunk] = field(default_factory=deque)
    retries: list[tuple[float, int, int, Any, int]] = field(default_factory=list)
    outstanding: int = 0
    exhausted: bool = False
    fatal: BaseException | None = None
    failures_logged: int = 0


def run_batch_state(run: Run, entry: StateEntry, snap: Snapshot) -> Any:
    """Run one BatchTask state; return the next state (or raise, as a task would)."""
    ref = entry.units[0]
    unit: BatchTask[Any, Any, Any] = ref.unit
    name = ref.name
    state = entry.state
    cfg = ref.config
    problems = batch_problems(unit)
    if problems:  # set after registration (validate() checks them too)
        raise ConfigError("; ".join(problems))
    on_error = unit.on_error
    fixed = unit.chunk_size
    cap = unit.max_parallel

    from ._engine import (
        _INLINE,
        _describe,
        _tokens,
    )

    inline = cfg.inline or not run._remote
    executor: Executor = _INLINE if inline else run.executor
    remote = not inline
    caps = capabilities(executor)
    workers = 1 if inline else executor.max_workers
    in_flight = 1 if inline else workers * caps.in_flight_per_worker
    target = caps.chunk_seconds
    if cap is not None:
        in_flight = min(in_flight, cap)
        workers = min(workers, cap)
    progress_of = progress_reader(executor)

    token = f"t{run.run_id}{next(_tokens)}"
    view = TaskStore(snap.data(), token)  # load() and finish() see the same view
    obs = run.observers
    started = time.monotonic()
    if obs:
        obs.emit("on_task_start", run.info, state, name, 1)

    def fail_whole(what: str, exc: BaseException) -> TaskError:
        err = TaskError(
            f"{what} of batch task {name!r} of state {_describe(state)} failed: "
            f"{type(exc).__name__}: {exc}",
            state=state,
            task_name=name,
            attempts=1,
        )
        err.__cause__ = exc
        return err

    b = _Batch()
    source: Any = None
    it: Iterator[Any] | None = None
    bar = None
    error: BaseException | None = None
    ctx = TaskContext(run.run_id, state, 1, None, run._is_cancelled)
    try:
        previous = _set_context(ctx)
        try:
            source = unit.load(view)
            it = iter(source)
            total = len(source) if isinstance(source, Sized) else None
        except Exception as exc:
            raise fail_whole("load()", exc) from exc
        finally:
            _set_context(previous)
        sliceable = type(source) in (list, tuple, range)
        eager = caps.eager_chunks
        sizer = ChunkSizer(fixed, workers, total, in_flight, float(target), eager)
        bar = progress_bar(unit.progress, total, f"{_describe(state)} {name}", "item")
        call_seq = itertools.count()

        def item_error(index: int, attempt: int, failed: ItemFailed) -> BaseException:
            if failed.kind == "timeout" or failed.failure is None:
                return TaskTimeout(
                    f"item {index} of batch task {name!r} of state {_describe(state)} ran past "
                    f"its {cfg.timeout}s timeout (attempt {attempt})",
                    state=state,
                    task_name=name,
                    attempts=attempt,
                )
            return decode_error(failed.failure)

        def item_failed(index: int, item: Any, attempt: int, exc: BaseException, tb: Any) -> None:
            delay = cfg.retry.delay_for_attempt(attempt - 1)
            if delay is not None:
                if obs:
                    obs.emit("on_retry", run.info, state, f"{name}[{index}]", attempt, delay, exc)
                level = logging.WARNING if b.failures_logged < WARN_FAILURES else logging.DEBUG
                b.failures_logged += 1
                log.log(
                    level,
                    "%s run %s: item %d of batch task %r failed (attempt %d: %s: %s); "
                    "retrying in %.3fs%s",
                    run.plan.name,
                    run.run_id,
                    index,
                    name,
                    attempt,
                    type(exc).__name__,
                    exc,
                    delay,
                    " (further item failures are logged at DEBUG)"
                    if b.failures_logged == WARN_FAILURES
                    else "",
                    extra={
                        "run_id": run.run_id,
                        "workflow": run.plan.name,
                        "state": state,
                        "task": name,
                        "attempt": attempt,
                    },
                )
                heapq.heappush(
                    b.retries, (time.monotonic() + delay, next(call_seq), index, item, attempt + 1)
                )
                return
            b.outstanding -= 1
            if bar is not None:
                bar.update(1)
            if on_error == "collect":
                b.results[index] = ItemFailure(index, exc, attempt)
                return
            if b.fatal is not None:
                return
            if isinstance(exc, TaskError):
                exc.attempts = attempt
                exc.item_index = index
                b.fatal = exc
                return
            err = TaskError(
                f"batch task {name!r} of state {_describe(state)} failed at item {index} after "
                f"{attempt} attempt(s): {type(exc).__name__}: {exc}",
                state=state,
                task_name=name,
                attempts=attempt,
                remote_traceback=tb,
            )
            err.item_index = index
            err.__cause__ = exc
            b.fatal = err

        def charge(ch: _Chunk, position: int | None, make: Any) -> None:
            """A chunk stopped at ``position`` (timeout, crash): that item spends an
            attempt; the others go again unchanged."""
            n = len(ch.items)
            if position is None or not 0 <= position < n:
                if n == 1:
                    position = 0
                else:  # cannot tell which item: send each alone, nobody charged
                    for k in range(n):
                        b.requeued.append(_Chunk([ch.indices[k]], [ch.items[k]], ch.attempt))
                    return
            rest = [k for k in range(n) if k != position]
            if rest:
                b.requeued.append(
                    _Chunk([ch.indices[k] for k in rest], [ch.items[k] for k in rest], ch.attempt)
                )
            index = ch.indices[position]
            item_failed(index, ch.items[position], ch.attempt, make(index, ch.attempt), None)

        def crashed(died: WorkerDied) -> Any:
            code = died.exitcode
            how = (
                f"killed by signal {-code}"
                if code is not None and code < 0
                else f"exit code {code}"
            )

            def make(index: int, attempt: int) -> WorkerCrashed:
                return WorkerCrashed(
                    f"the worker process (pid {died.pid}) processing item {index} of batch task "
                    f"{name!r} of state {_describe(state)} died ({how})",
                    exitcode=code,
                    state=state,
                    task_name=name,
                    attempts=attempt,
                )

            return make

        def timed_out(index: int, attempt: int) -> TaskTimeout:
            return TaskTimeout(
                f"item {index} of batch task {name!r} of state {_describe(state)} ran past its "
                f"{cfg.timeout}s timeout (attempt {attempt}) and was stopped",
                state=state,
                task_name=name,
                attempts=attempt,
            )

        def collect() -> None:
            while b.done:
                ch = b.done.popleft()
                if ch in b.stopping:  # a timed-out chunk has really stopped: its slot is free
                    b.stopping.discard(ch)
                    continue
                if ch not in b.running:
                    continue
                b.running.discard(ch)
                fut = ch.future
                assert fut is not None
                ch.future = None  # no cycle chunk <-> future (its callbacks hold the chunk)
                try:
                    out = fut.result()
                except WorkerDied as died:
                    charge(ch, died.position, crashed(died))
                    ch.items = []
                    continue
                except Exception as exc:  # the call itself failed (the unit cannot load...)
                    raise fail_whole("a chunk", exc) from exc
                packed = out.packed
                try:
                    values, failures = cloudpickle.loads(packed) if remote else packed
                except Exception as exc:  # results that cannot be loaded here
                    exc.add_note("(while loading the chunk's results in the driver)")
                    for k in range(len(ch.items)):
                        item_failed(ch.indices[k], ch.items[k], ch.attempt, exc, None)
                    ch.items = []
                    continue
                if fixed is None:
                    sizer.observe(len(ch.items), out.timing.ended - out.timing.started)
                if obs.wants("on_task_timing"):
                    obs.emit(
                        "on_task_timing",
                        run.info,
                        state,
                        f"{name}[{ch.indices[0]}..{ch.indices[-1]}]",
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
                b.outstanding -= finished
                if bar is not None and finished:
                    bar.update(finished)
                for failed in failures:
                    index = ch.indices[failed.position]
                    error = item_error(index, ch.attempt, failed)
                    tb = failed.failure.traceback if failed.failure is not None else None
                    item_failed(index, ch.items[failed.position], ch.attempt, error, tb)
                if n < len(ch.items):  # stopped early (cancelled): send the rest again
                    b.requeued.append(_Chunk(ch.indices[n:], ch.items[n:], ch.attempt))
                ch.items = []

        def expire(now: float) -> None:
            timeout = cfg.timeout
            if timeout is None:
                return
            for ch in list(b.running):
                if ch.check_at is None or now < ch.check_at:
                    continue
                fut = ch.future
                assert fut is not None
                if fut.done():
                    continue
                if progress_of is None:
                    # The executor cannot say which item runs: time the chunk as a whole.
                    if now < ch.submitted + timeout * len(ch.items):
                        ch.check_at = ch.submitted + timeout * len(ch.items)
                        continue
                    position = None
                else:
                    where = progress_of(fut)
                    if where is None:  # not started yet
                        ch.check_at = now + timeout
                        continue
                    position, item_started = where
                    if now < item_started + timeout:
                        ch.check_at = item_started + timeout
                        continue
                b.running.discard(ch)
                b.stopping.add(ch)  # holds its pool slot until it has stopped
                executor.cancel(fut, run.cancel_grace)
                charge(ch, position, timed_out)
                ch.items = []

        def pull() -> _Chunk | None:
            assert it is not None
            first = len(b.results)
            size = sizer.next()
            items: Sequence[Any]
            try:
                if sliceable:  # a slice: a memcpy for lists, three ints for a range
                    items = source[first : first + size]
                else:
                    items = list(itertools.islice(it, size))
            except Exception as exc:
                raise fail_whole(f"load() (after {first} items)", exc) from exc
            if len(items) < size:
                b.exhausted = True
            if not items:
                return None
            b.results.extend(itertools.repeat(None, len(items)))
            b.outstanding += len(items)
            return _Chunk(range(first, first + len(items)), items, 1)

        def submit(ch: _Chunk) -> None:
            """Send ``ch``; once its future exists, the future releases the quota slot."""
            payload: Any = ch.items
            if remote:
                try:
                    payload = cloudpickle.dumps(ch.items)
                except Exception as exc:
                    raise ConfigError(
                        f"items {ch.indices[0]}..{ch.indices[-1]} of batch task {name!r} "
                        f"cannot be sent to a worker process: {type(exc).__name__}: {exc}. "
                        "Make the items picklable (or send keys and keep the data in the "
                        "store), or set config=TaskConfig(inline=True)"
                    ) from exc
                sizer.observe_bytes(len(ch.items), len(payload))
            first: Any = ch.indices.start if isinstance(ch.indices, range) else ch.indices
            args = (payload, first, ch.attempt, cfg.timeout, run.run_id, token, remote)
            ch.submitted = time.monotonic()
            ch.check_at = ch.submitted + cfg.timeout if cfg.timeout is not None else None
            fut: Future[Any]
            if inline:
                # In the driver: the run's own cancellation is the chunk's cancel flag.
                fut = Future()
                fut.set_result(
                    run_batch_chunk(run._is_cancelled, None, ref.spec, snap.data(), *args)
                )
            else:
                call = Call(run_batch_chunk, (ref.blob, snap.blob), args)
                try:
                    fut = executor.submit(call)
                except Exception as exc:
                    if isinstance(exc, CanoError):
                        raise
                    raise ConfigError(
                        f"batch task {name!r} of state {_describe(state)} cannot be sent to "
                        f"a worker process: {type(exc).__name__}: {exc}. Make it picklable, "
                        "or set config=TaskConfig(inline=True)"
                    ) from exc
            b.running.add(ch)
            ch.future = fut
            if ch.quota and run.quota is not None:
                quota = run.quota
                fut.add_done_callback(lambda _f: quota.release())
                ch.quota = False  # the future's now
            wake, done = run._wake, b.done

            def finished(_f: Future[Any]) -> None:
                done.append(ch)
                wake.set()

            fut.add_done_callback(finished)

        def start(now: float) -> None:
            while len(b.running) + len(b.stopping) < in_flight and b.fatal is None:
                ch: _Chunk | None = None
                if b.requeued:
                    ch = b.requeued[0]
                elif b.retries and b.retries[0][0] <= now:
                    _, _, index, item, attempt = b.retries[0]
                    ch = _Chunk([index], [item], attempt)
                elif b.exhausted:
                    return
                quota = run.quota if not inline else None
                if quota is not None and not quota.try_acquire(run._wake):
                    return
                try:
                    if ch is None:
                        ch = pull()  # only once a pool slot is ours
                        if ch is None:
                            if quota is not None:
                                quota.release()
                            return
                    elif b.requeued and ch is b.requeued[0]:
                        b.requeued.popleft()
                    else:
                        heapq.heappop(b.retries)
                    ch.quota = quota is not None
                    submit(ch)
                except BaseException:
                    if quota is not None and (ch is None or ch.quota):
                        quota.release()  # never handed to a future
                    raise
                if b.done:  # inline: finished already; collect before pulling more
                    return

        while True:
            run._wake.clear()
            collect()
            now = time.monotonic()
            expire(now)
            if b.fatal is not None:
                raise b.fatal
            if b.exhausted and not b.running and not b.requeued and not b.retries:
                break
            run._check_stop(entry, now)
            start(now)
            if b.done or b.fatal is not None:
                continue
            if b.exhausted and not b.running and not b.requeued and not b.retries:
                continue
            wake_at = [c.check_at for c in b.running if c.check_at is not None]
            if b.retries:
                wake_at.append(b.retries[0][0])
            if run._deadline is not None:
                wake_at.append(run._deadline)
            run._wake.wait(max(0.0, min(wake_at) - time.monotonic()) if wake_at else None)
        assert b.outstanding == 0, b.outstanding
        if bar is not None:
            bar.close()
            bar = None
        previous = _set_context(ctx)
        try:
            nxt = unit.finish(view, b.results)
        except Exception as exc:
            raise fail_whole("finish()", exc) from exc
        finally:
            _set_context(previous)
        b.results = []
        run._check_known(nxt, ref)
        if ref.declared is not None and nxt not in ref.declared:
            from ._errors import TransitionError

            raise TransitionError(
                f"batch task {name!r} returned {_describe(nxt)}, which it does not declare "
                f"(next states: {', '.join(_describe(s) for s in ref.declared)})",
                state=nxt,
            )
        run.store._commit(view._finish(True))
        return nxt
    except BaseException as exc:
        error = exc
        grace = run.stop_grace(exc)
        for ch in b.running:
            if ch.future is not None:
                executor.cancel(ch.future, grace)
        b.running.clear()
        view._finish(False)
        raise
    finally:
        if bar is not None:
            bar.close()
        close = getattr(it, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.debug("closing the items of %r failed", name, exc_info=True)
        if obs:
            obs.emit(
                "on_task_end",
                run.info,
                state,
                name,
                1,
                error=error,
                duration=time.monotonic() - started,
            )
