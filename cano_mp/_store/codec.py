"""Encoding store values: pickle protocol 5 with large buffers out of band, in segments.

An *encoded value* is ``(payload, refs)``:

- ``payload``: the pickle bytes, or a ``ref`` to a segment holding them when they are large
  (so a snapshot index stays small however big the values are);
- ``refs``: one ``(path, nbytes)`` per out-of-band buffer (a numpy array's data...), each in a
  segment file. Reading maps the segment and hands the mapping to ``pickle.loads`` as the
  buffer: the array is zero-copy and read-only.

Values are pickled with cloudpickle, so objects whose classes are defined in ``__main__`` or
a notebook cell travel to workers too.
"""

from __future__ import annotations

import ctypes
import pickle
from collections.abc import Callable
from typing import Any

import cloudpickle

__all__ = [
    "INLINE_BUFFER_MAX",
    "INLINE_PAYLOAD_MAX",
    "Encoded",
    "Ref",
    "decode",
    "encode",
    "error_payload",
]

# Buffers below this size stay inside the pickle: a segment costs a file, an mmap and a
# few syscalls to read (~20 µs), which only pays off for large buffers.
INLINE_BUFFER_MAX = 64 * 1024
# Pickles above this size are moved into a segment, so that the snapshot index serialised
# for each store version stays small.
INLINE_PAYLOAD_MAX = 256 * 1024

Ref = tuple[str, int]
Encoded = tuple[bytes | Ref, tuple[Ref, ...]]

# (path, nbytes) for a new segment holding data; returns the ref
Writer = Callable[[memoryview], Ref]
# address -> ref of a writable segment already holding that buffer (store.array())
Known = Callable[[memoryview], Ref | None]
Mapper = Callable[[Ref], memoryview]


def buffer_address(view: memoryview) -> int | None:
    """Address of a writable buffer's first byte, or None for read-only buffers."""
    if view.readonly or view.nbytes == 0:
        return None
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view.cast("B")))
    except (TypeError, ValueError):
        return None


def _contiguous(value: Any) -> Any:
    # Pickle 5 passes only contiguous buffers out of band; a strided array (a[::2]) would be
    # copied into the pickle. Make the top-level array contiguous once instead.
    flags = getattr(value, "flags", None)
    if flags is not None and type(value).__module__ == "numpy":
        if not (flags.c_contiguous or flags.f_contiguous):
            import numpy as np

            return np.ascontiguousarray(value)
    return value


def encode(value: Any, write: Writer, known: Known | None = None) -> Encoded:
    """Pickle ``value``, moving large buffers into segments created by ``write``."""
    refs: list[Ref] = []

    def on_buffer(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        # An array from store.array() stays a reference to its segment whatever its size:
        # its owner keeps filling it in place, and a copy taken now would hold zeros.
        ref = known(raw) if known is not None and not raw.readonly else None
        if ref is not None:
            refs.append(ref)
            return False
        if raw.nbytes < INLINE_BUFFER_MAX:
            return True  # keep in band
        refs.append(write(raw))
        return False

    payload = cloudpickle.dumps(_contiguous(value), protocol=5, buffer_callback=on_buffer)
    if len(payload) > INLINE_PAYLOAD_MAX:
        return (write(memoryview(payload)), tuple(refs))
    return (payload, tuple(refs))


def decode(enc: Encoded, mapper: Mapper) -> Any:
    """Rebuild a value; out-of-band buffers are read-only mappings of their segments."""
    payload, refs = enc
    data: bytes | memoryview = payload if isinstance(payload, bytes) else mapper(payload)
    if refs:
        return pickle.loads(data, buffers=[mapper(r) for r in refs])
    return pickle.loads(data)


def error_payload(exc: BaseException, remote: bool) -> Any:
    """A task's exception as it travels back from a call: itself (inline), its cloudpickle
    bytes (remote), or ``("unpicklable", type name, message)``."""
    if not remote:
        return exc
    try:
        return cloudpickle.dumps(exc)
    except Exception:
        return ("unpicklable", type(exc).__qualname__, str(exc))


def all_refs(enc: Encoded) -> tuple[Ref, ...]:
    payload, refs = enc
    if isinstance(payload, bytes):
        return refs
    return (payload, *refs)
