"""What a Dask worker process runs for the DaskExecutor, and the records it receives.

Imported on both sides: the driver submits :func:`run_remote` and sends :class:`Inline`
and :class:`Layout` records; a Dask worker imports this module to run them. Nothing here
needs ``distributed``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import cloudpickle

from .._errors import CanoError
from .._store.byvalue import ValueSnapshot, hold_snapshot, pack_log, release_snapshot
from .._store.results import inband as results_inband
from .._wire import BLOB_CACHE_SIZES, BlobCache, ChunkOutcome, UnitOutcome, is_unit_outcome

__all__ = [
    "FLAG_TTL",
    "Inline",
    "Layout",
    "RemoteResult",
    "flag_calls",
    "run_remote",
    "running",
    "running_calls",
    "unpack_blob",
]

# Cancel flags older than this are forgotten (a flag is set on every worker; only the one
# running the call removes it when the call ends).
FLAG_TTL = 600.0

# call id -> time.monotonic() when its cancel flag was set (in this worker process)
flags: dict[str, float] = {}
# ids of the calls running in this worker process
running: set[str] = set()


def flag_calls(ids: Sequence[str]) -> list[str]:
    """Set the cancel flags of ``ids`` here; return those running here (via client.run)."""
    now = time.monotonic()
    for i in ids:
        flags[i] = now
    if len(flags) > 10_000:
        for i, at in list(flags.items()):
            if now - at > FLAG_TTL:
                flags.pop(i, None)
    return [i for i in ids if i in running]


def running_calls(ids: Sequence[str]) -> list[str]:
    """Which of ``ids`` still run in this worker process (via client.run)."""
    return [i for i in ids if i in running]


@dataclass(frozen=True, slots=True)
class Inline:
    """A small blob sent with each call: its pickle, unpickled once per worker process."""

    key: str
    category: str
    data: bytes


# The same caches as a local pool worker's (one per blob category, same sizes); a Dask
# worker runs calls in several threads, hence the lock.
_cache_lock = threading.Lock()
_caches = BlobCache.per_category()


def unpack_blob(blob: Any) -> Any:
    """The object a blob argument stands for: an :class:`Inline` unpickled (once per worker
    process, by key), or what Dask already holds (a scattered blob)."""
    if not isinstance(blob, Inline):
        return blob
    with _cache_lock:
        cache = _caches.get(blob.category)
        if cache is None:
            cache = _caches[blob.category] = BlobCache(BLOB_CACHE_SIZES["unit"])
        if blob.key in cache:
            return cache.touch(blob.key)
    obj = cloudpickle.loads(blob.data)
    with _cache_lock:
        cache.add(blob.key, obj)
    return obj


@dataclass(frozen=True, slots=True)
class Layout:
    """How :func:`run_remote`'s positional arguments are laid out after the call id."""

    snapshot_at: int  # which blob is a ValueSnapshot (-1: none)
    blobs: int
    segments: int
    remaining: float | None  # seconds the call's deadline had left when it was submitted
    sent: float  # time.time() at submission


class RemoteResult(NamedTuple):
    """What :func:`run_remote` returns: the call's return value (a successful
    ``UnitOutcome``'s write log packed by value) and the bytes of the segments that log
    refers to, by name."""

    outcome: Any
    segments: dict[str, Any]


class RemoteBaseException(CanoError):
    """A call raised a BaseException (SystemExit...) in a Dask worker; re-raising it there
    would take the worker down."""


def run_remote(fn: Callable[..., Any], call_id: str, layout: Layout, *rest: Any) -> RemoteResult:
    """What a Dask task runs: one cano_mp call, with its snapshot served by value.

    The segment files the write log refers to are read into the result and deleted here.
    """
    blobs = [unpack_blob(b) for b in rest[: layout.blobs]]
    segments = rest[layout.blobs : layout.blobs + layout.segments]
    args = list(rest[layout.blobs + layout.segments :])
    snap: ValueSnapshot | None = None
    if layout.snapshot_at >= 0:
        snap = blobs[layout.snapshot_at]
        assert isinstance(snap, ValueSnapshot)
        blobs[layout.snapshot_at] = hold_snapshot(snap, segments)
    deadline = None
    if layout.remaining is not None:  # re-based on this worker's clock
        waited = min(max(0.0, time.time() - layout.sent), max(0.0, layout.remaining))
        deadline = time.monotonic() + layout.remaining - waited

    def cancelled() -> bool:
        return call_id in flags

    running.add(call_id)
    try:
        out = fn(cancelled, deadline, *blobs, *args)
    except BaseException as exc:
        if isinstance(exc, Exception):
            raise
        raise RemoteBaseException(
            f"the call raised {type(exc).__name__}: {exc} (caught in the Dask worker)"
        ) from None
    finally:
        running.discard(call_id)
        flags.pop(call_id, None)
        if snap is not None:
            release_snapshot(snap)
    if is_unit_outcome(out):
        unit = UnitOutcome.from_wire(out)
        if unit.ok:
            packed, data = pack_log(unit.log)
            return RemoteResult(unit._replace(log=packed).to_wire(), data)
    if isinstance(out, ChunkOutcome):  # a batch chunk's results: by value, like the log
        out = out._replace(packed=results_inband(out.packed))
    return RemoteResult(out, {})
