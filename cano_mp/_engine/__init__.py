"""The FSM driver: one run of a workflow, from its initial state to an exit state.

::

    Workflow.start_run(store) --> Run.run()                                       run.py
       for each state: snapshot of the store (serialised once per version)
         plain task / split --> TaskState      (branches)                         task_state.py
         BatchTask          --> BatchState     (chunks of items)                  batch_state.py
            every attempt:  attempts.submit --> executor --> UnitOutcome / ChunkOutcome
                            crash / timeout / task error --> attempts.retry_or_fail
                            Retry(at) | Failed(TaskError)                         attempts.py
            success: attempts.check_transition, then store._commit(write log)
       until an exit state; RunScope (scope.py) holds what the states share: the store,
       executor, observers, quota, deadline, cancellation, and the one event the driver
       thread sleeps on.

A running call's future wakes the run through its done-callback; otherwise the driver
sleeps until the nearest deadline (attempt timeout, retry time, join timeout, workflow
timeout). Nothing waits on a future without a deadline.

Writes: a successful attempt returns a write log; a plain task's log is committed when it
succeeds and its next state is valid; a split's successful logs are committed in branch-index
order once the join proceeds. Everything else is discarded, with the segments the attempt
created (found by its token once the call has really stopped).

Layers: this package uses the store, the executors, the wire records and the user model
(tasks, joins, retries); nothing below it knows about workflows.
"""

from __future__ import annotations

from .plan import Frozen, Plan, Quota, StateEntry, UnitRef, describe, is_hashable, make_unit_ref
from .run import Run
from .scope import CANCEL_GRACE, RunCancelled, RunScope

__all__ = [
    "CANCEL_GRACE",
    "Frozen",
    "Plan",
    "Quota",
    "Run",
    "RunCancelled",
    "RunScope",
    "StateEntry",
    "UnitRef",
    "describe",
    "is_hashable",
    "make_unit_ref",
]
