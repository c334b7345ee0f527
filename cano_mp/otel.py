"""OpenTelemetry tracing for cano_mp runs (extra ``otel``: ``pip install cano-mp[otel]``).

::

    from cano_mp.otel import OpenTelemetryObserver
    flow = Workflow(observers=[OpenTelemetryObserver()])

A span per run (``cano_mp.run <workflow>``), a child span per state entered
(``cano_mp.state <STATE>``), and under it a span per task attempt (``cano_mp.task <name>``)
timed from the worker's own start and end, with the attributes ``cano_mp.workflow``,
``cano_mp.run_id``, ``cano_mp.state``, ``cano_mp.task``, ``cano_mp.attempt`` and
``process.pid``. Errors are recorded on the spans (status ERROR, an exception event).
BatchTask chunks are spans of their own under the state.
"""

from __future__ import annotations

import enum
import threading
from typing import Any

from ._observe import AttemptObserver, RunInfo

try:
    from opentelemetry import trace
    from opentelemetry.trace import Span, Status, StatusCode, Tracer, TracerProvider
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("cano_mp.otel needs OpenTelemetry: pip install 'cano-mp[otel]'") from exc

__all__ = ["OpenTelemetryObserver"]


def _label(state: Any) -> str:
    return state.name if isinstance(state, enum.Enum) else str(state)


class OpenTelemetryObserver(AttemptObserver):
    """Emits OpenTelemetry spans for runs, states and task attempts.

    Args:
        tracer_provider: where spans go (default: the global provider).
        name: the instrumentation scope name.
    """

    def __init__(
        self, tracer_provider: TracerProvider | None = None, name: str = "cano_mp"
    ) -> None:
        super().__init__()
        self._tracer: Tracer = trace.get_tracer(name, tracer_provider=tracer_provider)
        self._lock = threading.Lock()
        self._runs: dict[str, Span] = {}
        self._states: dict[str, Span] = {}

    def _attrs(self, run: RunInfo, **more: Any) -> dict[str, Any]:
        return {"cano_mp.workflow": run.workflow, "cano_mp.run_id": run.run_id, **more}

    def on_workflow_start(self, run: RunInfo) -> None:
        span = self._tracer.start_span(f"cano_mp.run {run.workflow}", attributes=self._attrs(run))
        with self._lock:
            self._runs[run.run_id] = span

    def on_state_enter(self, run: RunInfo, state: Any) -> None:
        with self._lock:
            previous = self._states.pop(run.run_id, None)
            parent = self._runs.get(run.run_id)
        if previous is not None:
            previous.end()
        ctx = trace.set_span_in_context(parent) if parent is not None else None
        span = self._tracer.start_span(
            f"cano_mp.state {_label(state)}",
            context=ctx,
            attributes=self._attrs(run, **{"cano_mp.state": _label(state)}),
        )
        with self._lock:
            self._states[run.run_id] = span

    def on_attempt(
        self,
        run: RunInfo,
        state: Any,
        task_name: str,
        attempt: int,
        *,
        pid: int | None,
        started: float,
        ended: float,
        error: BaseException | None,
    ) -> None:
        with self._lock:
            parent = self._states.get(run.run_id) or self._runs.get(run.run_id)
        ctx = trace.set_span_in_context(parent) if parent is not None else None
        attrs = self._attrs(
            run,
            **{
                "cano_mp.state": _label(state),
                "cano_mp.task": task_name,
                "cano_mp.attempt": attempt,
            },
        )
        if pid is not None:
            attrs["process.pid"] = pid
        span = self._tracer.start_span(
            f"cano_mp.task {task_name}",
            context=ctx,
            attributes=attrs,
            start_time=int(started * 1e9),
        )
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end(end_time=int(ended * 1e9))

    def on_retry(
        self,
        run: RunInfo,
        state: Any,
        task_name: str,
        attempt: int,
        delay: float,
        error: BaseException,
    ) -> None:
        with self._lock:
            span = self._states.get(run.run_id)
        if span is not None:
            span.add_event(
                "cano_mp.retry",
                {"cano_mp.task": task_name, "cano_mp.attempt": attempt, "cano_mp.delay": delay},
            )

    def on_workflow_end(
        self, run: RunInfo, *, final_state: Any, error: BaseException | None, duration: float
    ) -> None:
        with self._lock:
            state_span = self._states.pop(run.run_id, None)
            run_span = self._runs.pop(run.run_id, None)
        if state_span is not None:
            state_span.end()
        if run_span is not None:
            if error is not None:
                run_span.record_exception(error)
                run_span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            else:
                run_span.set_attribute("cano_mp.final_state", _label(final_state))
            run_span.end()
