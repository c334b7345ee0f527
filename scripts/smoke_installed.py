"""Smoke test of an installed cano_mp: the package, its CLI and every example.

scripts/check_wheel.sh runs this with the python of the venv the wheel was installed into,
with ``-I`` and from a directory outside the source tree, so that ``import cano_mp`` can only
find the installed package (checked first). ``--examples`` is a copy of ``examples/``; the
examples run with the arguments that keep them short (those of the test suite) and write
under ``--work``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import numpy as np

import cano_mp
from cano_mp import ProcessExecutor, SharedStore, Workflow, task

SITE = Path(sysconfig.get_paths()["purelib"]).resolve()
BIN = Path(sys.executable).parent
# Every *.py in examples/ must be here, so that a new example is not left out unnoticed.
# name -> (extra arguments, timeout in seconds, a line its output must contain)
EXAMPLES: dict[str, tuple[list[str], float, str]] = {
    "etl_pipeline.py": (["--size", "2", "--out", "{work}/etl"], 300, "finished in DONE"),
    "batch_etl.py": (
        ["--files", "60", "--rows", "500", "--out", "{work}/batch"],
        180,
        "final state: DONE",
    ),
    "concurrent_instances.py": (
        ["--partitions", "8", "--rows", "50000", "--delay", "0.05"],
        120,
        "ConcurrentResult(7 completed, 1 failed",
    ),
    "split_join.py": ([], 90, "final state: DONE"),
    "join_strategies.py": ([], 120, "JoinStrategy.partial_timeout()"),
    "dask_cluster.py": (["--size", "2", "--out", "{work}/dask"], 300, "finished in DONE"),
    "rate_limited_enrichment.py": (
        ["--records", "40", "--rate", "40"],
        180,
        "finished in DONE",
    ),
    # runs until SIGTERM: run_daemon() starts it through `cano-mp serve`
    "daemon.py": ([], 0, ""),
    # crashes on purpose, then resumes: run_resumable() runs it twice
    "resumable_etl.py": ([], 0, ""),
}


def step(name: str, fn: Callable[[], str | None]) -> None:
    started = time.monotonic()
    note = fn()
    print(f"   ok  {name:<46} {time.monotonic() - started:6.1f}s  {note or ''}", flush=True)


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"FAILED (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def expect(text: str, what: str, cmd: str) -> None:
    if what not in text:
        raise SystemExit(f"FAILED: {cmd} did not print {what!r}:\n{text}")


def check_installed() -> str:
    where = Path(cano_mp.__file__).resolve()
    assert where.is_relative_to(SITE), f"cano_mp imported from {where}, not from {SITE}"
    assert (where.parent / "py.typed").is_file(), "py.typed is not installed"
    meta = importlib.metadata.metadata("cano-mp")
    assert meta["Version"] == cano_mp.__version__, (meta["Version"], cano_mp.__version__)
    assert meta["License-Expression"] == "MIT", meta["License-Expression"]
    files = [str(f) for f in importlib.metadata.files("cano-mp") or []]
    assert any(f.endswith("licenses/LICENSE") for f in files), "LICENSE is not in the wheel"
    scripts = {ep.name for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert "cano-mp" in scripts, "no cano-mp console script"
    return str(where.parent)


class S(Enum):
    RUN = 1
    DONE = 2


@task(next=(S.DONE,))
def in_worker(store: SharedStore) -> S:
    store["worker"] = (os.getpid(), cano_mp.__file__, int(store["array"].sum()))
    return S.DONE


def check_a_pool_run() -> str:
    with ProcessExecutor(max_workers=2, reuse=False) as executor:
        flow = Workflow(start=S.RUN, executor=executor).register(S.RUN, in_worker)
        flow.add_exit_state(S.DONE)
        with flow.store as store:
            store["array"] = np.arange(1_000_000, dtype=np.int64)  # a shared-memory segment
            final = flow.orchestrate()
            pid, module, total = store["worker"]
    assert final is S.DONE, final
    assert pid != os.getpid(), "the task did not run in a worker process"
    assert Path(module).resolve().is_relative_to(SITE), f"the worker imported {module}"
    assert total == 999_999 * 1_000_000 // 2, total
    return "a pool task read a shared array, in a worker importing the installed package"


def check_cli(examples: Path, work: Path) -> None:
    commands = {
        "cano-mp": [str(BIN / "cano-mp")],
        "python -m cano_mp": [sys.executable, "-m", "cano_mp"],
    }
    target = f"{examples}/etl_pipeline.py:build"
    for label, cmd in commands.items():
        step(
            f"{label} --help",
            lambda cmd=cmd, label=label: expect(run([*cmd, "--help"], 60), "graph", label),
        )
        step(
            f"{label} graph etl_pipeline.py:build",
            lambda cmd=cmd, label=label: expect(
                run([*cmd, "graph", target], 60), "stateDiagram-v2", label
            ),
        )
    env = {"CANO_ETL_SIZE": "1", "CANO_ETL_OUT": str(work / "etl-cli")}
    cmd = [*commands["cano-mp"], "run", target, "--workers", "2"]
    step("cano-mp run etl_pipeline.py:build", lambda: expect(run(cmd, 300, env), "DONE", "run"))


def run_example(path: Path, args: list[str], timeout: float, promise: str) -> str:
    out = run([sys.executable, str(path), *args], timeout)
    expect(out, promise, path.name)
    return ""


def run_resumable(examples: Path, work: Path) -> str:
    """The first run crashes on purpose (exit 3) after checkpointing; the second resumes."""
    cmd = [sys.executable, str(examples / "resumable_etl.py"), "--db", str(work / "etl.db")]
    cmd += ["--rows", "50000"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if first.returncode != 3:
        raise SystemExit(f"FAILED: resumable_etl.py should crash with 3:\n{first.stderr}")
    expect(run(cmd, 120), "finished in DONE", "resumable_etl.py (resumed)")
    return ""


def run_daemon(examples: Path, work: Path) -> str:
    """`cano-mp serve examples/daemon.py:build` until three reports, then SIGTERM: exit 0."""
    status, reports = work / "daemon" / "status.json", work / "daemon" / "reports.log"
    proc = subprocess.Popen(
        [
            str(BIN / "cano-mp"),
            "serve",
            f"{examples}/daemon.py:build",
            "--status-file",
            str(status),
        ],
        env={**os.environ, "CANO_MP_DAEMON_DIR": str(work / "daemon"), "REPORT_EVERY": "0.3"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (reports.exists() and len(reports.read_text().splitlines()) >= 3):
            if proc.poll() is not None or time.monotonic() > deadline:
                _, err = proc.communicate(timeout=30) if proc.poll() is None else ("", "")
                raise SystemExit(f"FAILED: the daemon wrote no three reports:\n{err}")
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if proc.returncode != 0 or not status.exists():
        raise SystemExit(f"FAILED: the daemon exited {proc.returncode} after SIGTERM:\n{err}")
    return "three reports, then a graceful stop on SIGTERM"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=Path, required=True, help="a copy of examples/")
    parser.add_argument("--work", type=Path, required=True, help="where the examples write")
    args = parser.parse_args()
    examples: Path = args.examples.resolve()
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"   python {sys.version.split()[0]} at {sys.executable}", flush=True)
    step("import cano_mp from site-packages", check_installed)
    step("a workflow on a process pool", check_a_pool_run)
    check_cli(examples, work)
    scripts = sorted(p.name for p in examples.glob("*.py"))
    missing = sorted(set(scripts) - set(EXAMPLES))
    if missing:
        raise SystemExit(f"FAILED: add {missing} to EXAMPLES in {__file__}")
    for name in scripts:
        if name == "daemon.py":
            step("cano-mp serve daemon.py:build", lambda: run_daemon(examples, work))
            continue
        if name == "resumable_etl.py":
            step("examples/resumable_etl.py, crash + resume", lambda: run_resumable(examples, work))
            continue
        argv, timeout, promise = EXAMPLES[name]
        argv = [a.format(work=work) for a in argv]
        step(
            f"examples/{name}",
            lambda name=name, argv=argv, timeout=timeout, promise=promise: run_example(
                examples / name, argv, timeout, promise
            ),
        )
    # examples/notebook.ipynb needs a Jupyter kernel (nbclient, ipykernel: test tools, not
    # extras of the package); tests/test_notebook.py runs it on every interpreter instead.
    print("   the installed wheel passed", flush=True)


if __name__ == "__main__":
    main()
