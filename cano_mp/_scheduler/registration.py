"""The registration verbs of the :class:`~.scheduler.Scheduler`: each builds a checked
:class:`~.flows.FlowSpec` (an :class:`~.triggers.Every`, a
:class:`~.triggers.CronSchedule` or nothing for a manual flow, plus :class:`FlowOptions`)
and hands it to ``_add``. Every bad argument is a ``ConfigError`` here, at registration.
"""

from __future__ import annotations

from collections.abc import Hashable
from datetime import timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Self, Unpack

from .._concurrent import WaitStrategy
from .._errors import ConfigError
from .._retry import to_seconds
from .flows import FlowOptions, FlowSpec, Instances
from .triggers import CronSchedule, Every, Mode

if TYPE_CHECKING:
    from .._workflow import Workflow

__all__ = ["Registration"]


class Registration:
    """``every`` / ``every_seconds|minutes|hours`` / ``cron`` / ``manual`` and their
    ``*_concurrent`` twins. Keywords of every kind (:class:`FlowOptions`): ``store``,
    ``overlap``, ``max_overlap``, ``backoff``, ``trip_after``."""

    def _add(self, spec: FlowSpec) -> Self:
        raise NotImplementedError

    def every(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        interval: float | timedelta,
        *,
        mode: Mode = "rate",
        **options: Unpack[FlowOptions],
    ) -> Self:
        """Run ``workflow`` at ``start()``, then every ``interval``: on a fixed grid
        anchored at ``start()`` (``mode="rate"``, no drift; a tick that finds the previous
        run going meets the overlap policy), or ``interval`` after each run ends
        (``mode="delay"``)."""
        every = Every(to_seconds(interval, "interval"), mode)
        return self._add(FlowSpec.build(flow_id, workflow, initial_state, every, options))

    def every_seconds(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        n: float,
        *,
        mode: Mode = "rate",
        **options: Unpack[FlowOptions],
    ) -> Self:
        """``every(..., n)`` seconds."""
        return self.every(flow_id, workflow, initial_state, n, mode=mode, **options)

    def every_minutes(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        n: float,
        *,
        mode: Mode = "rate",
        **options: Unpack[FlowOptions],
    ) -> Self:
        """``every(..., n * 60)``."""
        interval = _scaled(n, 60)
        return self.every(flow_id, workflow, initial_state, interval, mode=mode, **options)

    def every_hours(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        n: float,
        *,
        mode: Mode = "rate",
        **options: Unpack[FlowOptions],
    ) -> Self:
        """``every(..., n * 3600)``."""
        interval = _scaled(n, 3600)
        return self.every(flow_id, workflow, initial_state, interval, mode=mode, **options)

    def cron(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        expr: str,
        *,
        tz: str | tzinfo | None = None,
        **options: Unpack[FlowOptions],
    ) -> Self:
        """Run at the times of the cron expression ``expr`` (5 fields, 6 with seconds
        last, or ``@hourly @daily @weekly @monthly @yearly``) in time zone ``tz`` (default:
        the local zone, with its DST rules)."""
        schedule = CronSchedule(expr, tz)
        return self._add(FlowSpec.build(flow_id, workflow, initial_state, schedule, options))

    def manual(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        **options: Unpack[FlowOptions],
    ) -> Self:
        """A flow that runs only when :meth:`trigger` is called."""
        return self._add(FlowSpec.build(flow_id, workflow, initial_state, None, options))

    def every_concurrent(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        interval: float | timedelta,
        *,
        instances: int,
        wait: WaitStrategy | None = None,
        max_concurrency: int | None = None,
        mode: Mode = "rate",
        **options: Unpack[FlowOptions],
    ) -> Self:
        """Like :meth:`every`; each run is ``ConcurrentWorkflow(workflow,
        max_concurrency).execute(instances, wait=wait)`` on fresh stores. A run fails
        when an instance failed."""
        every = Every(to_seconds(interval, "interval"), mode)
        many = Instances(instances, wait, max_concurrency)
        return self._add(FlowSpec.build(flow_id, workflow, initial_state, every, options, many))

    def cron_concurrent(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        expr: str,
        *,
        instances: int,
        wait: WaitStrategy | None = None,
        max_concurrency: int | None = None,
        tz: str | tzinfo | None = None,
        **options: Unpack[FlowOptions],
    ) -> Self:
        """Like :meth:`cron`, running ``instances`` concurrent instances each time."""
        schedule = CronSchedule(expr, tz)
        many = Instances(instances, wait, max_concurrency)
        spec = FlowSpec.build(flow_id, workflow, initial_state, schedule, options, many)
        return self._add(spec)

    def manual_concurrent(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        *,
        instances: int,
        wait: WaitStrategy | None = None,
        max_concurrency: int | None = None,
        **options: Unpack[FlowOptions],
    ) -> Self:
        """Like :meth:`manual`, running ``instances`` concurrent instances each time."""
        many = Instances(instances, wait, max_concurrency)
        return self._add(FlowSpec.build(flow_id, workflow, initial_state, None, options, many))


def _scaled(n: float, factor: int) -> float:
    if isinstance(n, bool) or not isinstance(n, int | float):
        raise ConfigError(f"expected a number, got {n!r}")
    return float(n) * factor
