"""Split/join: strategies, configuration, results, and the pure join decision.

The decision is a function of counts, never of processes: :func:`decide` is tested
exhaustively without a pool, and the engine only acts on what it returns.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from ._durations import limit
from ._errors import CanoError, ConfigError
from ._public import public

if TYPE_CHECKING:
    from ._errors import TaskError

__all__ = ["Decision", "JoinConfig", "JoinError", "JoinStrategy", "SplitResult", "decide"]

S = TypeVar("S", bound=Hashable)
Decision = Literal["proceed", "fail", "wait"]
_Kind = Literal["all", "any", "quorum", "percentage", "partial_results", "partial_timeout"]


@dataclass(frozen=True, slots=True)
class JoinStrategy:
    """When a split's join proceeds. Build with the class methods::

    JoinStrategy.all()                 # every branch succeeds
    JoinStrategy.any()                 # the first success; the rest are cancelled
    JoinStrategy.quorum(2)             # at least 2 successes, once all have finished
    JoinStrategy.percentage(0.75)      # at least ceil(75%) successes, once all finished
    JoinStrategy.partial_results(2)    # the 2nd success; the rest are cancelled
    JoinStrategy.partial_timeout()     # all finished, or the join timeout with >= 1 done
    """

    kind: _Kind
    n: int | None = None
    p: float | None = None

    @classmethod
    def all(cls) -> JoinStrategy:
        """Every branch must succeed; fails at the first failure."""
        return cls("all")

    @classmethod
    def any(cls) -> JoinStrategy:
        """Proceeds at the first success and cancels the rest."""
        return cls("any")

    @classmethod
    def quorum(cls, n: int) -> JoinStrategy:
        """At least ``n`` successes; waits for every branch (keeps all their writes)."""
        _check_n(n, "quorum")
        return cls("quorum", n=n)

    @classmethod
    def percentage(cls, p: float) -> JoinStrategy:
        """At least ``ceil(p * branches)`` successes, ``p`` in (0, 1]; waits for all."""
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 < p <= 1.0:
            raise ConfigError(f"percentage must be a number within (0, 1], got {p!r}")
        return cls("percentage", p=float(p))

    @classmethod
    def partial_results(cls, n: int) -> JoinStrategy:
        """Proceeds at the ``n``-th success and cancels the rest."""
        _check_n(n, "partial_results")
        return cls("partial_results", n=n)

    @classmethod
    def partial_timeout(cls) -> JoinStrategy:
        """Proceeds when all have finished, or at the join timeout with >= 1 completed."""
        return cls("partial_timeout")

    def required(self, total: int) -> int:
        """Successes needed out of ``total`` branches (completions for partial_timeout)."""
        if self.kind == "all":
            return total
        if self.kind == "any":
            return 1
        if self.kind in ("quorum", "partial_results"):
            assert self.n is not None
            return self.n
        if self.kind == "percentage":
            assert self.p is not None
            # In binary floating point 0.3 * 10 is 3.0000000000000004: a product within a
            # few ulps of an integer is that integer, anything further is rounded up.
            x = self.p * total
            k = round(x)
            if abs(x - k) <= 4 * sys.float_info.epsilon * max(1.0, x):
                return max(1, k)
            return max(1, math.ceil(x))
        return 1

    def __repr__(self) -> str:
        arg = (
            "" if self.n is None and self.p is None else repr(self.n if self.p is None else self.p)
        )
        return f"JoinStrategy.{self.kind}({arg})"


def _check_n(n: object, name: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{name}(n) needs an int n >= 1, got {n!r}")


def decide(
    strategy: JoinStrategy,
    successes: int,
    failures: int,
    pending: int,
    timed_out: bool = False,
) -> Decision:
    """The join decision for the given counts.

    ``pending`` counts branches not yet finished (running, waiting to retry, or not yet
    started). Returns ``"proceed"`` (move to the join state, cancelling what still runs),
    ``"fail"`` (raise ``JoinError``, cancelling what still runs) or ``"wait"``. Never
    ``"wait"`` once the outcome is decided, nor when ``timed_out``.
    """
    total = successes + failures + pending
    kind = strategy.kind
    if kind == "partial_timeout":
        if pending == 0:
            return "proceed" if total > 0 else "fail"
        if timed_out:
            return "proceed" if successes + failures >= 1 else "fail"
        return "wait"
    need = strategy.required(total)
    if successes + pending < need:
        return "fail"
    early = kind in ("any", "partial_results")
    if successes >= need and (early or pending == 0 or timed_out):
        return "proceed"
    if timed_out:
        return "fail"
    return "wait"


@dataclass(frozen=True, slots=True)
class JoinConfig(Generic[S]):
    """How a split joins: the strategy, the state to go to, and limits.

    Args:
        strategy: a :class:`JoinStrategy`.
        join_state: the state the workflow moves to when the join proceeds.
        timeout: seconds the join may take; at the timeout it decides with what it has.
            ``None`` or ``math.inf``: no limit (a ``timedelta`` is accepted).
        max_parallel: bulkhead: at most this many branches run at once.
        result_key: store the :class:`SplitResult` under this key.
    """

    strategy: JoinStrategy
    join_state: S
    timeout: float | None = None
    max_parallel: int | None = None
    result_key: str | None = None

    def __init__(
        self,
        strategy: JoinStrategy,
        join_state: S,
        *,
        timeout: float | timedelta | None = None,
        max_parallel: int | None = None,
        result_key: str | None = None,
    ) -> None:
        if not isinstance(strategy, JoinStrategy):
            raise ConfigError(f"strategy must be a JoinStrategy, got {strategy!r}")
        seconds = limit(timeout, "join timeout")
        if seconds is None and timeout is not None and strategy.kind == "partial_timeout":
            raise ConfigError(
                f"JoinStrategy.partial_timeout() needs a finite join timeout, got {timeout!r}"
            )
        if max_parallel is not None and (
            isinstance(max_parallel, bool) or not isinstance(max_parallel, int)
        ):
            raise ConfigError(f"max_parallel must be an int, got {max_parallel!r}")
        if result_key is not None and not isinstance(result_key, str):
            raise ConfigError(f"result_key must be a str, got {result_key!r}")
        object.__setattr__(self, "strategy", strategy)
        object.__setattr__(self, "join_state", join_state)
        object.__setattr__(self, "timeout", seconds)
        object.__setattr__(self, "max_parallel", max_parallel)
        object.__setattr__(self, "result_key", result_key)


@dataclass(slots=True)
class SplitResult(Generic[S]):
    """What a split's branches did.

    Attributes:
        successes: ``(branch index, state it returned)`` for each successful branch.
        errors: ``(branch index, TaskError)`` for each failed branch (``TaskTimeout`` and
            ``WorkerCrashed`` included; ``__cause__`` is the original exception).
        cancelled: indexes of branches stopped or never started.
    """

    successes: list[tuple[int, S]] = field(default_factory=list)
    errors: list[tuple[int, TaskError]] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    total: int = 0

    @property
    def completed_count(self) -> int:
        """Successes + errors."""
        return len(self.successes) + len(self.errors)

    @property
    def total_count(self) -> int:
        """Number of branches."""
        return self.total

    def __repr__(self) -> str:
        return (
            f"SplitResult({len(self.successes)} succeeded, {len(self.errors)} failed, "
            f"{len(self.cancelled)} cancelled, of {self.total})"
        )

    def _repr_html_(self) -> str:
        rows = []
        for i, st in self.successes:
            rows.append((i, "success", str(st)))
        for i, err in self.errors:
            rows.append((i, "error", f"{type(err).__name__}: {err}"))
        for i in self.cancelled:
            rows.append((i, "cancelled", ""))
        rows.sort()
        import html

        body = "".join(
            f"<tr><td>{i}</td><td>{k}</td><td>{html.escape(d)}</td></tr>" for i, k, d in rows
        )
        return (
            f"<table><caption>{html.escape(repr(self))}</caption>"
            f"<tr><th>branch</th><th>outcome</th><th>detail</th></tr>{body}</table>"
        )


class JoinError(CanoError):
    """A split's join strategy failed: ``.result`` holds the ``SplitResult``.

    ``timed_out`` is True when the join's timeout expired before the strategy was met.
    """

    def __init__(self, message: str, *, result: SplitResult[Any], timed_out: bool = False) -> None:
        super().__init__(message)
        self.result = result
        self.timed_out = timed_out


public(JoinConfig, JoinError, JoinStrategy, SplitResult)
