"""Checkpointed runs of a Workflow: opening its CheckpointStore, starting a recorded run,
and resuming one (``Workflow.orchestrate(run_id=...)``, ``Workflow.resume``).

Everything checkpoint-related that the Workflow builder needs lives here, so that a
workflow without a checkpoint imports none of it (no SQLite) and its runs pay nothing.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ._checkpoint import CheckpointStore, RunRecord
from ._checkpoint.session import Rollback, Session, find_state
from ._engine import Frozen, Run
from ._errors import CanoError, ConfigError
from ._log import get_logger


class Workflow(Protocol):
    """What these functions use of a ``Workflow``."""

    name: str

    def freeze(self) -> Frozen: ...


__all__ = ["Finished", "checkpointed_run", "open_store", "resumed_run"]

log = get_logger("cano_mp.workflow")

Durability = Literal["normal", "fsync"]


def open_store(
    arg: str | os.PathLike[str] | CheckpointStore, durability: Durability
) -> CheckpointStore:
    """The CheckpointStore ``Workflow(checkpoint=...)`` names."""
    if isinstance(arg, CheckpointStore):
        return arg
    return CheckpointStore(arg, durability=durability)


def new_run_id(run_id: str | None) -> str:
    if run_id is None:
        return uuid.uuid4().hex
    if not isinstance(run_id, str) or not run_id:
        raise ConfigError(f"run_id must be a non-empty str, got {run_id!r}")
    return run_id


def checkpointed_run(wf: Workflow, run: Run, cs: CheckpointStore, keep: bool) -> Run:
    """Record ``run`` as a new run of ``cs`` (its id must be new) and attach its session."""
    cs.create_run(run.run_id, wf.name)
    run.checkpoint = Session(
        cs, run.run_id, keep=keep, observers=run.scope.observers, info=run.info
    )
    return run


@dataclass(frozen=True, slots=True)
class Finished:
    """A completed run asked to resume: its final state, nothing to run."""

    state: Any


def resumed_run(
    wf: Workflow, cs: CheckpointStore, keep: bool, run_id: str, run: Any
) -> Run | Finished:
    """A Run that continues ``run_id`` where its last checkpoint left it (its lease taken),
    or :class:`Finished` when the run had completed. ``run(initial, run_id)`` makes the
    Run; the store is restored when the Run starts (holding its store)."""
    frozen = wf.freeze()
    table = frozen.plan.table
    loaded = cs.load(run_id)
    if isinstance(loaded, RunRecord):
        return Finished(find_state(loaded.state or "", table, run_id, wf.name))
    try:
        if loaded.record.workflow != wf.name:
            log.warning(
                "run %s was recorded by workflow %r; resuming it with workflow %r",
                run_id,
                loaded.record.workflow,
                wf.name,
            )
        state = find_state(loaded.state, table, run_id, wf.name)
        completed = [
            find_state(n, table, run_id, wf.name) for n in loaded.extra.get("completed", ())
        ]
        rolling = _rollback(loaded.extra.get("rollback"), table, run_id, wf.name)
        made: Run = run(frozen, state, run_id, completed)
    except BaseException:
        cs.let_go(run_id)
        raise
    made.checkpoint = Session(
        cs, run_id, keep=keep, observers=made.scope.observers, info=made.info, saved=loaded
    )
    made.checkpoint.resume_rollback = rolling
    return made


def _rollback(rb: Any, table: Any, run_id: str, workflow: str) -> Rollback | None:
    """The rollback a crash cut short, as states (errors of earlier compensations as
    ``CanoError``s carrying their message), or None."""
    if rb is None:
        return None

    def find(name: str) -> Any:
        return find_state(name, table, run_id, workflow)

    return (
        [find(n) for n in rb["todo"]],
        [find(n) for n in rb["done"]],
        [(find(n), CanoError(why)) for n, why in rb["errors"]],
    )
