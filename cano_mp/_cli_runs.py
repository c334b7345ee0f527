"""``cano-mp runs DB`` (a table of the runs a checkpoint database holds) and ``cano-mp
resume PATH.py:NAME RUN_ID --checkpoint DB`` (exit codes as ``run``)."""

from __future__ import annotations

import argparse
import os
from datetime import datetime
from typing import Any

__all__ = ["add_commands", "format_runs", "run_command"]


def add_commands(sub: Any) -> None:
    runs = sub.add_parser("runs", help="list the runs of a checkpoint database")
    runs.add_argument("db", help="the checkpoint database (Workflow(checkpoint=...))")
    runs.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    resume = sub.add_parser("resume", help="resume a run from its last checkpoint")
    resume.add_argument("target", help="PATH.py:NAME or module:NAME (a Workflow or a factory)")
    resume.add_argument("run_id", help="the run to resume (see cano-mp runs DB)")
    resume.add_argument("--checkpoint", required=True, help="the checkpoint database")
    resume.add_argument("--workers", type=int, help="worker processes (default: usable CPUs)")
    resume.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")


def format_runs(records: list[Any]) -> str:
    """The runs as a table: one line each, oldest first."""
    head = ("RUN ID", "WORKFLOW", "STATUS", "STATE", "STARTED", "UPDATED")
    rows = [head]
    for r in records:
        status = r.status
        if status == "running":
            status = "running" if r.live else "running (crashed)"
        elif status == "failed" and not r.resumable:
            status = "failed (rolled back)"
        rows.append(
            (r.run_id, r.workflow, status, r.state or "-", _when(r.started), _when(r.updated))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines) + "\n"


def _when(t: datetime) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def run_command(args: argparse.Namespace, cli: Any) -> int:
    """Run ``runs`` or ``resume``; ``cli`` is the ``cano_mp.cli`` module (its loaders and
    its way of reporting a run)."""
    from ._checkpoint import CheckpointStore

    cli._logging(args.log_level)
    if args.command == "runs":
        if not os.path.isfile(args.db):
            raise cli.UsageError(f"no checkpoint database at {args.db}")
        print(format_runs(CheckpointStore(args.db).runs()), end="")
        return 0
    if args.workers is not None and args.workers < 1:
        raise cli.UsageError(f"--workers must be >= 1, got {args.workers}")
    if not os.path.isfile(args.checkpoint):
        raise cli.UsageError(f"no checkpoint database at {args.checkpoint}")
    flow = cli.load_target(args.target, cwd_on_path=True)
    if args.workers is not None:
        flow._use_workers(args.workers)
    flow._checkpoint = CheckpointStore(args.checkpoint, durability=flow.checkpoint_durability)
    code: int = cli.run_reported(flow, lambda: flow.resume(args.run_id))
    return code
