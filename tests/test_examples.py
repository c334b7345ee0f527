"""Every example is a real program: run each one, small."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from .examples_run import run_example


def test_etl_demo_runs_and_writes_its_report(tmp_path: Path) -> None:
    stdout = run_example("etl_pipeline.py", "--size", "2", "--out", str(tmp_path), timeout=300)
    assert "finished in DONE" in stdout
    report = tmp_path / "report.csv"
    assert report.exists()
    lines = report.read_text().splitlines()
    assert lines[0].startswith("sensor,rows,mean")
    assert len(lines) == 65  # header + 64 sensors
    for state in ("GENERATE", "PARSE", "CLEAN", "TRANSFORM", "REPORT"):
        assert state in stdout
    written = sum(p.stat().st_size for p in tmp_path.glob("sensors_*.csv"))
    assert 0.85 * 2e6 <= written <= 1.15 * 2e6, written  # --size is what it writes


def test_tasks_defined_in_a_scripts_main_run_in_workers(tmp_path: Path) -> None:
    script = tmp_path / "notebook_like.py"
    script.write_text(
        textwrap.dedent(
            """
            import os
            from enum import Enum
            from cano_mp import Workflow, Task, SharedStore

            class Color(Enum):          # an Enum defined in __main__
                RED = 1
                DONE = 2

            class Point:                # a class defined in __main__, stored as a value
                def __init__(self, x):
                    self.x = x

            class Paint(Task):
                def run(self, store):
                    store["where"] = os.getpid()
                    store["point"] = Point(store["point"].x + 1)
                    return Color.DONE

            if __name__ == "__main__":
                flow = Workflow(start=Color.RED).register(Color.RED, Paint())
                flow.add_exit_state(Color.DONE)
                flow.store["point"] = Point(41)
                final = flow.orchestrate()
                assert final is Color.DONE, final
                assert flow.store["where"] != os.getpid()
                print("ok", flow.store["point"].x)
            """
        )
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok 42"


def test_the_batches_page_snippet_runs_as_written(tmp_path: Path) -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "concepts" / "batches.md").read_text()
    section = page[page.index("# Batches: a parallel map") :]
    code = section[section.index("```python\n") + 10 :]
    code = code[: code.index("```\n")]
    (tmp_path / "data").mkdir()
    for i in range(3):
        rows = "".join(f"{j},{j * 2}\n" for j in range(10 + i))
        (tmp_path / "data" / f"f{i}.csv").write_text("a,b\n" + rows)
    (tmp_path / "snippet.py").write_text(code)
    out = subprocess.run(
        [sys.executable, "snippet.py"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "33 rows"


def test_rate_limited_enrichment_stays_within_its_rate() -> None:
    stdout = run_example(
        "rate_limited_enrichment.py", "--records", "60", "--rate", "40", timeout=180
    )
    assert "enriched 60 records" in stdout
    assert "finished in DONE" in stdout
    took = float(stdout.split("finished in DONE after ")[1].split("s")[0])
    assert took >= (60 - 4) / 40 * 0.9  # burst 4, then 40 calls/s: it cannot be faster
    assert "health: {'api': True}" in stdout
