"""The split/join examples run as scripts and print what they promise."""

from __future__ import annotations

import pytest

from .examples_run import run_example


@pytest.mark.slow
def test_split_join_example_aggregates_the_three_sources() -> None:
    out = run_example("split_join.py", timeout=60)
    lines = out.splitlines()
    assert "final state: DONE" in lines
    assert "split: SplitResult(3 succeeded, 0 failed, 0 cancelled, of 3)" in lines
    for source in ("orders", "inventory", "customers"):
        assert any(
            line.strip().startswith(f"{source} ") and "records=200,000" in line for line in lines
        )
    [total] = [line for line in lines if line.startswith("aggregated total: ")]
    sums = [
        int(line.split("sum=")[1].split()[0].replace(",", "")) for line in lines if "sum=" in line
    ]
    assert len(sums) == 3
    assert int(total.removeprefix("aggregated total: ").replace(",", "")) == sum(sums)
    # the data is deterministic: a second run prints the same numbers
    again = run_example("split_join.py", timeout=60).splitlines()
    assert [line for line in again if "sum=" in line or "total" in line] == [
        line for line in lines if "sum=" in line or "total" in line
    ]


def blocks(out: str) -> dict[str, list[str]]:
    """The example's output, one block of lines per strategy, keyed by its first line."""
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("JoinStrategy."):
            current = found.setdefault(line.split(":")[0], [line])
        else:
            current.append(line)
    return found


@pytest.mark.slow
def test_join_strategies_example_shows_every_strategy() -> None:
    out = run_example("join_strategies.py", timeout=90)
    runs = blocks(out)
    assert list(runs) == [
        "JoinStrategy.all()",
        "JoinStrategy.any()",
        "JoinStrategy.quorum(2)",
        "JoinStrategy.percentage(0.75)",
        "JoinStrategy.partial_results(2)",
        "JoinStrategy.partial_timeout() with timeout=1.5s",
    ]
    fail_fast = runs["JoinStrategy.all()"]
    assert "JoinError" in fail_fast[0] and "timed_out=False" in fail_fast[0]
    assert "    cancelled: fast_a, fast_b, slow" in fail_fast or "slow" in fail_fast[-1]
    for name, lines in runs.items():
        if name != "JoinStrategy.all()":
            assert "proceeded to JOINED" in lines[0], name
        # every run reports the failing branch with its original exception
        assert any("failing (TaskError caused by ConnectionError" in line for line in lines), name
    # quorum and percentage wait for the slow branch and keep every success's writes
    for name in ("JoinStrategy.quorum(2)", "JoinStrategy.percentage(0.75)"):
        assert "    SplitResult(3 succeeded, 1 failed, 0 cancelled, of 4)" in runs[name]
        assert "    writes kept: fast_a, fast_b, slow" in runs[name]
    # the early strategies cancel the slow branch
    for name in (
        "JoinStrategy.partial_results(2)",
        "JoinStrategy.partial_timeout() with timeout=1.5s",
    ):
        assert any(line.startswith("    cancelled:") and "slow" in line for line in runs[name])
