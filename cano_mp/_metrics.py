"""``MetricsObserver``: counters and duration histograms of runs, states and tasks, as a
dict or in the Prometheus text format."""

from __future__ import annotations

import bisect
import enum
import threading
from collections import defaultdict, deque
from typing import Any, NamedTuple

from ._errors import TaskCancelled, TaskTimeout, WorkerCrashed
from ._log import get_logger
from ._observe import Observer, RunInfo
from ._public import public

__all__ = ["DEFAULT_BUCKETS", "MetricsObserver"]

log = get_logger("cano_mp.metrics")

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0,
)  # fmt: skip


# The hot hooks (a state entered, an attempt ended) only note what happened; the notes are
# folded into the counters when the metrics are read, or once this many wait.
_FOLD_AT = 4096


def _label(state: Any) -> str:
    return state.name if isinstance(state, enum.Enum) else str(state)


class _Histogram:
    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.sum += value

    def as_dict(self) -> dict[str, Any]:
        cumulative, total = {}, 0
        for bound, n in zip([*self.buckets, float("inf")], self.counts, strict=True):
            total += n
            cumulative["+Inf" if bound == float("inf") else repr(bound)] = total
        return {"count": self.count, "sum": self.sum, "buckets": cumulative}


Key = tuple[tuple[str, str], ...]


class _TaskCell(NamedTuple):
    """A task's series: its labels, the attempts counter, its ``ok`` key, its histogram."""

    labels: Key
    attempts: dict[Key, float]
    ok: Key
    hist: _Histogram


class MetricsObserver(Observer):
    """Counts what runs do; read with :meth:`as_dict`, export with :meth:`to_prometheus`.

    Counters (labels): ``cano_mp_runs_total`` (workflow, outcome: completed / failed),
    ``cano_mp_states_total`` (workflow, state), ``cano_mp_task_attempts_total`` (workflow,
    state, task, outcome: ok / error / timeout / crash / cancelled),
    ``cano_mp_retries_total``, ``cano_mp_task_failures_total``, ``cano_mp_crashes_total``,
    ``cano_mp_cancellations_total`` (workflow, state, task). Histograms (seconds):
    ``cano_mp_run_duration_seconds`` (workflow) and ``cano_mp_task_duration_seconds``
    (workflow, state, task). Thread-safe: one observer can watch many workflows and runs.

    A task failure counts an attempt that failed, whether it is retried or not.
    """

    def __init__(self, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Key, float]] = defaultdict(lambda: defaultdict(float))
        self._hists: dict[str, dict[Key, _Histogram]] = defaultdict(dict)
        # What a hook touches, found once per (workflow, state[, task]) and kept until
        # reset(): the hot hooks are a dict look-up and a few increments under the lock.
        self._state_cells: dict[tuple[str, Any], tuple[dict[Key, float], Key]] = {}
        self._task_cells: dict[tuple[str, Any, str], _TaskCell] = {}
        # Notes of the hot hooks, not yet folded in (deque appends need no lock).
        self._entered: deque[tuple[str, Any]] = deque()
        self._ended: deque[tuple[str, Any, str, float, str | None]] = deque()

    def _state_cell(self, workflow: str, state: Any) -> tuple[dict[Key, float], Key]:
        # called with the lock held
        key = (("workflow", workflow), ("state", _label(state)))
        cell = (self._counters["cano_mp_states_total"], key)
        try:
            self._state_cells[(workflow, state)] = cell
        except TypeError:  # an unhashable state: found afresh each time
            pass
        return cell

    def _task_cell(self, workflow: str, state: Any, task: str) -> _TaskCell:
        # called with the lock held
        labels = (("workflow", workflow), ("state", _label(state)), ("task", task))
        hists = self._hists["cano_mp_task_duration_seconds"]
        hist = hists.get(labels)
        if hist is None:
            hist = hists[labels] = _Histogram(self.buckets)
        cell = _TaskCell(
            labels,
            self._counters["cano_mp_task_attempts_total"],
            (*labels, ("outcome", "ok")),
            hist,
        )
        try:
            self._task_cells[(workflow, state, task)] = cell
        except TypeError:
            pass
        return cell

    def _inc(self, name: str, labels: Key, value: float = 1.0) -> None:
        with self._lock:
            self._counters[name][labels] += value

    def _observe(self, name: str, labels: Key, value: float) -> None:
        with self._lock:
            h = self._hists[name].get(labels)
            if h is None:
                h = self._hists[name][labels] = _Histogram(self.buckets)
            h.observe(value)

    # -- hooks -----------------------------------------------------------------------------
    def on_state_enter(self, run: RunInfo, state: Any) -> None:
        entered = self._entered
        entered.append((run.workflow, state))
        if len(entered) >= _FOLD_AT:
            self._fold()

    def on_task_end(
        self,
        run: RunInfo,
        state: Any,
        task_name: str,
        attempt: int,
        *,
        error: BaseException | None,
        duration: float,
    ) -> None:
        ended = self._ended
        outcome = None if error is None else _outcome(error)  # the error itself is not kept
        ended.append((run.workflow, state, task_name, duration, outcome))
        if len(ended) >= _FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        with self._lock:
            self._fold_locked()

    def _fold_locked(self) -> None:
        """Count the noted events (the lock held)."""
        entered, ended = self._entered, self._ended
        while entered:
            workflow, state = entered.popleft()
            try:
                self._count_state(workflow, state)
            except Exception:  # a state whose str() raises: not counted, never raised here
                log.debug("MetricsObserver could not count state %r", state, exc_info=True)
        while ended:
            workflow, state, task_name, duration, outcome = ended.popleft()
            try:
                self._count_attempt(workflow, state, task_name, duration, outcome)
            except Exception:
                log.debug("MetricsObserver could not count an attempt", exc_info=True)

    def _count_state(self, workflow: str, state: Any) -> None:
        try:
            cell = self._state_cells.get((workflow, state))
        except TypeError:  # an unhashable state: found afresh each time
            cell = None
        if cell is None:
            cell = self._state_cell(workflow, state)
        cell[0][cell[1]] += 1

    def _count_attempt(
        self, workflow: str, state: Any, task_name: str, duration: float, outcome: str | None
    ) -> None:
        try:
            task = self._task_cells.get((workflow, state, task_name))
        except TypeError:
            task = None
        if task is None:
            task = self._task_cell(workflow, state, task_name)
        task.hist.observe(duration)
        if outcome is None:
            task.attempts[task.ok] += 1
        else:
            self._task_failed(task.labels, outcome)

    def _task_failed(self, labels: Key, outcome: str) -> None:
        # called with the lock held
        counters = self._counters
        if outcome == "cancelled":
            counters["cano_mp_cancellations_total"][labels] += 1
        else:
            counters["cano_mp_task_failures_total"][labels] += 1
            if outcome == "crash":
                counters["cano_mp_crashes_total"][labels] += 1
        counters["cano_mp_task_attempts_total"][(*labels, ("outcome", outcome))] += 1

    def on_retry(
        self,
        run: RunInfo,
        state: Any,
        task_name: str,
        attempt: int,
        delay: float,
        error: BaseException,
    ) -> None:
        labels = (("workflow", run.workflow), ("state", _label(state)), ("task", task_name))
        self._inc("cano_mp_retries_total", labels)

    def on_workflow_end(
        self,
        run: RunInfo,
        *,
        final_state: Any,
        error: BaseException | None,
        duration: float,
    ) -> None:
        outcome = "completed" if error is None else "failed"
        self._inc("cano_mp_runs_total", (("workflow", run.workflow), ("outcome", outcome)))
        self._observe("cano_mp_run_duration_seconds", (("workflow", run.workflow),), duration)

    # -- reading -----------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        """``{metric: [{"labels": {...}, "value": n}]}`` for counters and
        ``{"labels": {...}, "count", "sum", "buckets"}`` for histograms."""
        with self._lock:
            self._fold_locked()
            out: dict[str, Any] = {}
            for name, series in sorted(self._counters.items()):
                out[name] = [{"labels": dict(k), "value": v} for k, v in sorted(series.items())]
            for name, hists in sorted(self._hists.items()):
                out[name] = [{"labels": dict(k), **h.as_dict()} for k, h in sorted(hists.items())]
            return out

    def value(self, name: str, **labels: str) -> float:
        """The sum of a counter over the series matching ``labels`` (0 if none)."""
        with self._lock:
            self._fold_locked()
            series = self._counters.get(name, {})
            want = set(labels.items())
            return sum(v for k, v in series.items() if want <= set(k))

    def reset(self) -> None:
        """Forget everything counted so far."""
        with self._lock:
            self._entered.clear()
            self._ended.clear()
            self._counters.clear()
            self._hists.clear()
            self._state_cells.clear()
            self._task_cells.clear()

    def to_prometheus(self) -> str:
        """The metrics in the Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        data = self.as_dict()
        for name, series in data.items():
            if name.endswith("_seconds"):
                lines.append(f"# HELP {name} {name.replace('_', ' ')}")
                lines.append(f"# TYPE {name} histogram")
                for s in series:
                    base = s["labels"]
                    for le, n in s["buckets"].items():
                        lines.append(f"{name}_bucket{_fmt_labels({**base, 'le': le})} {n}")
                    lines.append(f"{name}_sum{_fmt_labels(base)} {s['sum']!r}")
                    lines.append(f"{name}_count{_fmt_labels(base)} {s['count']}")
            else:
                lines.append(f"# HELP {name} {name.replace('_', ' ')}")
                lines.append(f"# TYPE {name} counter")
                for s in series:
                    lines.append(f"{name}{_fmt_labels(s['labels'])} {_num(s['value'])}")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        runs = self.value("cano_mp_runs_total")
        attempts = self.value("cano_mp_task_attempts_total")
        return f"<MetricsObserver {runs:g} runs, {attempts:g} task attempts>"


def _outcome(error: BaseException) -> str:
    if isinstance(error, TaskCancelled):
        return "cancelled"
    if isinstance(error, WorkerCrashed):
        return "crash"
    if isinstance(error, TaskTimeout):
        return "timeout"
    return "error"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def _fmt_labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    parts = []
    for k, v in labels.items():
        escaped = str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{k}="{escaped}"')
    return "{" + ",".join(parts) + "}"


public(MetricsObserver)
