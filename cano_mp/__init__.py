"""cano_mp: CPU pipelines as finite state machines on a pool of worker processes.

A driver walks the state machine; each state's work runs in a loky worker process; state
travels through a shared-memory store. See README.md and the public contract for the full
picture. Everything public is importable from here.
"""

from __future__ import annotations

import sys as _sys

if not _sys.platform.startswith("linux"):  # pragma: no cover - CI runs on Linux
    raise ImportError(
        f"cano_mp runs on Linux (this is {_sys.platform}): its guarantees stand on /dev/shm, "
        "flock, process groups and PR_SET_PDEATHSIG"
    )

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._batch import BatchTask, ItemFailure
    from ._checkpoint import CheckpointStore, RunRecord
    from ._concurrent import (
        ConcurrentResult,
        ConcurrentWorkflow,
        InstanceResult,
        WaitStrategy,
    )
    from ._context import TaskContext, task_context
    from ._errors import (
        CanoError,
        CircuitOpen,
        ConfigError,
        RolledBack,
        StoreError,
        StoreKeyError,
        TaskCancelled,
        TaskError,
        TaskTimeout,
        Terminated,
        TransitionError,
        WorkerCrashed,
        WorkflowTimeout,
    )
    from ._executors import Executor, InlineExecutor, ProcessExecutor
    from ._join import (
        JoinConfig,
        JoinError,
        JoinStrategy,
        SplitResult,
    )
    from ._metrics import MetricsObserver
    from ._observe import Observer, RunInfo
    from ._poll import PollTask
    from ._resilience import (
        CircuitBreaker,
        MultiRateLimiter,
        RateLimiter,
        WindowedRateLimiter,
    )
    from ._resilience.resources import Resource, ResourceError
    from ._retry import RetryPolicy, TaskConfig
    from ._scheduler import (
        Backoff,
        FlowInfo,
        FlowStatus,
        Scheduler,
    )
    from ._stepped import Done, SteppedTask
    from ._store import SharedStore
    from ._task import (
        FunctionTask,
        Node,
        Task,
        task,
    )
    from ._trace import TraceRecorder
    from ._wire import RemoteError
    from ._workflow import Workflow

# Every public name is imported on first use (PEP 562): a worker process, which imports
# cano_mp only for the few modules a call needs, starts in about half the time, and a
# script pays only for what it uses (croniter and time zones for the scheduler, the engine
# for Workflow). Each class marks itself public in its own module (see ._public).
_LAZY = {
    "BatchTask": "_batch",
    "ItemFailure": "_batch",
    "CheckpointStore": "_checkpoint",
    "RunRecord": "_checkpoint",
    "ConcurrentResult": "_concurrent",
    "ConcurrentWorkflow": "_concurrent",
    "InstanceResult": "_concurrent",
    "WaitStrategy": "_concurrent",
    "TaskContext": "_context",
    "task_context": "_context",
    "CanoError": "_errors",
    "CircuitOpen": "_errors",
    "ConfigError": "_errors",
    "RolledBack": "_errors",
    "StoreError": "_errors",
    "StoreKeyError": "_errors",
    "TaskCancelled": "_errors",
    "TaskError": "_errors",
    "TaskTimeout": "_errors",
    "Terminated": "_errors",
    "TransitionError": "_errors",
    "WorkerCrashed": "_errors",
    "WorkflowTimeout": "_errors",
    "Executor": "_executors",
    "InlineExecutor": "_executors",
    "ProcessExecutor": "_executors",
    "JoinConfig": "_join",
    "JoinError": "_join",
    "JoinStrategy": "_join",
    "SplitResult": "_join",
    "MetricsObserver": "_metrics",
    "Observer": "_observe",
    "RunInfo": "_observe",
    "PollTask": "_poll",
    "CircuitBreaker": "_resilience",
    "MultiRateLimiter": "_resilience",
    "RateLimiter": "_resilience",
    "WindowedRateLimiter": "_resilience",
    "Resource": "_resilience.resources",
    "ResourceError": "_resilience.resources",
    "RetryPolicy": "_retry",
    "TaskConfig": "_retry",
    "Backoff": "_scheduler",
    "FlowInfo": "_scheduler",
    "FlowStatus": "_scheduler",
    "Scheduler": "_scheduler",
    "Done": "_stepped",
    "SteppedTask": "_stepped",
    "SharedStore": "_store",
    "FunctionTask": "_task",
    "Node": "_task",
    "Task": "_task",
    "task": "_task",
    "TraceRecorder": "_trace",
    "RemoteError": "_wire",
    "Workflow": "_workflow",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cano_mp' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"cano_mp.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"


__all__ = [
    "Backoff",
    "BatchTask",
    "CanoError",
    "CheckpointStore",
    "CircuitBreaker",
    "CircuitOpen",
    "ConcurrentResult",
    "ConcurrentWorkflow",
    "ConfigError",
    "Done",
    "Executor",
    "FlowInfo",
    "FlowStatus",
    "FunctionTask",
    "InlineExecutor",
    "InstanceResult",
    "ItemFailure",
    "JoinConfig",
    "JoinError",
    "JoinStrategy",
    "MultiRateLimiter",
    "MetricsObserver",
    "Node",
    "Observer",
    "PollTask",
    "ProcessExecutor",
    "RateLimiter",
    "RemoteError",
    "Resource",
    "ResourceError",
    "RetryPolicy",
    "RolledBack",
    "RunInfo",
    "RunRecord",
    "Scheduler",
    "SharedStore",
    "SplitResult",
    "StoreError",
    "SteppedTask",
    "StoreKeyError",
    "Task",
    "TaskCancelled",
    "TaskConfig",
    "TaskContext",
    "TaskError",
    "TaskTimeout",
    "Terminated",
    "TraceRecorder",
    "TransitionError",
    "WaitStrategy",
    "WindowedRateLimiter",
    "WorkerCrashed",
    "Workflow",
    "WorkflowTimeout",
    "__version__",
    "task",
    "task_context",
]
