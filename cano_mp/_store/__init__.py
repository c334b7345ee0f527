"""The store: state shared by the driver and the workers (see the modules for the details)."""

from .shared import (
    HELD_SEGMENTS,
    WRITABLE_SEGMENTS,
    LogOp,
    ReadOnlyStore,
    SharedStore,
    Snapshot,
    SnapshotData,
    TaskStore,
    discard_segments,
)

__all__ = [
    "HELD_SEGMENTS",
    "WRITABLE_SEGMENTS",
    "LogOp",
    "ReadOnlyStore",
    "SharedStore",
    "Snapshot",
    "SnapshotData",
    "TaskStore",
    "discard_segments",
]
