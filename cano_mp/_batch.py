"""``BatchTask``: a data-parallel map over items that a workflow finds only at run time.

``load(store)`` runs in the driver and yields the items (a list, or a generator pulled
lazily); ``process(item)`` runs in the pool, items grouped into *chunks* so that one call
carries many items; ``finish(store, results)`` runs in the driver with the results in item
order and returns the next state. The worker side of a chunk is
``_calls.run_batch_chunk``; the driver side is ``_engine.batch_state``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from ._public import public
from ._retry import TaskConfig

if TYPE_CHECKING:
    from ._store import SharedStore

__all__ = ["BatchTask", "ItemFailure", "batch_problems"]

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

    Large results come back through shared memory: numpy arrays of 64 kB or more that
    ``process`` returns travel in one shared-memory segment per chunk, not through the pipe,
    and ``finish`` gets them as zero-copy (copy-on-write) arrays. Keep them as one array in
    the store with one copy: ``store.concatenate("table", results)``.
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


public(BatchTask, ItemFailure)
