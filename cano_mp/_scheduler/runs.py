"""One run of a flow, in a run-pool thread: the only place where the scheduler touches a
workflow's run machinery (``Workflow.start_run``, ``ConcurrentWorkflow._prepare``).

A :class:`Job` is made outside the scheduler's lock (a fresh store creates a directory),
then either started (:meth:`Job.execute`, which blocks for the whole run) or, when the
scheduler stops first, given back (:meth:`Job.discard`). It never raises: the run's error
is its outcome.
"""

from __future__ import annotations

from typing import Any

from .._concurrent import _Execution
from .._engine import Run, describe
from .._errors import CanoError
from .._store import SharedStore
from .flows import FlowSpec

__all__ = ["Job"]


class Job:
    """A run of ``spec``, made and not started yet."""

    def __init__(self, spec: FlowSpec, resume_id: str | None = None) -> None:
        self.spec = spec
        self._finished: Any = None  # a resumed run that had completed: its final state
        # A fresh store per run unless the flow has its own; instances make their own.
        self._owned: SharedStore | None = None
        self._runner: Run | _Execution[Any] | None = None
        self._error: BaseException | None = None  # could not be made: the run fails
        try:
            if spec.instances is not None:
                count, wait = spec.instances.count, spec.instances.wait
                self._runner = spec.new_concurrent()._prepare(count, spec.initial, wait)
            else:
                store = spec.store
                if store is None:
                    store = self._owned = SharedStore()
                if resume_id is not None:
                    made = spec.workflow._resumed(resume_id, store)
                    if isinstance(made, Run):
                        self._runner = made
                    else:
                        self._finished = made
                else:
                    self._runner = spec.workflow.start_run(store, spec.initial)
        except Exception as exc:
            self._error = exc

    def cancel(self, grace: float | None = None) -> None:
        """Stop the run from another thread (``Scheduler.stop`` past its timeout)."""
        if self._runner is not None:
            self._runner.cancel(grace)

    def discard(self) -> None:
        """The run never starts: give back what was made for it (with a checkpoint, the
        run's lease: another process may resume it, ``runs()`` shows it is not live)."""
        if isinstance(self._runner, Run) and self._runner.checkpoint is not None:
            self._runner.checkpoint.cs.let_go(self._runner.run_id)
        if self._owned is not None:
            self._owned.close()
        if isinstance(self._runner, _Execution):
            for made in self._runner.owned:
                made.close()

    def execute(self) -> tuple[str, BaseException | None]:
        """Run to the end: ``(what happened, in words; the error or None)``."""
        runner = self._runner
        try:
            if runner is None and self._finished is not None:
                return f"completed at {describe(self._finished.state)}", None
            if runner is None:
                assert self._error is not None
                return "failed", self._error
            if isinstance(runner, Run):
                final = runner.run()
                return f"completed at {describe(final)}", None
            with runner.run() as result:
                if not result.failed:
                    return repr(result), None
                first = next(r for r in result.results if r.status == "failed")
                return repr(result), CanoError(
                    f"{result.failed} of {len(result.results)} instances failed; "
                    f"instance {first.index}: {type(first.error).__name__}: {first.error}"
                )
        except BaseException as exc:
            return "failed", exc
        finally:
            if self._owned is not None:
                self._owned.close()
