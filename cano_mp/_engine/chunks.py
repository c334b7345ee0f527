"""ChunkSizer: how many items a BatchTask chunk carries (pure arithmetic, no I/O); and the
records of a batch's chunks and items as the driver tracks them."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Chunk",
    "Items",
    "MAX_CHUNK_BYTES",
    "MAX_CHUNK_ITEMS",
    "MAX_ITEMS_IN_FLIGHT",
    "TARGET_CHUNK_SECONDS",
    "ChunkSizer",
]

# Auto chunking: aim for calls of about this many seconds of work. Long enough that the
# gap between two chunks on a worker (0.1-0.5 ms on a busy machine: the driver has to be
# scheduled to send the next) is noise; short enough that the last chunks balance.
TARGET_CHUNK_SECONDS = 0.1
MAX_CHUNK_ITEMS = 100_000
# Items in flight at once, all chunks together (auto chunking): bounds the driver's memory
# for a generator however many workers there are.
MAX_ITEMS_IN_FLIGHT = 500_000
# Bound on the pickled size of one chunk: large items belong in the store (send keys).
MAX_CHUNK_BYTES = 8 << 20
# With a known item count, at least this many chunks per worker (load balance).
MIN_CHUNKS_PER_WORKER = 4


class ChunkSizer:
    """Chooses chunk sizes: fixed, or from the measured time and size per item (as joblib's
    auto batching does)."""

    def __init__(
        self,
        fixed: int | None,
        workers: int,
        total: int | None,
        in_flight: int = 1,
        target: float = TARGET_CHUNK_SECONDS,
        eager: bool = False,
    ) -> None:
        self.fixed = fixed
        self.target = target
        self.size = 1
        self.per_item: float | None = None
        self._seconds = 0.0
        self._items = 0.0
        self.bytes_per_item: float | None = None
        self.cap = max(1, min(MAX_CHUNK_ITEMS, MAX_ITEMS_IN_FLIGHT // max(1, in_flight)))
        if total is not None:
            self.cap = max(1, min(self.cap, math.ceil(total / (workers * MIN_CHUNKS_PER_WORKER))))
            if eager:  # a high-latency executor: start balanced, not from one item
                self.size = self.cap

    def next(self) -> int:
        if self.fixed is not None:
            return self.fixed
        size = min(self.size, self.cap)
        if self.bytes_per_item:
            size = min(size, int(MAX_CHUNK_BYTES / self.bytes_per_item))
        return max(1, size)

    def observe(self, items: int, seconds: float) -> None:
        if items <= 0 or seconds <= 0:
            return
        # Seconds per item over recent chunks, weighted by their items (halved per chunk):
        # a big chunk outweighs the fixed cost that dominates a chunk of one item.
        self._seconds = self._seconds / 2 + seconds
        self._items = self._items / 2 + items
        self.per_item = self._seconds / self._items
        self.size = max(1, min(MAX_CHUNK_ITEMS, int(self.target / self.per_item)))

    def observe_bytes(self, items: int, nbytes: int) -> None:
        if items > 0:
            b = nbytes / items
            prev = self.bytes_per_item
            self.bytes_per_item = b if prev is None else (prev + b) / 2


@dataclass(eq=False, slots=True)
class Chunk:
    indices: range | list[int]
    items: Sequence[Any]
    attempt: int
    future: Future[Any] | None = None
    submitted: float = 0.0
    check_at: float | None = None  # when to look at its items' timeouts next
    quota: bool = False


@dataclass(eq=False)
class Items:
    """Where the items of one batch are (the driver's side of a BatchState)."""

    results: list[Any] = field(default_factory=list)
    running: set[Chunk] = field(default_factory=set)
    stopping: set[Chunk] = field(default_factory=set)  # timed out, not stopped yet
    done: deque[Chunk] = field(default_factory=deque)
    requeued: deque[Chunk] = field(default_factory=deque)
    retries: list[tuple[float, int, int, Any, int]] = field(default_factory=list)
    outstanding: int = 0
    exhausted: bool = False
    fatal: BaseException | None = None
    failures_logged: int = 0

    @property
    def finished(self) -> bool:
        return self.exhausted and not self.running and not self.requeued and not self.retries


def _part(ch: Chunk, ks: Sequence[int]) -> Chunk:
    return Chunk([ch.indices[k] for k in ks], [ch.items[k] for k in ks], ch.attempt)


def split_at(
    ch: Chunk, block: tuple[int, int] | None, position: int | None
) -> tuple[list[Chunk], int | None]:
    """A chunk stopped (timeout, crash) at ``position``, inside ``block`` (``(start,
    length)`` of quick items run together) if any: the chunks to send again, uncharged, and
    the position in ``ch`` of the one item that spends an attempt (None: cannot tell which,
    so each suspect goes alone and nobody is charged)."""
    n = len(ch.items)
    again: list[Chunk] = []
    suspects = list(range(n))
    if block is not None:  # one of a block of quick items: each goes alone, uncharged
        suspects = list(range(block[0], min(n, block[0] + block[1])))
        position = suspects[0] if len(suspects) == 1 else None
    if position is None or position not in suspects:
        if len(suspects) != 1:
            rest = [k for k in range(n) if k not in suspects]
            again = ([_part(ch, rest)] if rest else []) + [_part(ch, [k]) for k in suspects]
            return again, None
        position = suspects[0]
    rest = [k for k in range(n) if k != position]
    return ([_part(ch, rest)] if rest else []), position
