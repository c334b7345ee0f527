"""The DaskExecutor's record of a call, and what its threads hand each other."""

from __future__ import annotations

import queue
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from .._executors.base import Job
from .remote import Layout

__all__ = ["Cancel", "DaskJob", "GatherFailed", "Refresh", "drain", "resolve"]


@dataclass(eq=False, slots=True)
class DaskJob(Job):
    """A call on a Dask cluster.

    ``call_id`` names it on the cluster (its cancel flag, its Dask key); ``dask`` is the
    ``distributed.Future`` of its current submission, ``resubmits`` how often it was sent
    again after Dask lost its inputs, and ``workers`` where it ran when it was cancelled.
    """

    call_id: str = ""
    layout: Layout | None = None
    dask: Any = None
    resubmits: int = 0
    workers: list[str] = field(default_factory=list)


class Cancel(NamedTuple):
    """To the control thread: stop ``job``, by force after ``grace`` seconds."""

    job: DaskJob
    grace: float


class Refresh(NamedTuple):
    """To the control thread: ask the scheduler how many threads the cluster has."""


@dataclass(frozen=True, slots=True)
class GatherFailed:
    """A finished call whose result could not be fetched."""

    error: BaseException


T = TypeVar("T")


def drain(q: queue.SimpleQueue[T | None], first: T | None) -> list[T] | None:
    """``first`` and whatever else is queued now; ``None`` once the queue says stop."""
    if first is None:
        return None
    items = [first]
    while True:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            return items
        if nxt is None:
            q.put(None)  # seen again by the next call: stop after this batch
            return items
        items.append(nxt)


def resolve(fut: Future[Any], *, value: Any = None, error: BaseException | None = None) -> None:
    """Resolve ``fut`` unless it is resolved already."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)
    except Exception:  # resolved already (InvalidStateError)
        pass
