"""``Scheduler``: one background thread that starts workflow runs on intervals, cron
expressions or by hand.

::

    registration (caller's thread)     scheduler thread (decides)       run pool (runs)
    ------------------------------     --------------------------       ---------------
    every / cron / manual(...)
      Every | CronSchedule | None        Event.wait(until the nearest due time)
      -> FlowSpec: frozen, checked       woken by trigger(), pause(), resume(),
         now (ConfigError)               reset(), stop() and each run's end
      -> FlowState: mutable
                                         per flow, under the lock:
    trigger(id)  -> state.triggers ---->   a trigger, or take_tick(): a tick due?
    pause / resume / reset -> state        decide_due(spec, state, now, due)
                                             Skip  -> skipped += 1, one log line
                                             Queue -> state.queued
                                             Start -> run pool ---------->  Job(spec)
                                                                              .execute()
                                         record_end(): status, backoff,  <--  outcome
                                           trip, a "delay" flow's next tick
                                         a queued run starts; a log line;
                                         status.write_status_file()

Modules, each below the one before it: ``scheduler`` (the :class:`Scheduler`: thread,
registration, start / stop) → ``runs`` (a :class:`~.runs.Job`: the one place that
touches the workflow's run machinery) → ``flows`` (:class:`FlowSpec`,
:class:`FlowState`, :class:`Backoff` and the pure decisions, tested without threads) →
``status`` (:class:`FlowInfo`, :class:`FlowStatus`, the status file) and ``triggers``
(interval grids, cron times across DST, durations: pure arithmetic on instants).

Why one thread and absolute grids: the thread never runs work, so a slow run never makes
another flow late, and due times are computed from a grid (``anchor + k * interval``) or
from cron, never by adding sleeps, so lateness does not accumulate. The thread sleeps on
``Event.wait`` — no polling — at most :data:`~.flows.CRON_RECHECK` seconds while cron
flows exist, so that a wall-clock step delays a cron run by at most that much.
"""

from __future__ import annotations

from .flows import Backoff
from .scheduler import Scheduler
from .status import FlowInfo, FlowStatus

__all__ = ["Backoff", "FlowInfo", "FlowStatus", "Scheduler"]

# Users meet these as cano_mp.Scheduler etc.: reprs, docs and pickles say so.
for _public in (Backoff, FlowInfo, FlowStatus, Scheduler):
    _public.__module__ = "cano_mp"
del _public
