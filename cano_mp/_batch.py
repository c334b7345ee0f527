"""``BatchTask``: a data-parallel map over items that a workflow finds only at run time.

``load(store)`` runs in the driver and yields the items (a list, or a generator pulled
lazily); ``process(item)`` runs in the pool, items grouped into *chunks* so that one call
carries many items; ``finish(store, results)`` runs in the driver with the results in item
order and returns the next state. The worker side of a chunk is :func:`run_batch_chunk`;
the driver side lives in ``_batch_engine``.
"""

from __future__ import annotations

import itertools
import os
import time
import traceback
from array import array
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import cloudpickle

from . import _context
from ._context import _LazyContext, _set_context
from ._errors import Terminated
from ._retry import TaskConfig
from ._store import ReadOnlyStore, WireSnapshot
from ._store.codec import error_payload

if TYPE_CHECKING:
    from ._runner import UnitSpec
    from ._store import SharedStore

__all__ = ["BatchTask", "ItemFailure", "batch_problems", "run_batch_chunk"]

S = TypeVar("S", bound=Hashable)
I = TypeVar("I")  # noqa: E741 - the contract's name for the item type
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class ItemFailure:
    """Stands in a ``BatchTask``'s results for an item that failed after its retries
    (``on_error="collect"``).

    Attributes:
        index: the item's position in what ``load()`` produced.
        error: the last attempt's exception: the item's own exception (with the worker's
            traceback in its notes), :class:`TaskTimeout` or :class:`WorkerCrashed`.
        attempts: how many attempts the item had.
    """

    index: int
    error: BaseException
    attempts: int = 1

    def __repr__(self) -> str:
        return (
            f"ItemFailure(index={self.index}, error={type(self.error).__name__}"
            f"({str(self.error)!r}), attempts={self.attempts})"
        )


class BatchTask(Generic[S, I, R]):
    """Map :meth:`process` over the items :meth:`load` returns, in parallel, then
    :meth:`finish` with the results in item order::

        class ParseFiles(BatchTask[Step, str, int]):
            next_states = (Step.REPORT,)

            def load(self, store):                      # driver: the items
                return store["paths"]

            def process(self, path):                    # pool: one item
                return count_rows(path)

            def finish(self, store, results):           # driver: results in item order
                store["rows"] = sum(results)
                return Step.REPORT

    Attributes:
        config: ``retry`` and ``timeout`` apply to each item; ``inline=True`` processes
            the items in the driver.
        chunk_size: items per call; ``None`` (default) sizes chunks from the measured time
            per item so that each call carries enough work to amortise its cost.
        max_parallel: most pool slots this batch uses at once.
        on_error: ``"raise"``: the first item that fails after its retries fails the
            state (``TaskError`` with ``item_index``) and the remaining items are
            cancelled; ``"collect"``: its slot in ``results`` holds an
            :class:`ItemFailure` and ``finish`` decides.
        progress: ``True``/``False`` forces the progress bar on or off; ``None`` (default)
            shows it when stderr is a terminal or in Jupyter.

    ``load`` may return a generator: items are pulled as chunks are sent, with a bounded
    number of chunks in flight, so a stream of millions of items runs in bounded memory
    (the results list still holds one result per item: return small values).

    Large data stays in the store: make the items keys or index ranges, and read the data
    in ``process`` through ``task_context().store`` (a read-only, zero-copy view of the
    store as the batch started)::

        def process(self, rows: range) -> float:
            table = task_context().store.get("table")   # shared memory, no copy
            return float(table[rows.start:rows.stop].sum())
    """

    config: TaskConfig = TaskConfig()
    chunk_size: int | None = None
    max_parallel: int | None = None
    on_error: Literal["raise", "collect"] = "raise"
    next_states: tuple[S, ...] | None = None
    progress: bool | None = None

    def load(self, store: SharedStore) -> Iterable[I]:
        """Return the items (any iterable; a generator is pulled lazily). Runs in the driver."""
        raise NotImplementedError(f"{type(self).__name__}.load() is not implemented")

    def process(self, item: I) -> R:
        """Process one item. Runs in a pool worker."""
        raise NotImplementedError(f"{type(self).__name__}.process() is not implemented")

    def finish(self, store: SharedStore, results: list[R]) -> S:
        """Write what the results mean to the store and return the next state (driver).

        With ``on_error="collect"`` a failed item's result is an :class:`ItemFailure`.
        """
        raise NotImplementedError(f"{type(self).__name__}.finish() is not implemented")

    @property
    def name(self) -> str:
        """The task's name in errors, logs and diagrams (its class name by default)."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"<{type(self).__name__} batch task>"


def batch_problems(unit: BatchTask[Any, Any, Any]) -> list[str]:
    """What is wrong with a BatchTask's settings (empty when nothing)."""
    name = unit.name
    problems = []
    if unit.on_error not in ("raise", "collect"):
        problems.append(f"{name}.on_error must be 'raise' or 'collect', got {unit.on_error!r}")
    for attr in ("chunk_size", "max_parallel"):
        v = getattr(unit, attr)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            problems.append(f"{name}.{attr} must be an int >= 1 or None, got {v!r}")
    if unit.progress is not None and not isinstance(unit.progress, bool):
        problems.append(f"{name}.progress must be True, False or None, got {unit.progress!r}")
    return problems


# -- the worker side of one chunk -------------------------------------------------------------

# How many items run between two looks at the cancel flag when items have no timeout, at
# most; fewer once a block takes longer than _CANCEL_CHECK_SECONDS.
_CANCEL_CHECK_EVERY = 64
_CANCEL_CHECK_SECONDS = 0.01


def _pack_results(results: list[Any], failures: list[tuple[Any, ...]]) -> bytes:
    try:
        return bytes(cloudpickle.dumps((results, failures)))
    except Exception:
        pass
    # Some result cannot be pickled: find which, and fail those items alone.
    for k, value in enumerate(results):
        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            results[k] = None
            err = TypeError(f"the result of item {k} could not be sent to the driver: {exc}")
            failures.append((k, "err", error_payload(err, True), None))
    return bytes(cloudpickle.dumps((results, failures)))


def run_batch_chunk(
    control: Callable[[], bool],
    spec: UnitSpec,
    snap: WireSnapshot,
    payload: Any,
    first: int | Sequence[int],
    attempt: int,
    timeout: float | None,
    run_id: str,
    token: str,
    remote: bool,
) -> tuple[Any, ...]:
    """Process the items of one chunk in order; never raises for errors of the items.

    Returns ``("ok", packed, pid, started, ended)`` where ``packed`` is
    ``(results, failures)`` (cloudpickled when ``remote``); a failure is
    ``(position, "err" | "timeout", error, traceback)``.
    """
    pid = os.getpid()
    started = time.time()
    items: Sequence[Any] = cloudpickle.loads(payload) if remote else payload
    n = len(items)
    indices: Sequence[int] = range(first, first + n) if isinstance(first, int) else first
    process = spec.unit.process
    store = ReadOnlyStore(snap, token)
    positions = getattr(control, "positions", None)
    # pos[0] is the item being processed: in the pool slot's shared progress (the driver
    # reads it), or in a local cell (inline).
    pos: memoryview = positions() if positions is not None else memoryview(array("q", [0]))
    ctx = _LazyContext(run_id, spec.state, attempt, control, store, indices, pos)
    results: list[Any] = []
    failures: list[tuple[Any, ...]] = []
    stopped = n
    previous = _set_context(ctx)
    if remote:
        _context.log_tags = spec.log_tags(run_id, attempt)
    try:
        if timeout is None:
            # The hot loop (items may take well under a microsecond): append, and look at
            # the cancel flag once per block; blocks shrink when items are slow, so that a
            # cancelled chunk notices within ~10 ms.
            out = results.append
            numbered = enumerate(items)
            block = 1  # doubles while blocks are quick: slow items are checked often
            while len(results) < n:
                t0 = time.monotonic()
                for k, item in itertools.islice(numbered, block):
                    pos[0] = k
                    try:
                        out(process(item))
                    except (KeyboardInterrupt, Terminated):
                        raise
                    except BaseException as exc:
                        out(None)
                        tb = traceback.format_exc()
                        failures.append((k, "err", error_payload(exc, remote), tb))
                if control():
                    break
                took = time.monotonic() - t0
                if took < _CANCEL_CHECK_SECONDS / 2 and block < _CANCEL_CHECK_EVERY:
                    block *= 2
                elif took > _CANCEL_CHECK_SECONDS and block > 1:
                    block //= 2
            stopped = len(results)
        else:
            mark_timed: Callable[[int, int], None] | None = getattr(control, "mark_timed", None)
            limit_ns = int(timeout * 1e9)
            results.extend(itertools.repeat(None, n))
            for k in range(n):
                t0_ns = time.monotonic_ns()
                ctx.deadline = t0_ns / 1e9 + timeout
                if mark_timed is not None:
                    mark_timed(k, t0_ns)
                else:
                    pos[0] = k
                try:
                    value = process(items[k])
                except (KeyboardInterrupt, Terminated):
                    raise
                except BaseException as exc:
                    failures.append((k, "err", error_payload(exc, remote), traceback.format_exc()))
                else:
                    if time.monotonic_ns() - t0_ns > limit_ns:
                        failures.append((k, "timeout", None, None))
                    else:
                        results[k] = value
                if control():
                    stopped = k + 1
                    break
        # Done with the items: from here on (packing the results, sending them) no item is
        # running, so none can time out or be blamed for a crash.
        pos[0] = -1
    finally:
        _set_context(previous)
        _context.log_tags = None
        store._finish(False)
    if stopped < n:
        del results[stopped:]
    packed: Any = _pack_results(results, failures) if remote else (results, failures)
    return ("ok", packed, pid, started, time.time())
