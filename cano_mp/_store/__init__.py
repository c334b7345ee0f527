"""The store: key-value state shared by the driver and the workers, in shared memory.

::

    driver process                                          worker process (or inline)
    --------------                                          --------------------------
    SharedStore() -> shared.DriverStore
      index: key -> encoded value (codec: pickle 5,
             large buffers in segment files, shm)
      | _take_snapshot(), once per store version
      v
    shared.Snapshot (keeps its segments alive)
      .data() = records.SnapshotData(store_uid, ---------> view.TaskStore(snapshot, token)
                version, dirs, index)                        reads: own writes, then the
      serialise_snapshot(): a plain tuple, pickled           index; segments mapped
      once per version (the engine's Blob)                   read-only, zero-copy
                                                           writes: an overlay + a write log
                                                             of records (Put, Delete,
                                                             Append, Clear); large values ->
                                                             new files "<token>-<n>"
    DriverStore._commit(log)   <------------------------  _finish(ok): the log, compacted,
      only when the attempt succeeded, in branch-index        as plain tuples (log_to_wire)
      order for a split; named again (log_from_wire),
      its segments adopted by the index
    discard_segments(dirs, token): a failed, timed-out,
      crashed or cancelled attempt's files, by its token

What each module owns:

- ``base``: :class:`SharedStore`, the public interface users type against
  (``run(self, store: SharedStore)``), with the read-side helpers every store shares.
  ``SharedStore()`` builds a ``DriverStore``; a task's ``TaskStore`` is a SharedStore too
  (``isinstance`` holds in a task), but neither inherits the other's machinery.
- ``shared``: ``DriverStore`` (index, segments, lock, snapshots, commits) and ``Snapshot``.
- ``view``: ``TaskStore`` and ``ReadOnlyStore`` (``BatchTask.process``), built per call.
- ``records``: the records that cross a process boundary (``SnapshotData``, the write-log
  operations): named types in code, plain tuples on the wire (pickle looks a named type's
  class up by import on both sides of every message; see its docstring for the cost).
- ``codec``: encoding values (pickle protocol 5, buffers out of band, in segments).
- ``shm``: private segment directories and files (the security checks live there);
  ``janitor``: removing what killed processes left.
- ``byvalue``: snapshots and logs sent as bytes to workers that cannot map the driver's
  files (Dask workers on other machines).

The package imports only ``_errors`` and ``_log`` from the rest of cano_mp (and, lazily,
``_signals``, a leaf, to install the SIGTERM cleanup when shared memory is first used).
"""

from .base import SharedStore
from .records import (
    Append,
    Clear,
    Delete,
    Dirs,
    LogOp,
    Put,
    SnapshotData,
    WireOp,
    WireSnapshot,
    log_from_wire,
    log_to_wire,
    serialise_snapshot,
)
from .shared import WRITABLE_SEGMENTS, DriverStore, Snapshot, discard_segments, driver_store
from .view import HELD_SEGMENTS, ReadOnlyStore, TaskStore

__all__ = [
    "HELD_SEGMENTS",
    "WRITABLE_SEGMENTS",
    "Append",
    "Clear",
    "Delete",
    "Dirs",
    "DriverStore",
    "LogOp",
    "Put",
    "ReadOnlyStore",
    "SharedStore",
    "Snapshot",
    "SnapshotData",
    "TaskStore",
    "WireOp",
    "WireSnapshot",
    "discard_segments",
    "driver_store",
    "log_from_wire",
    "log_to_wire",
    "serialise_snapshot",
]
