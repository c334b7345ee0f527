"""examples/notebook.ipynb runs on a real Jupyter kernel and shows what it promises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "notebook.ipynb"


def outputs(cell: Any) -> tuple[str, list[dict[str, Any]]]:
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    rich = [o.data for o in cell.outputs if o.output_type in ("execute_result", "display_data")]
    return text, rich


def test_the_notebook_runs_on_a_kernel_and_renders_its_results() -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError if any cell fails
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors

    _, rich = outputs(code[0])
    assert "stateDiagram-v2" in rich[0]["text/markdown"]  # the workflow as Mermaid
    text, _ = outputs(code[1])
    assert "final: DONE" in text and "ran in a worker: True" in text  # cell functions -> workers
    _, rich = outputs(code[2])
    assert "SplitResult(2 succeeded, 0 failed, 1 cancelled, of 3)" in rich[0]["text/html"]
    text, rich = outputs(code[3])
    assert "sum of squares: 2666466670000" in text
    assert any("application/vnd.jupyter.widget-view+json" in r for r in rich)  # tqdm.auto widget
    _, rich = outputs(code[4])
    assert "ConcurrentResult(6 completed" in rich[-1]["text/html"]
    text, rich = outputs(code[5])
    assert "status: COMPLETED" in text and "<table>" in rich[-1]["text/html"]
    text, _ = outputs(code[6])
    seconds = float(text.split("interrupted after ")[1].split()[0])
    assert seconds < 3  # the stop button stops the run promptly
    text, _ = outputs(code[7])
    assert "after the interrupt: DONE" in text  # and the pool is still usable
