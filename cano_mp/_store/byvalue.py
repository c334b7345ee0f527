"""The store by value: snapshots and write logs for workers that cannot map the driver's files.

On one machine a snapshot's large values are segment files that workers map without copying
(see ``view``). A worker on another machine — a Dask worker — cannot open those files, so
what would be shared is sent instead::

    driver                                           worker (another machine)
    ------                                           ------------------------
    value_snapshot(snapshot data)                    hold_snapshot(value snapshot, bytes)
      index with each segment renamed "@value:<path>"  -> SnapshotData over this process's
      + the segments' paths; their bytes are read        own directories; the renamed
      (read_segment) and sent once per version           segments are served from memory
                                                         (view.HELD_SEGMENTS), zero-copy
                                                       fn(...) runs against a TaskStore as usual
    unpack_log(log, bytes, store dirs)       <------  pack_log(write log): the segments the
      each segment written again as a file               call created are read into bytes and
      "<token>-<n>" in the store's directory:            deleted here
      the engine commits (and discards by token)
      exactly as for its own pool

Everything here is a pure transformation of the formats in ``codec`` and ``records``; moving
the bytes between machines is the executor's job (``cano_mp.dask``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .codec import Encoded, Ref, all_refs
from .janitor import run_janitor
from .records import Append, Dirs, LogOp, Put, SnapshotData, WireOp, log_from_wire, log_to_wire
from .shared import WRITABLE_SEGMENTS
from .shm import read_segment_bytes, segment_dirs, write_segment
from .view import HELD_SEGMENTS

__all__ = [
    "VALUE_PREFIX",
    "ValueSnapshot",
    "hold_snapshot",
    "pack_log",
    "read_segment",
    "release_snapshot",
    "unpack_log",
    "value_snapshot",
    "worker_dirs",
]

_WITH_VALUE = (Put, Append)  # the write-log operations that carry an encoded value

# How a segment sent by value is named in a worker. Not a path that can exist, so that a
# lookup that misses fails loudly ("segment is gone") instead of mapping a file that only
# happens to be there because the worker runs on the driver's machine.
VALUE_PREFIX = "@value:"


@dataclass(frozen=True, slots=True)
class ValueSnapshot:
    """A store snapshot as it travels by value (once per store version).

    Attributes:
        store_uid: the store's id (``SnapshotData.store_uid``).
        version: the store version.
        index: key -> encoded value, each segment renamed ``VALUE_PREFIX + driver path``.
        segments: the renamed segments; their bytes travel beside, in this order.
        sources: the driver's segments (path, size), in the same order.
    """

    store_uid: str
    version: int
    index: dict[str, Encoded]
    segments: tuple[str, ...]
    sources: tuple[Ref, ...]

    def __reduce__(self) -> Any:
        # ``sources`` is driver-side bookkeeping: a worker needs none of it.
        return (ValueSnapshot, (self.store_uid, self.version, self.index, self.segments, ()))


def _map_enc(enc: Encoded, rename: Any) -> Encoded:
    payload, refs = enc
    new_payload = payload if isinstance(payload, bytes) else rename(payload)
    return (new_payload, tuple(rename(r) for r in refs))


def value_snapshot(data: SnapshotData) -> ValueSnapshot:
    """The by-value form of a snapshot (driver side); its segments' bytes are not read here.

    A segment's name depends only on its path, so an executor can send each segment once
    and reuse it across store versions; a segment that ``SharedStore.array()`` handed out
    writable may change between versions, so its name carries the version too.
    """
    uid, version, index = data.store_uid, data.version, data.index
    names: dict[str, str] = {}
    sources: list[Ref] = []

    def rename(ref: Ref) -> Ref:
        name = names.get(ref[0])
        if name is None:
            name = VALUE_PREFIX + ref[0]
            if ref[0] in WRITABLE_SEGMENTS:
                name += f"#v{version}"
            names[ref[0]] = name
            sources.append(ref)
        return (name, ref[1])

    renamed = {key: _map_enc(enc, rename) if all_refs(enc) else enc for key, enc in index.items()}
    return ValueSnapshot(uid, version, renamed, tuple(names[r[0]] for r in sources), tuple(sources))


def read_segment(ref: Ref) -> bytes:
    """The bytes of a segment file (driver side: to send them by value)."""
    return read_segment_bytes(ref[0], ref[1])


# -- worker side -----------------------------------------------------------------------------

_lock = threading.Lock()
_holds: dict[str, int] = {}
_dirs: Dirs | None = None


def worker_dirs() -> Dirs:
    """This process's own segment directories (tmpfs when usable, and the temp dir).

    Created once per process, removed at its exit; the janitor of any later cano_mp process
    on the machine removes them if the process was killed.
    """
    global _dirs
    if _dirs is None:
        run_janitor()
        _dirs = segment_dirs(f"w{os.getpid()}")
    return _dirs


def _as_view(data: Any) -> memoryview:
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view.toreadonly()


def hold_snapshot(snap: ValueSnapshot, data: Sequence[Any]) -> SnapshotData:
    """Serve ``snap``'s segments from ``data`` (bytes-like, in ``snap.segments`` order) and
    return the snapshot as a task store reads it; pair with :func:`release_snapshot`."""
    if len(data) != len(snap.segments):
        raise ValueError(
            f"snapshot {snap.store_uid} v{snap.version} has {len(snap.segments)} segments, "
            f"got {len(data)} buffers"
        )
    with _lock:
        for name, buf in zip(snap.segments, data, strict=True):
            count = _holds.get(name, 0)
            if count == 0:
                HELD_SEGMENTS[name] = _as_view(buf)
            _holds[name] = count + 1
    return SnapshotData(snap.store_uid, snap.version, worker_dirs(), snap.index)


def release_snapshot(snap: ValueSnapshot) -> None:
    """End one use of ``snap``'s segments (values still referenced stay valid: they keep
    their buffers alive)."""
    with _lock:
        for name in snap.segments:
            count = _holds.get(name, 0) - 1
            if count <= 0:
                _holds.pop(name, None)
                HELD_SEGMENTS.pop(name, None)
            else:
                _holds[name] = count


def pack_log(log: list[WireOp]) -> tuple[list[WireOp], dict[str, bytes]]:
    """Read the segments a successful call's write log refers to, and delete their files.

    Returns the log unchanged (its references name this worker's files) and their bytes by
    path, for :func:`unpack_log` in the driver.
    """
    data: dict[str, bytes] = {}
    for op in log_from_wire(log):
        if isinstance(op, _WITH_VALUE):
            for ref in all_refs(op.enc):
                if ref[0] not in data:
                    data[ref[0]] = read_segment(ref)
    for path in data:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return log, data


def unpack_log(log: list[WireOp], data: Mapping[str, Any], dirs: Dirs) -> list[WireOp]:
    """Write a packed log's segments into a store's directories (driver side) and return
    the log with its references renamed to them.

    Each segment keeps the file name the worker gave it (``<token>-<n>``), so that the
    engine discards an attempt's segments by its token exactly as for its own pool.
    Large buffers land in shared memory again, and are read zero-copy on this machine.
    """
    if not data:
        return log
    written: dict[str, Ref] = {}
    try:
        for path, buf in data.items():
            name = os.path.basename(path)
            if not name or name.startswith(".") or name != path.rsplit("/", 1)[-1]:
                raise ValueError(f"unexpected segment name {path!r} in a write log")
            view = _as_view(buf)
            target = write_segment(dirs, name, view)
            written[path] = (target, view.nbytes)
    except BaseException:
        for ref in written.values():
            try:
                os.unlink(ref[0])
            except FileNotFoundError:
                pass
        raise

    def rename(ref: Ref) -> Ref:
        return written[ref[0]]

    out: list[LogOp] = []
    for op in log_from_wire(log):
        if isinstance(op, _WITH_VALUE):
            out.append(type(op)(op.key, _map_enc(op.enc, rename)))
        else:
            out.append(op)
    return log_to_wire(out)
