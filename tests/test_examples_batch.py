"""The BatchTask example runs as a script and prints what it promises."""

from __future__ import annotations

import csv
from pathlib import Path

from .examples_run import run_example


def run(out: Path) -> list[str]:
    return run_example(
        "batch_etl.py", "--files", "60", "--rows", "500", "--out", str(out)
    ).splitlines()


def test_batch_etl_collects_the_corrupt_file_and_reports_the_rest(tmp_path: Path) -> None:
    lines = run(tmp_path)
    assert "final state: DONE" in lines
    assert "files parsed: 59 of 60" in lines
    [failed] = [line for line in lines if line.startswith("failed: ")]
    assert "sales_00007_500.csv" in failed and "'three'" in failed
    report = tmp_path / "report.csv"
    assert f"report: {report}" in lines
    with open(report, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 50
    [total] = [line for line in lines if line.startswith("total revenue: ")]
    reported = float(total.removeprefix("total revenue: ").replace(",", ""))
    assert abs(reported - sum(float(r["revenue"]) for r in rows)) < 1.0
    [prices] = [line for line in lines if line.startswith("price table: ")]
    assert prices.startswith("price table: mean 22.7")
    # deterministic: a second run (files already there) prints the same figures
    again = run(tmp_path)
    assert [x for x in again if not x.startswith("took")] == [
        x for x in lines if not x.startswith("took")
    ]
