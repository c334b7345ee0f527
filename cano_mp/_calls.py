"""The functions a call runs, in a pool worker or inline in the driver.

- :func:`run_unit_call` — one attempt of a task (a Task, a Node's prep→exec→post, a
  function): the engine ships ``Call(run_unit_call, (unit blob, snapshot blob), (attempt,
  run_id, token, remote), deadline)``; the unit runs against a :class:`TaskStore` over the
  snapshot and the call returns a :class:`~cano_mp._wire.UnitOutcome` in its wire form
  (``UnitOutcome.to_wire``: a plain tuple).
- :func:`run_batch_chunk` — the items of one ``BatchTask`` chunk, in order, each with its
  own timeout; returns a :class:`~cano_mp._wire.ChunkOutcome`.

Neither raises for errors of the user's code: they come back as records.

The next state is encoded as ``("i", n)`` when it is the n-th of the workflow's state
table (so an Enum defined in ``__main__`` is not re-pickled by value on every call), else
``("v", value)``.
"""

from __future__ import annotations

import enum
import itertools
import os
import pickle
import time
import traceback
from array import array
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import cloudpickle

from . import _context
from ._context import NO_RESOURCES, TaskContext, _LazyContext, _set_context
from ._errors import StoreError, Terminated
from ._log import get_logger
from ._stepped import CONTINUE
from ._store import ReadOnlyStore, TaskStore, WireSnapshot
from ._store import results as results_shm
from ._task import Node, Task
from ._wire import ChunkOutcome, ItemFailed, Timing, encode_error, short_repr

__all__ = [
    "PackedUnits",
    "TaskExit",
    "UnitSpec",
    "UnknownState",
    "run_batch_chunk",
    "run_unit_call",
    "run_unit_group",
]

log = get_logger("cano_mp.batch")


class UnitSpec:
    """A unit, the state it runs for, and the workflow's state table."""

    __slots__ = ("_index", "name", "resources", "state", "table", "unit", "workflow")

    def __init__(
        self,
        unit: Any,
        state: Any,
        name: str,
        table: tuple[Any, ...],
        workflow: str = "",
        resources: Mapping[str, Any] | None = None,
    ) -> None:
        self.unit = unit
        self.state = state
        self.name = name
        self.table = table
        self.workflow = workflow
        self.resources = resources  # the workflow's ResourceSet, or None
        self._index: dict[Any, int] | None = None

    def encode_state(self, value: Any) -> tuple[str, Any]:
        if value is CONTINUE:  # a SteppedTask goes on
            return ("v", value)
        if self._index is None:
            self._index = {s: i for i, s in enumerate(self.table)}
        try:
            i = self._index.get(value) if isinstance(value, Hashable) else None
        except TypeError:
            i = None
        if i is None:
            # Neither registered nor an exit state: the run fails with TransitionError. Send
            # its name, not the value: an Enum defined in a script's __main__ (or a huge
            # value) may not even pickle back, which would look like a task failure.
            return ("u", UnknownState(value))
        if self.table[i] == value and type(self.table[i]) is type(value):
            return ("i", i)
        return ("v", value)

    def decode_state(self, enc: tuple[str, Any]) -> Any:
        return self.table[enc[1]] if enc[0] == "i" else enc[1]

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.unit, self.state, self.name, self.table, self.workflow, self.resources)

    def __setstate__(self, st: tuple[Any, ...]) -> None:
        self.unit, self.state, self.name, self.table, self.workflow, self.resources = st
        self._index = None

    def log_tags(self, run_id: str, attempt: int) -> dict[str, Any]:
        """What a worker-side log record of this unit is tagged with."""
        state = self.state.name if isinstance(self.state, enum.Enum) else self.state
        return {
            "run_id": run_id,
            "workflow": self.workflow,
            "state": state,
            "task": self.name,
            "attempt": attempt,
        }


class PackedUnits:
    """The bytes of a plan's units (see ``Plan.freeze``); unpickles, in a worker, into the
    tuple of :class:`UnitSpec`. It lives here, beside ``UnitSpec``, so that a worker loading
    it imports only what runs a call, not the engine."""

    __slots__ = ("meta", "objects")

    def __init__(self, meta: bytes, objects: bytes) -> None:
        self.meta, self.objects = meta, objects

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpack_units, (self.meta, self.objects))


def _unpack_units(meta: bytes, objects: bytes) -> tuple[UnitSpec, ...]:
    table, workflow, rows = pickle.loads(meta)
    *units, resources = pickle.loads(objects)
    return tuple(
        UnitSpec(units[pos], state, name, table, workflow, resources) for pos, state, name in rows
    )


class TaskExit(Exception):
    """A task called ``sys.exit()`` (or raised ``SystemExit``): a failure of that task,
    never the end of the worker or of the driver."""


def _as_failure(exc: BaseException) -> BaseException:
    if isinstance(exc, SystemExit):
        err = TaskExit(f"the task called sys.exit({exc.code!r})")
        err.__cause__ = exc
        return err
    return exc


class UnknownState:
    """Stands in for a returned state that is not in the workflow's state table: only its
    description travels (see ``UnitSpec.encode_state``)."""

    __slots__ = ("text",)

    def __init__(self, value: Any) -> None:
        name = value.name if isinstance(value, enum.Enum) else None
        self.text = f"{type(value).__qualname__}.{name}" if name else short_repr(value)

    def __repr__(self) -> str:
        return self.text


def execute_unit(unit: Any, store: TaskStore) -> Any:
    if isinstance(unit, Task | Node):
        return unit.run(store)  # Node.run: prep -> exec -> post, unless overridden
    return unit(store)


def run_unit_call(
    cancelled: Callable[[], bool],
    deadline: float | None,
    units: Sequence[UnitSpec],
    snap: WireSnapshot,
    index: int,
    attempt: int,
    run_id: str,
    token: str,
    remote: bool,
) -> tuple[Any, ...]:
    """Run one attempt of ``units[index]``; never raises for errors of the task itself."""
    spec = units[index]
    pid = os.getpid()
    started = time.time()
    store = TaskStore(snap, token)
    ctx = TaskContext(
        run_id, spec.state, attempt, deadline, cancelled, resources=spec.resources or NO_RESOURCES
    )
    previous = _set_context(ctx)
    if remote:
        _context.log_tags = spec.log_tags(run_id, attempt)
    try:
        result = execute_unit(spec.unit, store)
    except Terminated:  # SIGTERM reached an inline task: stop the run, never retry
        store._finish(False)
        raise
    except (Exception, SystemExit) as exc:
        store._finish(False)
        failure = encode_error(_as_failure(exc), remote, traceback.format_exc())
        return ("unit", None, [], failure, pid, started, time.time())
    except BaseException:
        store._finish(False)
        raise
    finally:
        _set_context(previous)
        _context.log_tags = None
    try:
        log = store._finish(True)
        state = spec.encode_state(result)
    except Exception as exc:
        failure = encode_error(exc, remote, traceback.format_exc())
        return ("unit", None, [], failure, pid, started, time.time())
    return ("unit", state, log, None, pid, started, time.time())


def run_unit_group(
    control: Any,
    deadline: float | None,
    units: Sequence[UnitSpec],
    snap: WireSnapshot,
    calls: Sequence[tuple[int, int, str, str, bool]],
) -> tuple[str, list[tuple[Any, ...]]]:
    """Run several quick split branches in one pool call (see ``_engine.groups``): each as
    :func:`run_unit_call` would, one after the other, with its position in ``calls`` in
    the slot's progress field, so that a crash is charged to the branch it happened in, and
    each outcome kept in the slot's flags (``CallControl.keep_outcome``), so that a crash
    loses none that had finished. A cancel, or a branch that leaves the worker unusable
    (the health check of ``_worker.loop``), ends the call: the branches after it are not
    begun."""
    positions = control.positions()
    outcomes = []
    for k, args in enumerate(calls):
        positions[0] = k
        outcome = run_unit_call(control, deadline, units, snap, *args)
        control.keep_outcome(k, outcome)
        outcomes.append(outcome)
        if k + 1 < len(calls) and (control() or control.broken() is not None):
            break  # cancelled, or this branch left the worker unusable: not begun
    return ("group", outcomes)


# -- the worker side of one chunk -------------------------------------------------------------

# How many items run between two looks at the cancel flag when items have no timeout, at
# most; fewer once a block takes longer than _CANCEL_CHECK_SECONDS.
_CANCEL_CHECK_EVERY = 1024
_CANCEL_CHECK_SECONDS = 0.01


def block_position(start: int, length: int) -> int:
    """The progress field's value while items ``start .. start + length - 1`` run as one
    block (negative, below -1: -1 is "no item"); :func:`block_of` reads it back."""
    return -2 - (start | length << 32)


def block_of(position: int) -> tuple[int, int] | None:
    """``(start, length)`` of a :func:`block_position` value, or None for an item's."""
    if position >= -1:
        return None
    v = -2 - position
    return v & 0xFFFFFFFF, v >> 32


def _pack_results(
    results: list[Any], failures: list[ItemFailed], dirs: Any, token: str
) -> results_shm.Packed:
    """The chunk's ``(results, failures)`` for the pipe: large buffers (numpy results) in one
    shared-memory segment, the rest pickled (see :mod:`._store.results`). A result that
    cannot be pickled fails its item alone."""
    for attempt in range(2):
        try:
            return results_shm.pack((results, failures), dirs, token)
        except StoreError:  # no room for the segment: through the pipe, as pickles
            log.debug("batch results go through the pipe: no room in shared memory", exc_info=True)
            break
        except Exception:
            if attempt == 0:
                _fail_unpicklable(results, failures)
    try:
        return (bytes(cloudpickle.dumps((results, failures))), None)
    except Exception:
        _fail_unpicklable(results, failures)
        return (bytes(cloudpickle.dumps((results, failures))), None)


def _fail_unpicklable(results: list[Any], failures: list[ItemFailed]) -> None:
    for k, value in enumerate(results):
        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            results[k] = None
            err = TypeError(f"the result of item {k} could not be sent to the driver: {exc}")
            failures.append(ItemFailed(k, "err", encode_error(err, True)))


def run_batch_chunk(
    control: Callable[[], bool],
    deadline: float | None,
    units: Sequence[UnitSpec],
    snap: WireSnapshot,
    index: int,
    payload: Any,
    first: int | Sequence[int],
    attempt: int,
    timeout: float | None,
    run_id: str,
    token: str,
    remote: bool,
) -> ChunkOutcome:
    """Process the items of one chunk in order; never raises for errors of the items.

    ``packed`` of the outcome is ``(results, failures)`` (when ``remote``: packed by
    ``_store.results.pack``, large buffers in a shared-memory segment),
    each failure an :class:`~cano_mp._wire.ItemFailed`. ``deadline`` is unused: each item
    has its own (``timeout``).
    """
    spec = units[index]
    pid = os.getpid()
    started = time.time()
    items: Sequence[Any] = cloudpickle.loads(payload) if remote else payload
    n = len(items)
    indices: Sequence[int] = range(first, first + n) if isinstance(first, int) else first
    store = ReadOnlyStore(snap, token)
    positions = getattr(control, "positions", None)
    # pos[0] is the item being processed: in the pool slot's shared progress (the driver
    # reads it), or in a local cell (inline).
    pos: memoryview = positions() if positions is not None else memoryview(array("q", [0]))
    ctx = _LazyContext(run_id, spec.state, attempt, control, store, indices, pos)
    ctx.resources = spec.resources or NO_RESOURCES
    chunk = _Chunk(spec.unit.process, items, control, pos, remote)
    ctx.at = chunk.position
    previous = _set_context(ctx)
    if remote:
        _context.log_tags = spec.log_tags(run_id, attempt)
    try:
        if timeout is None:
            chunk.run_untimed()
        else:
            chunk.run_timed(ctx, timeout)
        # Done with the items: from here on (packing the results, sending them) no item is
        # running, so none can time out or be blamed for a crash.
        pos[0] = -1
    finally:
        _set_context(previous)
        _context.log_tags = None
        store._finish(False)
    results, failures = chunk.results, chunk.failures
    packed: Any = (
        _pack_results(results, failures, store._dirs, token) if remote else (results, failures)
    )
    return ChunkOutcome(packed, Timing(pid, started, time.time()))


class _Chunk:
    """The items of one chunk and what became of them (results, failures), in order."""

    __slots__ = ("control", "failures", "items", "pos", "process", "remote", "results")

    def __init__(
        self,
        process: Callable[[Any], Any],
        items: Sequence[Any],
        control: Callable[[], bool],
        pos: memoryview,
        remote: bool,
    ) -> None:
        self.process, self.items, self.control, self.pos = process, items, control, pos
        self.remote = remote
        self.results: list[Any] = []
        self.failures: list[ItemFailed] = []

    def position(self) -> int:
        """The position of the item running now (in a block: as many as have a result)."""
        k = int(self.pos[0])
        return k if k >= 0 else len(self.results)

    def _failed(self, k: int, exc: BaseException) -> None:
        tb = traceback.format_exc()
        # SystemExit too: it is the item's failure, kept as is in its ItemFailure
        self.failures.append(ItemFailed(k, "err", encode_error(exc, self.remote, tb)))

    def run_untimed(self) -> None:
        """The hot loop (items may take well under a microsecond): blocks of items run in
        ``map`` (C), as ``multiprocessing.Pool`` runs a chunk; the progress field says which
        block runs (:func:`block_position`: a crash in it costs its items a run alone each,
        uncharged, to find the culprit), or which item when blocks are of one item (slow
        items). The cancel flag is looked at once per block; blocks shrink when items are
        slow, so that a cancelled chunk notices within ~10 ms. Stops early (fewer results)
        when cancelled."""
        process, pos, n, results = self.process, self.pos, len(self.items), self.results
        extend, it = results.extend, iter(self.items)
        block = 1  # doubles while blocks are quick: slow items are checked often
        while (k := len(results)) < n:
            t0 = time.monotonic()
            pos[0] = k if block == 1 else block_position(k, block)
            try:
                extend(map(process, itertools.islice(it, block)))
            except (KeyboardInterrupt, Terminated):
                raise
            except BaseException as exc:  # the items before it are in results already
                k = len(results)
                results.append(None)
                self._failed(k, exc)
            if self.control():
                break
            took = time.monotonic() - t0
            if took < _CANCEL_CHECK_SECONDS / 2 and block < _CANCEL_CHECK_EVERY:
                block *= 2
            elif took > _CANCEL_CHECK_SECONDS and block > 1:
                block //= 2

    def run_timed(self, ctx: _LazyContext, timeout: float) -> None:
        """Each item with its own deadline, reported to the driver before it starts."""
        control, items, n = self.control, self.items, len(self.items)
        mark_timed: Callable[[int, int], None] | None = getattr(control, "mark_timed", None)
        limit_ns = int(timeout * 1e9)
        results = self.results
        results.extend(itertools.repeat(None, n))
        for k in range(n):
            t0_ns = time.monotonic_ns()
            ctx.deadline = t0_ns / 1e9 + timeout
            if mark_timed is not None:
                mark_timed(k, t0_ns)
            else:
                self.pos[0] = k
            try:
                value = self.process(items[k])
            except (KeyboardInterrupt, Terminated):
                raise
            except BaseException as exc:
                self._failed(k, exc)
            else:
                if time.monotonic_ns() - t0_ns > limit_ns:
                    self.failures.append(ItemFailed(k, "timeout", None))
                else:
                    results[k] = value
            if control():
                del results[k + 1 :]
                break
