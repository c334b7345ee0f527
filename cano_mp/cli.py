"""The ``cano-mp`` command: run a workflow, or print its diagram.

::

    cano-mp run   PATH.py:NAME | module:NAME [--state MEMBER] [--workers N] [--log-level LEVEL]
                  [--warm] [--fork-server]
                  [--set KEY=JSON ...] [--store-json FILE]
    cano-mp graph PATH.py:NAME | module:NAME [--log-level LEVEL]
    cano-mp runs  DB                                  the runs a checkpoint database holds
    cano-mp resume PATH.py:NAME RUN_ID --checkpoint DB [--workers N] [--log-level LEVEL]
    cano-mp serve PATH.py:NAME | module:NAME [--status-file PATH] [--stop-timeout S]
                  [--control [PATH]] [--metrics-port N] [--log-level LEVEL]
    cano-mp ctl   PATH list | trigger FLOW | pause FLOW | resume FLOW | reset FLOW | stop

Exit codes (``resume`` as ``run``): 0 success (for ``serve``: a graceful stop on SIGINT /
SIGTERM), 1 the workflow failed (the error and the worker's traceback on stderr; for
``serve``: running flows had to be cancelled at the stop timeout), 2 bad usage or
configuration (one clear line; for ``ctl``: also an unknown flow or a refused connection),
130 interrupted (Ctrl-C during ``run``).

Targets are imported as ``python -m`` would: ``run`` and ``graph`` put the current directory
on the import path (unless ``python -P`` / ``PYTHONSAFEPATH``); ``serve`` does not add it
(a daemon should not import from wherever it was started). A target that fails to import
(a syntax error, an exception raised at import) or a factory that raises is bad
configuration: one line naming the file, the line and the error; ``--log-level DEBUG`` adds
the traceback.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import importlib.util
import json
import logging
import os
import runpy
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any, Literal, NoReturn

from ._errors import CanoError, ConfigError, TaskError
from ._executors import ProcessExecutor
from ._log import get_logger
from ._workflow import Workflow

__all__ = ["load_target", "main"]


class UsageError(Exception):
    """Bad usage: reported as one line, exit code 2."""


class TargetError(UsageError):
    """The target failed to import or to build: one line, plus the traceback at DEBUG."""

    def __init__(self, message: str, details: str) -> None:
        super().__init__(message)
        self.details = details


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _raised_at(exc: BaseException, origin: str | None) -> str | None:
    """``file:line`` in the user's code where ``exc`` came from: the deepest frame in the
    target's own file, else the deepest frame outside the import machinery."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith("<frozen")
        and f.filename != runpy.__file__
        and os.path.dirname(os.path.abspath(f.filename)) != os.path.dirname(__file__)
    ]
    if origin is not None:
        own = [f for f in frames if os.path.abspath(f.filename) == origin]
        if own:
            frames = own
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None


def _target_failed(what: str, exc: Exception, origin: str | None) -> TargetError:
    """A one-line TargetError for ``exc`` raised while importing or building a target."""
    details = "".join(traceback.format_exception(exc)).rstrip()
    if isinstance(exc, SyntaxError):  # IndentationError and TabError included
        where = f"{exc.filename}:{exc.lineno}" if exc.filename else "?"
        return TargetError(
            f"cannot {what}: {type(exc).__name__} at {where}: {exc.msg or 'invalid syntax'}",
            details,
        )
    at = _raised_at(exc, origin)
    return TargetError(
        f"cannot {what}: {type(exc).__name__}: {_one_line(str(exc)) or '(no message)'}"
        + (f" (at {at})" if at else "")
        + "; --log-level DEBUG shows the traceback",
        details,
    )


def _module_origin(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except Exception:  # a parent package that fails to import: no file to name
        return None
    origin = spec.origin if spec is not None else None
    return os.path.abspath(origin) if origin and os.path.isfile(origin) else None


def _put_cwd_on_path() -> None:
    """What ``python -m`` does: the current directory first on the import path, unless
    ``-P`` / ``PYTHONSAFEPATH`` asks for safe-path semantics."""
    if sys.flags.safe_path:
        return
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _split_target(target: str) -> tuple[str, str]:
    source, sep, name = target.rpartition(":")
    if not sep or not source or not name:
        raise UsageError(f"target must be PATH.py:NAME or module:NAME, got {target!r}")
    return source, name


def load_object(target: str, *, cwd_on_path: bool = False) -> Any:
    """Load ``NAME`` from ``PATH.py`` or from an importable module.

    ``cwd_on_path``: import as ``python -m`` does, with the current directory on the path
    (``cano-mp run`` and ``graph``); ``-P`` / ``PYTHONSAFEPATH`` is honoured.
    """
    source, name = _split_target(target)
    if cwd_on_path:
        _put_cwd_on_path()
    if source.endswith(".py") or os.sep in source:
        if not os.path.isfile(source):
            raise UsageError(f"no such file: {source}")
        path = os.path.abspath(source)
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        # Run as a non-importable module so that cloudpickle sends its functions and classes
        # to the workers by value, as for a script's __main__ (nothing re-runs there).
        try:
            namespace = runpy.run_path(path, run_name="__cano_mp_main__")
        except Exception as exc:
            raise _target_failed(f"load {source}", exc, path) from exc
        if name not in namespace:
            raise UsageError(f"{source} defines no {name!r}")
        return namespace[name]
    try:
        module = importlib.import_module(source)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (source == missing or source.startswith(missing + ".")):
            raise UsageError(f"cannot import module {source!r}: {exc}") from exc
        raise _target_failed(f"import module {source!r}", exc, _module_origin(source)) from exc
    except Exception as exc:
        raise _target_failed(f"import module {source!r}", exc, _module_origin(source)) from exc
    try:
        return getattr(module, name)
    except AttributeError:
        raise UsageError(f"module {source!r} has no attribute {name!r}") from None


def load_target(target: str, kind: type[Any] = Workflow, *, cwd_on_path: bool = False) -> Any:
    """Load a ``kind`` object, or call a zero-argument function that returns one."""
    obj = load_object(target, cwd_on_path=cwd_on_path)
    if not isinstance(obj, kind) and callable(obj) and not isinstance(obj, type):
        try:
            obj = obj()
        except (ConfigError, UsageError):
            raise
        except Exception as exc:
            origin = getattr(getattr(obj, "__code__", None), "co_filename", None)
            raise _target_failed(
                f"build {target}", exc, os.path.abspath(origin) if origin else None
            ) from exc
    if not isinstance(obj, kind):
        raise UsageError(
            f"{target} is a {type(obj).__name__}, not a {kind.__name__} "
            f"(or a function returning one)"
        )
    return obj


def _find_state(flow: Workflow[Any], member: str) -> Any:
    candidates = [*flow.states, *flow.exit_states]
    for state in candidates:
        label = state.name if isinstance(state, enum.Enum) else str(state)
        if member in (label, str(state)):
            return state
    names = ", ".join(s.name if isinstance(s, enum.Enum) else str(s) for s in candidates)
    raise UsageError(f"no state named {member!r} (states: {names})")


def _label(state: Any) -> str:
    return state.name if isinstance(state, enum.Enum) else str(state)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cano-mp",
        description="Run CPU pipelines as finite state machines on a pool of worker processes.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a workflow and print its final state")
    run.add_argument("target", help="PATH.py:NAME or module:NAME (a Workflow or a factory)")
    run.add_argument("--state", help="initial state (an Enum member name)")
    run.add_argument("--workers", type=int, help="worker processes (default: usable CPUs)")
    run.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    run.add_argument(
        "--warm",
        action="store_true",
        help="start the workers before importing the target, so that they start while it "
        "imports (a workflow on the default executor)",
    )
    run.add_argument(
        "--fork-server",
        action="store_true",
        help="fork the workers from a copy of this process made before the target is "
        "imported: each starts in milliseconds instead of as a fresh interpreter",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        dest="set_values",
        metavar="KEY=JSON",
        help="put KEY in the store before the run, its value parsed as JSON (repeatable; "
        "quote strings: --set name='\"x\"'); wins over --store-json for the same key",
    )
    run.add_argument(
        "--store-json",
        metavar="FILE",
        help="put every key of FILE's JSON object in the store before the run",
    )
    graph = sub.add_parser("graph", help="print a workflow's Mermaid diagram")
    graph.add_argument("target", help="PATH.py:NAME or module:NAME")
    graph.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    serve = sub.add_parser(
        "serve", help="run a Scheduler as a daemon until SIGINT / SIGTERM (graceful stop)"
    )
    serve.add_argument("target", help="PATH.py:NAME or module:NAME (a Scheduler or a factory)")
    serve.add_argument(
        "--status-file", help="JSON of every flow's status, rewritten atomically after each run"
    )
    serve.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for running flows on SIGTERM before cancelling them "
        "(default 30; inf: no limit)",
    )
    serve.add_argument(
        "--control",
        nargs="?",
        const="default",
        metavar="PATH",
        help="open a control socket (0600) at PATH for 'cano-mp ctl'; without PATH (or "
        "'default'), in a new 0700 directory under $XDG_RUNTIME_DIR or the temp directory",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve the flows' metrics as Prometheus text on http://127.0.0.1:N/metrics",
    )
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING, ERROR")
    ctl = sub.add_parser("ctl", help="control a 'serve --control' daemon (JSON lines)")
    ctl.add_argument("path", help="the control socket")
    ctl.add_argument("op", choices=("list", "trigger", "pause", "resume", "reset", "stop"))
    ctl.add_argument("flow", nargs="?", help="the flow id (trigger, pause, resume, reset)")
    from ._cli_runs import add_commands

    add_commands(sub)
    return parser


def _fail(message: str) -> NoReturn:
    print(f"cano-mp: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _logging(level_name: str) -> None:
    level = str(level_name).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise UsageError(f"unknown log level {level_name!r}")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _cmd_serve(args: argparse.Namespace) -> int:
    from ._scheduler import Scheduler
    from ._scheduler.triggers import duration

    _logging(args.log_level)
    try:
        duration(args.stop_timeout, "--stop-timeout", inf_ok=True)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    sched = load_target(args.target, Scheduler)
    if args.status_file:
        sched.status_file = args.status_file
    log = get_logger("cano_mp.cli")
    flows = ", ".join(f"{i.id} ({i.schedule})" for i in sched.list()) or "none"
    log.info("serving %d flow(s): %s (pid %d)", len(sched.list()), flows, os.getpid())
    from ._scheduler.control import ControlServer, MetricsServer, attach_metrics

    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise UsageError(f"--metrics-port must be 0..65535, got {args.metrics_port}")
    opened: list[ControlServer | MetricsServer] = []
    try:
        if args.metrics_port is not None:
            opened.append(MetricsServer(attach_metrics(sched), args.metrics_port))
        if args.control is not None:
            path = None if args.control == "default" else args.control
            opened.append(ControlServer(sched, path, sched._request_stop))
        try:
            sched.run_forever(stop_timeout=args.stop_timeout)
        except CanoError as exc:
            print(f"cano-mp: {exc}", file=sys.stderr)
            return 1
    finally:
        for server in reversed(opened):
            server.close()
    return 0


def _cmd_ctl(args: argparse.Namespace) -> int:
    from ._scheduler.control import FLOW_OPS, ControlError, request

    if (args.op in FLOW_OPS) != (args.flow is not None):
        raise UsageError(
            f"ctl {args.op} needs a flow id"
            if args.op in FLOW_OPS
            else f"ctl {args.op} takes no flow id"
        )
    message = {"op": args.op} if args.flow is None else {"op": args.op, "flow": args.flow}
    try:
        reply = request(args.path, message)
    except ControlError as exc:
        raise UsageError(str(exc)) from None
    if reply.get("ok") is not True:
        raise UsageError(_one_line(str(reply.get("error", "the request failed"))))
    print(json.dumps(reply))
    return 0


def _store_seed(store_json: str | None, settings: Sequence[str]) -> dict[str, Any]:
    """The keys ``--store-json FILE`` and ``--set KEY=JSON`` put in the store (``--set``
    wins for a key in both)."""
    seed: dict[str, Any] = {}
    if store_json is not None:
        try:
            with open(store_json, encoding="utf-8") as f:
                loaded = json.load(f)
        except OSError as exc:
            raise UsageError(f"--store-json: cannot read {store_json}: {exc.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(
                f"--store-json: {store_json} is not valid JSON: {_one_line(str(exc))}"
            ) from None
        if not isinstance(loaded, dict):
            raise UsageError(
                f"--store-json: {store_json} must hold a JSON object of keys and values, "
                f"got a {type(loaded).__name__}"
            )
        seed.update(loaded)
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or not key:
            raise UsageError(f"--set needs KEY=JSON, got {setting!r}")
        try:
            seed[key] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"--set {key}: {text!r} is not valid JSON ({exc.msg}); "
                f"strings need JSON quotes: --set {key}='\"{text}\"'"
            ) from None
    return seed


def _cmd_run(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    early = _early_pool(args)  # first: the process is still single-threaded
    try:
        _logging(args.log_level)
        seed = _store_seed(args.store_json, args.set_values)
        flow = load_target(args.target, cwd_on_path=True)
        if early is not None and not flow._use_workers(early):
            early.close()  # the workflow brings its own executor
        elif early is None and args.workers is not None:
            flow._use_workers(args.workers)
        initial = _find_state(flow, args.state) if args.state else None
        flow.validate()
        for key, value in seed.items():
            flow.store[key] = value
        return run_reported(flow, lambda: flow.orchestrate(initial))
    finally:
        if early is not None:
            early.close()


def _early_pool(args: argparse.Namespace) -> ProcessExecutor | None:
    """``--warm`` / ``--fork-server``: the pool for a workflow on the default executor,
    made before the target is imported (``--fork-server`` forks its template then)."""
    if not (args.warm or args.fork_server):
        return None
    from ._executors.forkserver import fork_template

    if args.fork_server and not fork_template():  # pragma: no cover - threads already
        get_logger("cano_mp.cli").info("--fork-server: a fresh fork server (threads run)")
    start: Literal["loky", "forkserver"] = "forkserver" if args.fork_server else "loky"
    return ProcessExecutor(args.workers, reuse=False, warm=args.warm, start_method=start)


def run_reported(flow: Workflow[Any], run: Any) -> int:
    """Call ``run()``; print the final state (0), or the failure and the worker's
    traceback on stderr (1). ConfigError goes up (exit code 2)."""
    started = time.monotonic()
    try:
        final = run()
    except (TaskError, CanoError) as exc:
        if isinstance(exc, ConfigError):
            raise
        print(
            f"cano-mp: workflow {flow.name!r} failed: {type(exc).__name__}: {exc}", file=sys.stderr
        )
        remote = getattr(exc, "remote_traceback", None)
        if remote:
            print("\nRemote traceback (from the worker):", file=sys.stderr)
            print(remote.rstrip(), file=sys.stderr)
        elif exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        return 1
    get_logger("cano_mp.cli").info("finished in %.3fs", time.monotonic() - started)
    print(_label(final))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cano-mp`` and ``python -m cano_mp``."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "ctl":
            return _cmd_ctl(args)
        if args.command in ("runs", "resume"):
            from ._cli_runs import run_command

            return run_command(args, sys.modules[__name__])
        _logging(args.log_level)
        flow = load_target(args.target, cwd_on_path=True)
        sys.stdout.write(flow.to_mermaid())
        return 0
    except UsageError as exc:
        if isinstance(exc, TargetError) and str(args.log_level).upper() == "DEBUG":
            print(exc.details, file=sys.stderr)
        _fail(str(exc))
    except ConfigError as exc:
        _fail(" ".join(str(exc).split("\n")))
    except KeyboardInterrupt:
        print("cano-mp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
