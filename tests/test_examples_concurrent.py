"""The ConcurrentWorkflow example runs as a script and prints its result table."""

from __future__ import annotations

from .examples_run import run_example


def run(*args: str) -> list[str]:
    return run_example("concurrent_instances.py", *args).splitlines()


def test_every_partition_is_an_instance_and_the_corrupt_one_fails_alone() -> None:
    lines = run("--partitions", "8", "--rows", "50000", "--delay", "0.05")
    assert lines[0].startswith("ConcurrentResult(7 completed, 1 failed, 0 cancelled, of 8")
    rows = [line.split() for line in lines[2:]]
    assert [int(r[0]) for r in rows] == list(range(8))
    assert rows[5][1] == "failed" and "NaN readings" in lines[2 + 5]
    assert all(
        r[1] == "completed" and r[3].startswith("rows=") for i, r in enumerate(rows) if i != 5
    )
    # the partitions are deterministic: partition k's mean is about 100 + k
    for k, r in enumerate(rows):
        if k != 5:
            assert abs(float(r[4].removeprefix("mean=")) - (100 + k)) < 0.5


def test_a_duration_stops_the_slow_instances() -> None:
    lines = run("--partitions", "6", "--rows", "1000", "--delay", "60", "--duration", "2")
    assert lines[0].startswith("ConcurrentResult(0 completed, 0 failed, 6 cancelled, of 6")
    assert sum("stopped by the wait strategy" in line for line in lines) == 6
    # 4 at a time: the first four were stopped at 2 s, the last two never started
    seconds = [float(line.split()[2]) for line in lines[2:]]
    assert all(1.9 < s < 3 for s in seconds[:4]) and seconds[4:] == [0.0, 0.0]
