"""What crosses a process (or thread) boundary between the engine and the code that runs a call.

::

    engine (driver)                     executor                          worker process
    ---------------                     --------                          --------------
    Call(fn, blobs, args, deadline) --> ships each Blob once per worker ->  BlobCache (LRU)
                                        the rest per call --------------->  fn(control, deadline,
                                                                               *blob objects, *args)
    UnitOutcome / ChunkOutcome <------- resolves the call's future <-----  the outcome, or
      failures as TaskFailure             (or WorkerDied / CANCELLED)        WorkerDied (it died)

Every record here is a ``NamedTuple`` (cheap to pickle, readable by name, checked by mypy):

- :class:`Call` — the function to run, the :class:`Blob` objects it takes (a task, a
  snapshot index: shipped to a worker once and cached there by key) and its other
  arguments; ``deadline`` is explicit so that an executor on another machine can re-base it
  on the worker's clock without knowing the function.
- :class:`UnitOutcome` — one attempt of a task: the next state (encoded) and the write log,
  or a :class:`TaskFailure`; with its :class:`Timing`.
- :class:`ChunkOutcome` — one BatchTask chunk: the results and :class:`ItemFailed` records.
- :class:`TaskFailure` — a task's exception on its way back. One mechanism for every
  remote error, as CPython's ``concurrent.futures`` does with ``_ExceptionWithTraceback``:
  the worker pickles the exception (or, when it cannot, keeps its type name and message) with
  its formatted traceback; :func:`decode_error` rebuilds it in the driver and attaches the
  remote traceback as a note. An exception whose class cannot be rebuilt here becomes a
  :class:`RemoteError` that keeps the original type name and message.
- :class:`BlobCache` — the LRU of blobs by key that a local pool worker and a Dask worker
  process keep (and the local pool's driver mirrors), sized by :data:`BLOB_CACHE_SIZES`.
- The local pool's pipe messages: :class:`RunCall` and :class:`Stop` to a worker;
  :class:`Returned`, :class:`Raised`, :class:`InitFailed` and :class:`LogMessage` back
  (see ``cano_mp._worker``).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import reprlib
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import cloudpickle

from ._errors import TaskError
from ._public import public

__all__ = [
    "CANCELLED",
    "BLOB_CACHE_SIZES",
    "Blob",
    "BlobCache",
    "BlobKey",
    "Call",
    "ChunkOutcome",
    "DriverMessage",
    "InitFailed",
    "ItemFailed",
    "LogMessage",
    "NewBlob",
    "Raised",
    "RemoteError",
    "Returned",
    "RunCall",
    "Stop",
    "TaskFailure",
    "Timing",
    "UnitOutcome",
    "WorkerDied",
    "WorkerMessage",
    "decode_error",
    "dumps",
    "encode_error",
    "is_unit_outcome",
    "from_wire",
    "short_repr",
]


class _Cancelled:
    __slots__ = ()

    def __repr__(self) -> str:
        return "CANCELLED"


CANCELLED: Any = _Cancelled()
"""What the future of a cancelled call resolves to once the call has stopped."""

_repr = reprlib.Repr()
_repr.maxstring = 200
_repr.maxother = 200
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 10


def short_repr(value: object) -> str:
    """``repr(value)`` capped at a few hundred characters (error messages never hold a
    10 MB value)."""
    try:
        return _repr.repr(value)
    except Exception as exc:  # a broken __repr__
        return f"<{type(value).__name__} (repr failed: {type(exc).__name__})>"


class RemoteError(Exception):
    """Stands in for a task's exception that could not be rebuilt in the driver.

    ``type_name`` is the original exception's type (qualified name); the message is kept.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name


RemoteError.__module__ = "cano_mp"


class WorkerDied(Exception):
    """The process running a call died; ``exitcode`` is negative for a signal.

    ``position`` is the item the call last reported working on, or ``None``; ``finished``:
    the outcomes a grouped call had kept before it died (``_calls.run_unit_group``).
    """

    def __init__(self, exitcode: int | None, pid: int | None) -> None:
        super().__init__(f"worker process {pid} died with exit code {exitcode}")
        self.exitcode = exitcode
        self.pid = pid
        self.position: int | None = None
        self.finished: list[Any] = []


class Blob:
    """An object shipped to a worker once and cached there under ``key``.

    ``category`` selects the worker-side cache (``"unit"``: tasks, ``"snapshot"``: store
    indexes), each with its own size bound. ``serialise`` returns the bytes sent to a worker
    (computed once, on first need). Without a ``key``, the key is a hash of those bytes: an
    object that pickles the same is sent once, one that changed is sent again.
    """

    __slots__ = ("_data", "_key", "category", "obj", "serialise")

    def __init__(
        self, key: str | None, obj: Any, category: str, serialise: Callable[[], bytes]
    ) -> None:
        self._key = key
        self.obj = obj
        self.category = category
        self.serialise = serialise
        self._data: bytes | None = None

    @property
    def key(self) -> str:
        if self._key is None:
            digest = hashlib.blake2b(self.data(), digest_size=12).hexdigest()
            self._key = f"{self.category[0]}{digest}"
        return self._key

    def data(self) -> bytes:
        if self._data is None:
            self._data = self.serialise()
        return self._data

    def __repr__(self) -> str:
        return f"Blob({self._key!r}, {self.category})"


class Call(NamedTuple):
    """One call: ``fn(control, deadline, *[b.obj for b in blobs], *args)``.

    ``control()`` is True once the caller asked the call to stop; ``deadline`` is a
    ``time.monotonic()`` instant on the running process's clock, or None. ``ahead``: the
    call is short and small (its arguments under :data:`AHEAD_MAX_BYTES`), so an executor
    may queue it in a busy worker's pipe behind another such call (pre-feed), as
    ``multiprocessing.Pool`` does; BatchTask chunks are. ``direct``: the caller will wait
    for this call alone, in its own thread (``ExecutorBase.wait_direct``), so an executor
    may let that thread read the worker's reply itself (a plain task's call is).
    """

    fn: Callable[..., Any]
    blobs: tuple[Blob, ...]
    args: tuple[Any, ...]
    deadline: float | None = None
    ahead: bool = False
    direct: bool = False


# The largest arguments of a call that may be queued ahead (Call.ahead): a queued message
# must fit the pipe's buffer, or sending it would block until the worker reads it.
AHEAD_MAX_BYTES = 64 << 10


class Timing(NamedTuple):
    """Where and when a call ran: the worker's pid, and wall-clock start and end."""

    pid: int
    started: float
    ended: float


class TaskFailure(NamedTuple):
    """A task's exception on its way back to the driver (see :func:`encode_error`)."""

    type_name: str
    message: str
    payload: BaseException | bytes | None  # itself (inline), pickled (remote), or lost
    traceback: str | None


class UnitOutcome(NamedTuple):
    """One attempt of a task: ``state`` (encoded) and ``log`` when it succeeded, else
    ``failure``."""

    state: Any
    log: list[Any]
    failure: TaskFailure | None
    timing: Timing

    @property
    def ok(self) -> bool:
        return self.failure is None

    # On the pipe an outcome is a plain tuple: a NamedTuple is pickled as a reference to its
    # class (and Timing's), looked up on both sides of every call (~3 µs per class).
    def to_wire(self) -> tuple[Any, ...]:
        t = self.timing
        return ("unit", self.state, self.log, self.failure, t.pid, t.started, t.ended)

    @classmethod
    def from_wire(cls, wire: tuple[Any, ...]) -> UnitOutcome:
        _, state, log, failure, pid, started, ended = wire
        return cls(state, log, failure, Timing(pid, started, ended))


def is_unit_outcome(wire: object) -> bool:
    """Whether ``wire`` is a :class:`UnitOutcome` as it travels (``to_wire``)."""
    return type(wire) is tuple and len(wire) == 7 and wire[0] == "unit"


class ItemFailed(NamedTuple):
    """An item of a chunk that failed: ``kind`` is ``"err"`` (``failure`` says what) or
    ``"timeout"``."""

    position: int
    kind: str
    failure: TaskFailure | None


class ChunkOutcome(NamedTuple):
    """One BatchTask chunk: ``packed`` is ``(results, failures)`` — cloudpickled bytes when
    it ran in another process — for the items it got to, in order."""

    packed: Any
    timing: Timing


def encode_error(exc: BaseException, remote: bool, tb: str | None = None) -> TaskFailure:
    """``exc`` as it travels back from a call: itself inline; pickled when remote (its type
    name and message are kept in case it cannot be rebuilt on the other side)."""
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    if type(exc).__module__ == "builtins":
        type_name = type(exc).__qualname__
    try:
        message = str(exc)
    except Exception:
        message = "<str() of the exception failed>"
    if len(message) > 2000:
        message = message[:2000] + f"... ({len(message)} characters)"
    payload: BaseException | bytes | None = exc
    if remote:
        try:
            payload = cloudpickle.dumps(exc)
        except Exception:
            payload = None
    return TaskFailure(type_name, message, payload, tb)


def decode_error(failure: TaskFailure) -> BaseException:
    """Rebuild the exception a :class:`TaskFailure` carries, its remote traceback as a note."""
    payload = failure.payload
    exc: BaseException | None = payload if isinstance(payload, BaseException) else None
    if isinstance(payload, bytes):
        try:
            loaded = cloudpickle.loads(payload)
            if isinstance(loaded, BaseException):
                exc = loaded
        except Exception as load_exc:
            exc = RemoteError(
                failure.type_name,
                f"{failure.message} (the exception could not be rebuilt in the driver: "
                f"{type(load_exc).__name__}: {load_exc})",
            )
    if exc is None:
        exc = RemoteError(failure.type_name, failure.message)
    # a TaskError carries its worker traceback as .remote_traceback: no note
    if failure.traceback is not None and not isinstance(exc, TaskError):
        try:
            exc.add_note(f"\nRemote traceback (from the worker):\n{failure.traceback}")
        except Exception:
            pass
    return exc


def _is_task_error(exc: BaseException) -> bool:
    # A TaskError carries its own remote traceback (.remote_traceback); no note.
    return any(
        c.__name__ == "TaskError" and c.__module__.startswith("cano_mp") for c in type(exc).__mro__
    )


# Per blob category: how many blobs a worker keeps (the local pool's workers and a Dask
# worker process alike). Units (tasks) are small and reused across runs; snapshots are per
# store version and rarely reused after the next commit.
BLOB_CACHE_SIZES = {"unit": 1024, "snapshot": 16}


class BlobCache:
    """A bounded LRU of blobs by key.

    A worker keeps the objects; the local pool's driver mirrors each worker's keys (same
    sizes, same order of use) to know what it holds without asking; the Dask executor keeps
    the Dask futures of what it scattered. Not thread-safe: callers that share one lock it.
    """

    __slots__ = ("items", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[str, Any] = OrderedDict()

    @classmethod
    def per_category(cls) -> dict[str, BlobCache]:
        """One empty cache per blob category, sized by :data:`BLOB_CACHE_SIZES`."""
        return {category: cls(size) for category, size in BLOB_CACHE_SIZES.items()}

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def __len__(self) -> int:
        return len(self.items)

    def get(self, key: str) -> Any:
        """The value under ``key`` (``None`` if absent), without marking it used."""
        return self.items.get(key)

    def touch(self, key: str) -> Any:
        """Mark ``key`` used; return its value."""
        self.items.move_to_end(key)
        return self.items[key]

    def add(self, key: str, value: Any) -> None:
        """Store ``value`` as the most recently used; evict the least recently used."""
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def clear(self) -> None:
        self.items.clear()


def _code_reduce_keeping_filename(code: types.CodeType) -> Any:
    # cloudpickle names every code object it ships by value "<dynamic-code>" (to make its
    # payload independent of where a function was defined); a worker's traceback then
    # cannot show the user's file, line and source. Keep the real file name.
    rebuild, args = cloudpickle.cloudpickle._code_reduce(code)
    args = list(args)
    if len(args) > 10 and args[10] == "<dynamic-code>":
        args[10] = code.co_filename
    return rebuild, tuple(args)


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType:
            return _code_reduce_keeping_filename(obj)
        return super().reducer_override(obj)


def dumps(obj: Any) -> bytes:
    """``cloudpickle.dumps`` that keeps the file names of code shipped by value, so that
    tracebacks from a worker show the user's file and line (and source, when readable)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


# -- the local pool's pipe --------------------------------------------------------------------
# One worker per duplex pipe, FIFO both ways (see cano_mp._worker). Each message is a
# NamedTuple whose first field, ``kind``, names it; it travels as a plain tuple
# (``tuple(msg)``) and the receiver rebuilds the record with :func:`from_wire`. A class
# reference in each pickled message would cost ~2 µs to write and ~1.5 µs to read (measured
# on CPython 3.11), on a call whose whole pipe round trip is ~16-30 µs.

NewBlob = tuple[str, str, bytes]
"""A blob a worker does not hold yet: ``(key, category, pickled object)``."""
BlobKey = tuple[str, str]
"""Which cached blob a call takes: ``(key, category)``."""


class RunCall(NamedTuple):
    """Driver to worker: run ``fn(control, deadline, *blob objects, *args)``.

    ``new_blobs`` are unpickled and cached first; ``keys`` name every blob the call takes,
    in order. ``log_level`` is the driver's root level (the worker forwards records at or
    above it).
    """

    kind: Literal["call"]
    seq: int
    fn: Callable[..., Any]
    new_blobs: list[NewBlob]
    keys: list[BlobKey]
    args: tuple[Any, ...]
    deadline: float | None
    log_level: int


class Stop(NamedTuple):
    """Driver to worker: exit."""

    kind: Literal["stop"]


class Returned(NamedTuple):
    """Worker to driver: call ``seq`` returned ``result``."""

    kind: Literal["returned"]
    seq: int
    result: Any


class Raised(NamedTuple):
    """Worker to driver: call ``seq`` could not run or its result not be sent; ``text`` says
    why (a formatted traceback). A task's own exception travels inside its outcome."""

    kind: Literal["raised"]
    seq: int
    text: str


class InitFailed(NamedTuple):
    """Worker to driver: the pool's initializer raised (``text``: its traceback); the worker
    exits."""

    kind: Literal["init_failed"]
    text: str


class LogMessage(NamedTuple):
    """Worker to driver: a log record a task emitted while call ``seq`` ran.

    ``record`` is the ``LogRecord``'s attributes, message formatted and exception text
    rendered (as ``logging.handlers.SocketHandler`` ships a record); ``tags`` say which run,
    state, task, attempt (and batch item) it came from.
    """

    kind: Literal["log"]
    seq: int
    record: dict[str, Any]
    tags: dict[str, Any]


WorkerMessage = Returned | Raised | InitFailed | LogMessage
DriverMessage = RunCall | Stop

_KINDS: dict[str, Any] = {
    "call": RunCall,
    "stop": Stop,
    "returned": Returned,
    "raised": Raised,
    "init_failed": InitFailed,
    "log": LogMessage,
}


def from_wire(raw: tuple[Any, ...]) -> DriverMessage | WorkerMessage:
    """The message record a plain tuple off the pipe stands for (its first field says which)."""
    message: DriverMessage | WorkerMessage = tuple.__new__(_KINDS[raw[0]], raw)
    return message


public(RemoteError)
