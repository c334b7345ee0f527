"""The public surface: every name of the contract imports from the package root, and public
classes present themselves as ``cano_mp.<Name>`` (reprs, tracebacks, the API reference)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

import cano_mp

CONTRACT = [
    "Workflow", "Task", "task", "Node", "BatchTask", "ItemFailure", "TaskConfig", "RetryPolicy",
    "JoinStrategy", "JoinConfig", "SplitResult", "SharedStore", "WaitStrategy",
    "ConcurrentWorkflow", "ConcurrentResult", "InstanceResult", "Scheduler", "FlowInfo",
    "FlowStatus", "Observer", "RunInfo", "ProcessExecutor", "InlineExecutor", "Executor",
    "CanoError", "ConfigError", "TransitionError", "TaskError", "TaskTimeout", "WorkerCrashed",
    "JoinError", "WorkflowTimeout", "StoreError", "StoreKeyError", "Terminated",
    "task_context", "TaskContext", "CheckpointStore", "RunRecord", "SteppedTask",
    "CircuitBreaker", "CircuitOpen", "RateLimiter", "WindowedRateLimiter", "MultiRateLimiter",
    "Resource", "PollTask",
]  # fmt: skip


@pytest.mark.parametrize("name", CONTRACT)
def test_every_contract_name_imports_from_the_root(name: str) -> None:
    assert getattr(cano_mp, name) is not None
    assert name in cano_mp.__all__


@pytest.mark.parametrize("name", sorted(cano_mp.__all__))
def test_public_classes_report_the_package_as_their_module(name: str) -> None:
    obj = getattr(cano_mp, name)
    if isinstance(obj, type):
        assert obj.__module__ == "cano_mp", f"{name}: {obj.__module__}"
        assert pickle.loads(pickle.dumps(obj)) is obj  # by reference, through cano_mp


def test_public_errors_pickle_across_processes() -> None:
    err = cano_mp.TaskError("boom", state="A", task_name="t", attempts=2)
    out = subprocess.run(
        [sys.executable, "-c", "import pickle, sys; e = pickle.load(sys.stdin.buffer); "
         "print(type(e).__module__, type(e).__name__, e.task_name, e.attempts)"],
        input=pickle.dumps(err), capture_output=True, check=True,
    )  # fmt: skip
    assert out.stdout.decode().split() == ["cano_mp", "TaskError", "t", "2"]


def test_reprs_show_the_package() -> None:
    assert repr(cano_mp.Workflow) == "<class 'cano_mp.Workflow'>"
    assert "cano_mp._" not in repr(cano_mp.RetryPolicy.fixed(1, 0.1))


def test_the_package_has_no_import_cycle() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    tool = root.parent / "shared" / "tools" / "structure.py"
    if not tool.exists():
        pytest.skip(f"{tool} is not here (it comes with the design docs)")
    out = subprocess.run(
        [sys.executable, str(tool), str(root)], capture_output=True, text=True, check=False
    )
    assert "import cycle:" not in out.stdout, out.stdout
    assert " 0 import cycles" in out.stdout, out.stdout
