"""``SharedStore``, the store as users type it, and the helpers every store shares.

:class:`SharedStore` is the public interface: the mapping API of API.md, what a task's
``run(self, store: SharedStore)`` receives and what ``Workflow(store=...)`` takes. Two
classes implement it, and neither inherits the other's machinery:

- ``shared.DriverStore``, the store itself (the driver process): the index, the segments,
  snapshots, commits. ``SharedStore()`` builds one, as ``pathlib.Path()`` builds a
  ``PosixPath``: users never name it.
- ``view.TaskStore``, what a task sees (a worker, or the driver for inline tasks and a
  ``BatchTask``'s ``load`` and ``finish``): a snapshot, the task's own writes, a write log.
  ``view.ReadOnlyStore`` is a TaskStore that refuses writes (``BatchTask.process``).

So ``isinstance(store, SharedStore)`` holds inside a task as in the driver, and mypy checks
``run(self, store: SharedStore)`` against both; the engine asks for a ``DriverStore``
(:func:`shared.driver_store`) where it needs one.
"""

from __future__ import annotations

import mmap
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast, overload

from .._errors import StoreError, StoreKeyError
from .._public import public
from .codec import Encoded, Ref, Writer, buffer_address, encode
from .mapcache import prefault

if TYPE_CHECKING:
    from typing import Self

    import numpy as np
    import numpy.typing as npt

__all__ = ["MISSING", "SharedStore", "Writable", "appended", "check_key", "encode_for"]

T = TypeVar("T")

MISSING: Any = object()


class SharedStore:
    """Key-value state shared by the driver and the pool's workers.

    Keys are ``str``. Values are pickled when put (a value that cannot be pickled fails at
    once with :class:`StoreError`); large buffers — numpy arrays and anything pickle
    protocol 5 passes out of band — live in shared memory and are read in workers without
    copying, as read-only arrays::

        with SharedStore() as store:
            store["rows"] = np.arange(10_000_000.0)
            out = store.array("out", (100, 100), "float64")   # writable, in shared memory
            flow.orchestrate(store=store)

    Tasks see a snapshot taken when they start; their writes count only if they succeed.
    ``close()`` (or leaving the ``with`` block) releases all shared memory; so does
    interpreter exit.

    ``SharedStore()`` makes the store; a task receives a view of it, also a ``SharedStore``
    (the same methods; ``close()`` does nothing there).
    """

    # Reprs, docs and pickles of the class name the public home.
    __module__ = "cano_mp"

    # The class SharedStore() builds: shared.DriverStore (it sets this when defined).
    _driver: ClassVar[type[SharedStore]]

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        # SharedStore() is the driver's store; a subclass (a task's view) builds itself.
        return cast("Self", object.__new__(cls._driver if cls is SharedStore else cls))

    def __init__(self) -> None:
        """A new, empty store, owned by this (the driver) process."""

    # -- implemented by each store ----------------------------------------------------------
    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (replacing what was there)."""
        raise _unimplemented(self, "put")

    @overload
    def get(self, key: str) -> Any: ...
    @overload
    def get(self, key: str, default: T) -> Any | T: ...

    def get(self, key: str, default: Any = None) -> Any:
        """The value under ``key``, or ``default`` when absent.

        Every call returns a fresh copy of small values; arrays in shared memory come back
        as read-only views (no copy).
        """
        raise _unimplemented(self, "get")

    def remove(self, key: str) -> None:
        """Delete ``key``; a missing key raises :class:`StoreKeyError`."""
        raise _unimplemented(self, "remove")

    def append(self, key: str, item: Any) -> None:
        """Append ``item`` to the list under ``key``, creating the list when absent."""
        raise _unimplemented(self, "append")

    def keys(self) -> list[str]:
        """The keys, in insertion order."""
        raise _unimplemented(self, "keys")

    def clear(self) -> None:
        """Remove every key (shared memory no snapshot uses is released at once)."""
        raise _unimplemented(self, "clear")

    def array(
        self, key: str, shape: int | tuple[int, ...], dtype: npt.DTypeLike = "float64"
    ) -> np.ndarray[Any, Any]:
        """Allocate a zero-filled writable numpy array in shared memory, stored under ``key``.

        Fill it in place; tasks that start afterwards read it without copying. Writes made
        to it after a task started are visible to that task (the array is shared, not
        snapshotted).
        """
        raise _unimplemented(self, "array")

    def concatenate(
        self, key: str, arrays: Sequence[npt.ArrayLike], axis: int = 0
    ) -> np.ndarray[Any, Any]:
        """Join ``arrays`` along ``axis`` into a new shared-memory array stored under ``key``
        (as :meth:`array` makes it), and return it.

        One copy, straight into shared memory: nothing is concatenated in private memory
        first, nothing copied again when stored. Meant for a ``BatchTask``'s ``finish()``,
        whose large numpy results arrive from the workers through shared memory::

            def finish(self, store, results):       # results: one array per item
                store.concatenate("rows", results)  # tasks read store["rows"], zero-copy
                return Step.NEXT

        Raises ``ValueError`` (and stores nothing) when the arrays cannot be joined.
        """
        import numpy as np

        parts = [np.asarray(a) for a in arrays]
        if not parts:
            raise ValueError(f"store.concatenate({key!r}): no arrays to join")
        first = parts[0]
        if first.ndim == 0:
            raise ValueError(f"store.concatenate({key!r}): 0-d arrays cannot be joined")
        ax = axis + first.ndim if axis < 0 else axis
        if not 0 <= ax < first.ndim:
            raise ValueError(f"store.concatenate({key!r}): axis {axis} is out of range")
        rest = [s for i, s in enumerate(first.shape) if i != ax]
        for n, p in enumerate(parts):
            if p.ndim != first.ndim or [s for i, s in enumerate(p.shape) if i != ax] != rest:
                raise ValueError(
                    f"store.concatenate({key!r}): array {n} has shape {p.shape}, which does not "
                    f"join {first.shape} along axis {axis}"
                )
        shape = list(first.shape)
        shape[ax] = sum(p.shape[ax] for p in parts)
        out = self.array(key, tuple(shape), np.result_type(*parts))
        if out.nbytes >= 4 * 1024 * 1024:  # every page is written: map them all at once
            prefault(out.ctypes.data, out.nbytes, write=True)
        np.concatenate(parts, axis=ax, out=out)
        return out

    def close(self) -> None:
        """Release all shared memory of this store; idempotent. The store is unusable after."""
        raise _unimplemented(self, "close")

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        raise _unimplemented(self, "closed")

    def __contains__(self, key: object) -> bool:
        raise _unimplemented(self, "__contains__")

    def __len__(self) -> int:
        raise _unimplemented(self, "__len__")

    # -- the same for every store -----------------------------------------------------------
    def __setitem__(self, key: str, value: Any) -> None:
        self.put(key, value)

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, MISSING)
        if value is MISSING:
            raise StoreKeyError(f"no key {key!r} in the store (keys: {self._key_summary()})")
        return value

    def __delitem__(self, key: str) -> None:
        self.remove(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def _key_summary(self) -> str:
        keys = sorted(self.keys())
        shown = ", ".join(repr(k) for k in keys[:10])
        return shown + (f", ... {len(keys) - 10} more" if len(keys) > 10 else "") or "none"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise StoreError(
            "a SharedStore cannot be pickled into a task: tasks receive the store as their "
            "argument (run(self, store)); read what you need from it there"
        )


def _unimplemented(store: SharedStore, name: str) -> NotImplementedError:
    return NotImplementedError(
        f"{type(store).__qualname__} does not implement {name}: SharedStore is the interface "
        "of the driver's store and of a task's view; SharedStore() builds the store"
    )


def check_key(key: object) -> str:
    if not isinstance(key, str):
        raise StoreError(f"store keys must be str, got {type(key).__name__} {key!r}")
    return key


def encode_for(key: str, value: Any, write: Writer, writable: Writable) -> Encoded:
    """``codec.encode`` for the store: a value that cannot be pickled names its key."""
    try:
        return encode(value, write, writable.lookup)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(
            f"cannot store {key!r}: {type(value).__name__} value cannot be pickled ({exc}); "
            "store plain data (numbers, str, lists, dicts, numpy arrays) or make it picklable"
        ) from exc


def appended(key: str, current: Any, items: list[Any]) -> list[Any]:
    """The list under ``key`` (``current``, or ``MISSING``) with ``items`` appended."""
    if current is MISSING or current is None:
        return list(items)
    if not isinstance(current, list):
        raise StoreError(
            f"cannot append to {key!r}: it holds a {type(current).__name__}, not a list"
        )
    return [*current, *items]


class Writable:
    """Writable segments handed out by ``array()``, found again by buffer address."""

    def __init__(self) -> None:
        self._by_addr: dict[int, tuple[int, Ref, weakref.ref[Any]]] = {}

    def add(self, mm: mmap.mmap, ref: Ref, owner: Any) -> None:
        addr = buffer_address(memoryview(mm))
        if addr is not None:
            self._by_addr[addr] = (ref[1], ref, weakref.ref(owner))

    def lookup(self, view: memoryview) -> Ref | None:
        addr = buffer_address(view)
        if addr is None:
            return None
        hit = self._by_addr.get(addr)
        if hit is None or hit[0] != view.nbytes or hit[2]() is None:
            return None
        return hit[1]


public(SharedStore)
