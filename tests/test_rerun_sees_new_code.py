"""Each run sees the tasks as they are now (issue 13): module globals and task attributes
changed between two ``orchestrate()`` calls reach the workers; unchanged tasks are not sent
again (their pickle hashes the same)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from enum import Enum
from pathlib import Path

import pytest

from cano_mp import Task, Workflow

ROOT = Path(__file__).resolve().parent.parent


class S(Enum):
    A = 1
    DONE = 2


@pytest.mark.parametrize("executor", ["process", "inline"])
def test_a_changed_global_and_attribute_reach_the_next_run(tmp_path: Path, executor: str) -> None:
    script = tmp_path / "notebook_like.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from enum import Enum
            from cano_mp import Workflow, Task

            class S(Enum):
                A = 1
                B = 2
                DONE = 3

            FACTOR = 2

            def scale(store):
                store["x"] = 10 * FACTOR
                return S.B

            class Limit(Task):
                def __init__(self, limit):
                    self.limit = limit
                def run(self, store):
                    store["limit"] = self.limit
                    return S.DONE

            limit = Limit(5)
            flow = Workflow(executor={executor!r}).register(S.A, scale).register(S.B, limit)
            flow.add_exit_state(S.DONE)
            flow.orchestrate(S.A)
            print(flow.store["x"], flow.store["limit"])
            FACTOR = 3
            limit.limit = 6
            flow.orchestrate(S.A)
            print(flow.store["x"], flow.store["limit"])
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["20", "5", "30", "6"]


class Counter(Task[S]):
    def __init__(self, n: int) -> None:
        self.n = n

    def run(self, store: object) -> S:
        return S.DONE


def test_unchanged_tasks_hash_the_same_and_changed_ones_do_not() -> None:
    counter = Counter(1)
    flow = Workflow(executor="process").register(S.A, counter).add_exit_state(S.DONE)
    first, again = flow.freeze().units, flow.freeze().units
    assert first is not again and first.key == again.key  # sent once: same bytes, same key
    counter.n = 2
    assert flow.freeze().units.key != first.key
