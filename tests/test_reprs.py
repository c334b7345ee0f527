"""What Jupyter shows for cano_mp objects: the reprs it asks for, built without a kernel."""

from __future__ import annotations

import io
from enum import Enum, auto
from typing import Any

import pytest

from cano_mp import (
    ConcurrentResult,
    InstanceResult,
    RunInfo,
    SharedStore,
    SplitResult,
    TaskError,
    Workflow,
)
from cano_mp._progress import progress_bar


class S(Enum):
    START = auto()
    DONE = auto()


def start(store: SharedStore) -> S:
    return S.DONE


def test_a_workflow_renders_as_a_mermaid_block_with_a_plain_text_fallback() -> None:
    flow = Workflow(start=S.START, name="demo").register(S.START, start).add_exit_state(S.DONE)
    bundle = flow._repr_mimebundle_()
    assert bundle["text/markdown"].startswith("```mermaid\nstateDiagram-v2")
    assert bundle["text/markdown"] == flow._repr_markdown_()
    assert bundle["text/plain"] == repr(flow)


def test_a_run_info_renders_as_an_escaped_table() -> None:
    page = RunInfo(run_id="r1", workflow="<b>etl</b>")._repr_html_()
    assert "<td>r1</td>" in page
    assert "&lt;b&gt;etl&lt;/b&gt;" in page and "<b>etl" not in page


def test_a_split_result_renders_one_escaped_row_per_branch() -> None:
    err = TaskError("boom <script>")
    result: SplitResult[Any] = SplitResult(
        successes=[(0, S.DONE)], errors=[(2, err)], cancelled=[1], total=3
    )
    page = result._repr_html_()
    assert page.index("<td>0</td>") < page.index("<td>1</td>") < page.index("<td>2</td>")
    assert "&lt;script&gt;" in page and "<script>" not in page
    assert "SplitResult(1 succeeded, 1 failed, 1 cancelled, of 3)" in page


def test_a_concurrent_result_renders_one_escaped_row_per_instance() -> None:
    with SharedStore() as store:
        result: ConcurrentResult[S] = ConcurrentResult(
            results=[
                InstanceResult(0, "completed", S.DONE, None, store, 0.5),
                InstanceResult(1, "failed", None, ValueError("x < y"), store, 0.25),
            ],
            duration=0.75,
        )
        page = result._repr_html_()
    assert "<td>completed</td>" in page and "<td>0.500</td>" in page
    assert "ValueError: x &lt; y" in page
    assert "ConcurrentResult(1 completed, 1 failed, 0 cancelled, of 2" in page


def test_a_finished_progress_bar_stays_with_its_final_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    bar = progress_bar(True, 3, "items", "item")
    assert bar is not None
    bar.update(3)
    bar.close()
    last = out.getvalue().rstrip("\n").split("\r")[-1]
    assert "items" in last and "3/3" in last  # not erased by close()
    assert getattr(bar, "leave", None) is True  # a notebook widget stays too
