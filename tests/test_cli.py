"""The cano-mp command line: run and graph, with the contract's exit codes."""

from __future__ import annotations

import json
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

    def dump_store(store):
        import json
        with open(store["out"], "w") as f:
            json.dump({k: store[k] for k in store.keys()}, f)
        return S.DONE

    seeded = Workflow(start=S.A, name="seeded").register(S.A, dump_store).add_exit_state(S.DONE)
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
        ("{file}:flow", ["--set", "novalue"], "--set needs KEY=JSON"),
        ("{file}:flow", ["--set", "=1"], "--set needs KEY=JSON"),
        ("{file}:flow", ["--set", "name=hello"], "not valid JSON"),
        ("{file}:flow", ["--store-json", "{dir}/nothing.json"], "cannot read"),
        ("{file}:flow", ["--store-json", "{dir}/list.json"], "must hold a JSON object"),
        ("{file}:flow", ["--store-json", "{dir}/broken.json"], "not valid JSON"),
    ],
)
def test_bad_usage_exits_2_with_one_clear_line(
    flow_file: Path, target: str, extra: list[str], message: str
) -> None:
    (flow_file.parent / "list.json").write_text("[1, 2]")
    (flow_file.parent / "broken.json").write_text('{"a": 1,')
    extra = [e.format(dir=flow_file.parent) for e in extra]
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


# -- import failures: exit 2, one line naming the file ----------------------------------------


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["run", "graph"])
def test_a_syntax_error_in_the_target_exits_2_naming_file_and_line(
    tmp_path: Path, command: str
) -> None:
    path = tmp_path / "typo.py"
    path.write_text("from cano_mp import Workflow\n\nflow = Workflow(\n\ndef oops(:\n")
    line = one_line(cli(command, f"{path}:flow"))
    assert "SyntaxError" in line and f"{path}:" in line, line


def test_a_syntax_error_in_a_module_the_target_imports_names_that_module(tmp_path: Path) -> None:
    (tmp_path / "helpers.py").write_text("x = 1\ny = (\n")
    path = tmp_path / "uses.py"
    path.write_text("import helpers\n")
    line = one_line(cli("run", f"{path}:flow"))
    assert f"{tmp_path / 'helpers.py'}:" in line and "SyntaxError" in line, line


RAISES = "from cano_mp import Workflow\nSETTINGS = {}\nflow = SETTINGS['db_url']\n"


def test_an_exception_at_import_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "needs_config.py"
    path.write_text(RAISES)
    line = one_line(cli("run", f"{path}:flow"))
    assert "needs_config.py" in line and "KeyError" in line and "db_url" in line, line
    assert f"{path}:3" in line and "--log-level DEBUG" in line, line
    assert "Traceback" not in cli("graph", f"{path}:flow").stderr


def test_an_exception_at_import_of_a_module_target_exits_2(tmp_path: Path) -> None:
    (tmp_path / "needs_config.py").write_text(RAISES)
    out = subprocess.run(
        [sys.executable, "-m", "cano_mp", "run", "needs_config:flow"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    line = one_line(out)
    assert "needs_config" in line and "KeyError" in line and "db_url" in line, line


@pytest.mark.parametrize("command", ["run", "graph"])
def test_log_level_debug_shows_the_import_traceback(tmp_path: Path, command: str) -> None:
    path = tmp_path / "needs_config.py"
    path.write_text(RAISES)
    out = cli(command, f"{path}:flow", "--log-level", "DEBUG")
    assert out.returncode == 2
    assert "Traceback (most recent call last)" in out.stderr
    assert out.stderr.rstrip().splitlines()[-1].startswith("cano-mp: error: cannot load")


def test_a_factory_that_raises_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "factory.py"
    path.write_text("def build():\n    raise RuntimeError('no credentials found')\n")
    line = one_line(cli("run", f"{path}:build"))
    assert "RuntimeError" in line and "no credentials found" in line and f"{path}:2" in line


# -- the current directory is on the import path, as with python -m --------------------------


def console(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed ``cano-mp`` script (not ``python -m``, which adds the cwd by itself)."""
    exe = Path(sys.executable).with_name("cano-mp")
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, cwd=cwd, env={**base, **env}, timeout=120
    )


def test_run_and_graph_import_modules_from_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "cwdflow.py").write_text(FLOW)
    out = console(
        "run", "cwdflow:flow", "--workers", "1", cwd=tmp_path
    )  # task `a` runs in a worker
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "DONE"
    out = console("graph", "cwdflow:flow", cwd=tmp_path)
    assert out.returncode == 0 and "A --> B" in out.stdout, out.stderr


def test_a_flow_file_imports_its_project_from_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "project_settings.py").write_text("NAME = 'from cwd'\n")
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "f.py").write_text("import project_settings\n" + FLOW)
    out = console("run", "flows/f.py:flow", cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_safe_path_keeps_the_current_directory_off_the_import_path(tmp_path: Path) -> None:
    (tmp_path / "cwdflow.py").write_text(FLOW)
    line = one_line(console("run", "cwdflow:flow", cwd=tmp_path, PYTHONSAFEPATH="1"))
    assert "cannot import module 'cwdflow'" in line
    out = subprocess.run(
        [sys.executable, "-P", "-m", "cano_mp", "graph", "cwdflow:flow"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert "cannot import module 'cwdflow'" in one_line(out)


def test_serve_does_not_put_the_current_directory_on_the_import_path(tmp_path: Path) -> None:
    (tmp_path / "cwdflow.py").write_text(FLOW)
    line = one_line(console("serve", "cwdflow:flow", cwd=tmp_path))
    assert "cannot import module 'cwdflow'" in line


# -- seeding the store ------------------------------------------------------------------------


def test_set_and_store_json_seed_the_store_and_set_wins(flow_file: Path, tmp_path: Path) -> None:
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps({"n": 1, "name": "from file", "rows": [1, 2]}))
    out_file = tmp_path / "seen.json"
    out = cli(
        "run",
        f"{flow_file}:seeded",
        "--store-json",
        str(seed),
        "--set",
        'name="from --set"',
        "--set",
        f"out={json.dumps(str(out_file))}",
        "--set",
        'cfg={"depth": 2, "on": true, "none": null}',
        "--set",
        "ratio=0.5",
        "--set",
        'eq="a=b"',  # only the first "=" splits
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "DONE"
    seen = json.loads(out_file.read_text())  # written by the task, in a worker
    assert seen == {
        "n": 1,
        "name": "from --set",
        "rows": [1, 2],
        "out": str(out_file),
        "cfg": {"depth": 2, "on": True, "none": None},
        "ratio": 0.5,
        "eq": "a=b",
    }
