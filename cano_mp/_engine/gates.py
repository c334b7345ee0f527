"""What an attempt must pass in the driver before it is sent: its task's rate limit, then
its circuit breaker (``TaskConfig(rate_limit=..., circuit_breaker=...)``).

::

    waiting --rate limit: wait W--> (sleep on the run's event until now + W; no slot held)
       \\--tokens taken--> breaker open? --yes--> the attempt fails now with CircuitOpen
                                       \\--no--> submit (the timeout starts ticking here)

A refused attempt is an attempt: the retry policy decides what follows, as for a failure.
Outcomes go back to the breaker from the driver: a success closes or keeps it closed;
failures, timeouts and crashes count against it; a cancelled probe gives its place back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .._errors import CircuitOpen
from .._resilience import CircuitBreaker
from .attempts import Subject
from .scope import RunScope

__all__ = ["admitted", "rate_wait", "record", "refused_items", "release"]


def rate_wait(scope: RunScope, subject: Subject, n: int, told: bool) -> float:
    """Take ``n`` from the subject's rate limit: 0.0 when taken (or none is set), else the
    seconds to sleep before asking again (observers told once per wait, unless ``told``)."""
    limiter = subject.config.rate_limit
    if limiter is None:
        return 0.0
    wait = limiter.try_acquire(n)
    if wait > 0.0 and not told and scope.observers:
        scope.observers.emit(
            "on_rate_wait",
            scope.info,
            subject.state,
            subject.label(),
            getattr(limiter, "name", repr(limiter)),
            wait,
        )
    return wait


def admitted(scope: RunScope, subject: Subject) -> CircuitOpen | None:
    """``None`` when the subject's breaker (if any) lets the attempt go; else the error the
    attempt fails with (observers told)."""
    breaker = subject.config.circuit_breaker
    if breaker is None:
        return None
    wait = breaker._admit()
    if wait is None:
        return None
    if scope.observers:
        scope.observers.emit(
            "on_circuit_open", scope.info, subject.state, subject.label(), breaker.name
        )
    refusal = breaker._refusal(wait)
    err = CircuitOpen(
        f"{subject.where()} was not started: {refusal}",
        state=subject.state,
        task_name=subject.task,
    )
    err.breaker, err.retry_after = refusal.breaker, refusal.retry_after
    return err


def refused_items(
    scope: RunScope, subject_of: Callable[[int], Subject], indices: Sequence[int]
) -> dict[int, CircuitOpen]:
    """The positions of a batch chunk's items that the breaker refuses, with their errors
    (each item is one call to the breaker: half-open lets only its probes through)."""
    refused: dict[int, CircuitOpen] = {}
    for k, index in enumerate(indices):
        subject = subject_of(index)
        if subject.config.circuit_breaker is None:
            break
        err = admitted(scope, subject)
        if err is not None:
            refused[k] = err
    return refused


def record(breaker: CircuitBreaker | None, error: BaseException | None, count: int = 1) -> None:
    """Tell ``breaker`` how ``count`` attempts ended: ``error`` None is success; a refusal
    by the breaker itself is not news to it."""
    if breaker is None or isinstance(error, CircuitOpen):
        return
    if error is None:
        breaker._record(True, count)
    else:
        for _ in range(count):
            breaker._record(False)


def release(breaker: CircuitBreaker | None) -> None:
    """A cancelled attempt: no verdict (a half-open probe's place is given back)."""
    if breaker is not None:
        breaker._release()
