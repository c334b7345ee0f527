"""The cano-mp command line: run and graph, with the contract's exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FLOW = textwrap.dedent(
    """
    import os
    from enum import Enum, auto
    from cano_mp import Workflow, task, TaskConfig

    class S(Enum):
        A = auto()
        B = auto()
        DONE = auto()

    class Boom(Exception):
        pass

    @task(next=(S.B,))
    def a(store):
        store["a_pid"] = os.getpid()
        return S.B

    def b(store):
        return S.DONE

    def fails(store):
        raise Boom("the source file is corrupt")

    flow = Workflow(start=S.A, name="demo").register(S.A, a).register(S.B, b).add_exit_state(S.DONE)

    def make_flow():
        return flow

    broken = (
        Workflow(start=S.A, name="broken")
        .register(S.A, fails, config=TaskConfig.minimal())
        .add_exit_state(S.DONE)
    )
    invalid = Workflow(start=S.A).register(S.A, b)
    not_a_flow = 42
    """
)


@pytest.fixture
def flow_file(tmp_path: Path) -> Path:
    path = tmp_path / "myflow.py"
    path.write_text(FLOW)
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cano_mp", *args], capture_output=True, text=True, timeout=120
    )


def test_run_prints_the_final_state(flow_file: Path) -> None:
    out = cli("run", f"{flow_file}:flow", "--workers", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "DONE"


def test_run_accepts_a_factory_and_a_start_state(flow_file: Path) -> None:
    out = cli("run", f"{flow_file}:make_flow", "--state", "B", "--log-level", "INFO")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "DONE"
    assert "B -> DONE" in out.stderr  # INFO logging of transitions


def test_failed_workflow_exits_1_with_remote_traceback(flow_file: Path) -> None:
    out = cli("run", f"{flow_file}:broken")
    assert out.returncode == 1
    assert "the source file is corrupt" in out.stderr
    assert "Remote traceback" in out.stderr and "def fails" not in out.stdout
    assert "in fails" in out.stderr


@pytest.mark.parametrize(
    ("target", "extra", "message"),
    [
        ("missing.py:flow", [], "no such file"),
        ("{file}:nothing", [], "defines no 'nothing'"),
        ("{file}:not_a_flow", [], "not a Workflow"),
        ("{file}:invalid", [], "no exit state"),
        ("{file}:flow", ["--state", "NOPE"], "no state named 'NOPE'"),
        ("{file}:flow", ["--workers", "0"], "--workers"),
        ("{file}", [], "PATH.py:NAME"),
        ("no_such_module_xyz:flow", [], "cannot import"),
    ],
)
def test_bad_usage_exits_2_with_one_clear_line(
    flow_file: Path, target: str, extra: list[str], message: str
) -> None:
    out = cli("run", target.format(file=flow_file), *extra)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert message in lines[0]


def test_graph_prints_mermaid(flow_file: Path) -> None:
    out = cli("graph", f"{flow_file}:flow")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("stateDiagram-v2") and "A --> B" in out.stdout


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("cano-mp")
    assert exe.exists()
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "run" in out.stdout


def test_module_target(tmp_path: Path) -> None:
    (tmp_path / "flowmod.py").write_text(FLOW)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "cano_mp", "run", "flowmod:flow"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "DONE"
