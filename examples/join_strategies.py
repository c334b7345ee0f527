"""Every join strategy over the same four branches: two fast, one slow, one that fails.

    python examples/join_strategies.py

    branch 0  fast_a    succeeds after 0.5 s
    branch 1  fast_b    succeeds after 0.8 s
    branch 2  slow      succeeds after 2.5 s (polls task_context().cancelled())
    branch 3  failing   raises after 0.1 s

What each strategy does with them:

    all()                 fails fast at the failure: JoinError, the rest cancelled
    any()                 proceeds at the first success (fast_a), the rest cancelled
    quorum(2)             waits for every branch, then proceeds with 3 of 4 successes
    percentage(0.75)      needs ceil(0.75 * 4) = 3 successes: waits for all, proceeds
    partial_results(2)    proceeds at the 2nd success (fast_b); slow is cancelled
    partial_timeout()     proceeds at the 1.5 s join timeout with what completed

Each run prints its SplitResult (as an Observer's ``on_split_end`` receives it): successes,
errors (with the original exception) and the branches that were cancelled.
"""

from __future__ import annotations

import time
from enum import Enum, auto

from cano_mp import (
    JoinConfig,
    JoinError,
    JoinStrategy,
    Observer,
    ProcessExecutor,
    RunInfo,
    SharedStore,
    SplitResult,
    Task,
    TaskConfig,
    Workflow,
    task_context,
)


class Step(Enum):
    SPLIT = auto()
    JOINED = auto()


class Source(Task[Step]):
    """Works for ``seconds`` (polling the cancel flag), then succeeds or fails."""

    config = TaskConfig.minimal()  # no retries: a failure shows at once

    def __init__(self, name: str, seconds: float, fails: bool = False) -> None:
        self._name, self.seconds, self.fails = name, seconds, fails

    @property
    def name(self) -> str:
        return self._name

    def run(self, store: SharedStore) -> Step:
        ctx = task_context()
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            if ctx.cancelled():  # the join no longer needs this branch: stop early
                return Step.JOINED  # (its writes are discarded anyway)
            time.sleep(0.02)
        if self.fails:
            raise ConnectionError(f"{self._name}: source unreachable")
        store[f"data:{self._name}"] = f"payload of {self._name}"
        return Step.JOINED


BRANCHES = [
    Source("fast_a", 0.5),
    Source("fast_b", 0.8),
    Source("slow", 2.5),
    Source("failing", 0.1, fails=True),
]

STRATEGIES = [
    (JoinStrategy.all(), None),
    (JoinStrategy.any(), None),
    (JoinStrategy.quorum(2), None),
    (JoinStrategy.percentage(0.75), None),
    (JoinStrategy.partial_results(2), None),
    (JoinStrategy.partial_timeout(), 1.5),
]


def describe(result: SplitResult[Step]) -> list[str]:
    names = [b.name for b in BRANCHES]
    lines = [f"    {result!r}"]
    lines.append("    successes: " + (", ".join(names[i] for i, _ in result.successes) or "-"))
    errors = [
        f"{names[i]} ({type(err).__name__} caused by {type(err.__cause__).__name__}: "
        f"{err.__cause__})"
        for i, err in result.errors
    ]
    lines.append("    errors:    " + (", ".join(errors) or "-"))
    lines.append("    cancelled: " + (", ".join(names[i] for i in result.cancelled) or "-"))
    return lines


class LastSplit(Observer):
    """Keeps the SplitResult of the last join, whether it proceeded or failed."""

    result: SplitResult[Step] | None = None

    def on_split_end(self, run: RunInfo, state: Step, result: SplitResult[Step]) -> None:
        self.result = result


def run_one(executor: ProcessExecutor, strategy: JoinStrategy, timeout: float | None) -> None:
    last = LastSplit()
    flow = (
        Workflow(
            start=Step.SPLIT,
            executor=executor,
            cancel_grace=0.5,
            name=repr(strategy),
            observers=[last],
        )
        .register_split(Step.SPLIT, BRANCHES, JoinConfig(strategy, Step.JOINED, timeout=timeout))
        .add_exit_state(Step.JOINED)
    )
    label = repr(strategy) + (f" with timeout={timeout}s" if timeout else "")
    with SharedStore() as store:
        started = time.monotonic()
        try:
            final = flow.orchestrate(store=store)
        except JoinError as err:
            elapsed = time.monotonic() - started
            print(f"{label}: JoinError after {elapsed:.1f}s (timed_out={err.timed_out})")
            print(f"    {err}")
            lines = describe(err.result)
        else:
            elapsed = time.monotonic() - started
            kept = sorted(k.removeprefix("data:") for k in store if k.startswith("data:"))
            print(f"{label}: proceeded to {final.name} after {elapsed:.1f}s")
            assert last.result is not None
            lines = describe(last.result)
            lines.append("    writes kept: " + ", ".join(kept))
    print("\n".join(lines))


def main() -> None:
    # four workers, so that every branch starts at once whatever the number of CPUs
    with ProcessExecutor(max_workers=len(BRANCHES), reuse=False) as executor:
        executor.warm()
        for strategy, timeout in STRATEGIES:
            run_one(executor, strategy, timeout)


if __name__ == "__main__":
    main()
