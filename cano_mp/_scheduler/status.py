"""What the scheduler reports: :class:`FlowStatus`, the :class:`FlowInfo` snapshot of a flow,
and the status file (``Scheduler(status_file=...)``, ``cano-mp serve --status-file``).

The status file is JSON, replaced atomically after each run, at ``start()``, after
``pause`` / ``resume`` / ``reset``, and a last time by ``stop()`` with ``"stopped": true``
and ``"stopped_at"``::

    {"updated": "2026-...+00:00", "pid": 4242, "stopped": false, "stopped_at": null,
     "flows": [FlowInfo.to_json(), ...]}

A flow whose workflow has resources (``Workflow(resources=...)``) carries one more key,
``"resources": {"db": true, ...}``: ``Workflow.check_health()`` when the file was written
(the driver's instance probed, set up on the first write if no inline task did it, and-ed
with the last verdict a worker recorded); the last file, written by ``stop()``, repeats the
verdicts written before it without probing.

It is written to a temporary file next to it, with an unguessable name, created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600, then renamed over the target: a link
planted at either name is replaced, never written through, and the file is readable by its
owner only (give a monitoring tool the same user, or copy the file for it).
"""

from __future__ import annotations

import enum
import html
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from .._files import write_atomic

__all__ = ["FlowInfo", "FlowStatus", "write_status_file"]


class FlowStatus(enum.Enum):
    """Where a flow stands: never run, running, its last run completed, or failed (also
    when it tripped after too many consecutive failures)."""

    IDLE = "idle"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class FlowInfo:
    """A snapshot of one flow (``Scheduler.status`` / ``list``).

    Attributes:
        id: the flow id.
        status: :class:`FlowStatus`.
        run_count: runs started (a skipped tick is not a run).
        failure_count: runs that failed.
        last_run: when the last run started (aware datetime), or ``None``.
        next_run: when the next run is due (aware); ``None`` for manual, tripped or paused
            flows, and for a ``mode="delay"`` flow while its run goes on.
        last_error: ``"Type: message"`` of the last failure, ``None`` after a success.
        last_duration: seconds the last finished run took, or ``None``.
        kind: ``"every"``, ``"cron"`` or ``"manual"``; ``schedule``: its description.
        skipped: ticks skipped because a run was still going (or backing off).
        consecutive_failures: failures since the last success.
        tripped: ``True`` once ``trip_after`` consecutive failures stopped the flow.
        running: runs of the flow going on now.
        paused: ``True`` between ``Scheduler.pause`` and ``resume``.
    """

    id: str
    status: FlowStatus
    run_count: int
    failure_count: int
    last_run: datetime | None
    next_run: datetime | None
    last_error: str | None
    last_duration: float | None
    kind: str = "manual"
    schedule: str = ""
    skipped: int = 0
    consecutive_failures: int = 0
    tripped: bool = False
    running: int = 0
    paused: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (datetimes in ISO 8601, the status by value)."""
        d = asdict(self)
        d["status"] = self.status.value
        for k in ("last_run", "next_run"):
            d[k] = d[k].isoformat() if d[k] is not None else None
        return d

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in self.to_json().items()
        )
        return f"<table>{rows}</table>"


def write_status_file(
    path: str,
    flows: list[FlowInfo],
    now: datetime,
    *,
    stopped: bool = False,
    health: Mapping[str, Mapping[str, bool]] | None = None,
) -> None:
    """Replace ``path`` with the JSON of ``flows`` (see the module docstring); a flow id in
    ``health`` gets ``"resources": {name: healthy}``. Raises ``OSError`` (the caller logs
    it: a status file never stops the scheduler)."""
    entries = []
    for info in flows:
        entry = info.to_json()
        if health is not None and info.id in health:
            entry["resources"] = dict(health[info.id])
        entries.append(entry)
    data = {
        "updated": now.isoformat(),
        "pid": os.getpid(),
        "stopped": stopped,
        "stopped_at": now.isoformat() if stopped else None,
        "flows": entries,
    }
    # Through a temporary file with a random name (O_EXCL | O_NOFOLLOW), then a rename: a
    # reader sees the old file or the new one, and nothing is written through a link. Not
    # fsync'd: it is rewritten after every run.
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
