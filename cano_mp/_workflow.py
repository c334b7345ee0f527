"""Workflow: the builder users register states on, and the entry point of a run."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Hashable, Iterable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, Self, TypeVar

from ._batch import BatchTask, batch_problems
from ._durations import limit, seconds
from ._engine import (
    CANCEL_GRACE,
    Frozen,
    Plan,
    Quota,
    Run,
    is_hashable,
)
from ._errors import ConfigError
from ._executors import Executor, InlineExecutor, ProcessExecutor
from ._join import JoinConfig
from ._log import get_logger
from ._observe import Observer, Observers
from ._poll import PollTask, PollUnit
from ._public import public
from ._registry import Registration, build_plan, label, mermaid, problems
from ._resilience.resources import Resource, ResourceSet
from ._retry import TaskConfig
from ._stepped import SteppedTask, StepUnit, cursor_key
from ._store import SharedStore
from ._task import (
    Node,
    Task,
    TaskLike,
    as_unit,
    unit_config,
)

if TYPE_CHECKING:
    import os

    from ._checkpoint import CheckpointStore

__all__ = ["Workflow"]

S = TypeVar("S", bound=Hashable)
_uids = itertools.count(1)
_log = get_logger("cano_mp.workflow")


class Workflow(Generic[S]):
    """A finite state machine whose states' work runs in a pool of worker processes.

    ::

        class Step(Enum):
            LOAD = auto(); CLEAN = auto(); DONE = auto()

        flow = (
            Workflow(start=Step.LOAD)
            .register(Step.LOAD, load)          # a Task, a Node, @task or fn(store)
            .register(Step.CLEAN, clean)
            .add_exit_state(Step.DONE)
        )
        final = flow.orchestrate()              # Step.DONE

    Args:
        store: the default store (a fresh :class:`SharedStore` when omitted), reused across
            runs; ``orchestrate(store=...)`` runs on another one.
        start: the initial state when ``orchestrate()`` gets none.
        executor: ``"process"`` (default: the shared loky pool), ``"inline"`` (in the
            driver: debugging) or an :class:`Executor`.
        timeout: wall-clock budget of one run (``WorkflowTimeout`` when it expires);
            ``None`` or ``math.inf``: no limit.
        max_parallel: most pool slots this workflow holds at once, across its runs.
        name: used in logs, errors and diagrams.
        observers: :class:`Observer` objects notified as runs progress.
        cancel_grace: seconds a timed-out or cancelled call gets to return by itself
            before its worker is killed (finite: timed-out work must be stopped).
        checkpoint: a path (an embedded SQLite database, data files beside it) or a
            :class:`CheckpointStore`: each state entered is checkpointed with the store's
            contents, and :meth:`resume` continues a run that failed or crashed.
        checkpoint_keep: keep a completed run's data files (default: released).
        checkpoint_durability: ``"normal"`` (survives a crash of the process) or
            ``"fsync"`` (survives a power loss; slower).
        resources: :class:`Resource` objects by name, set up once per process on first
            use (``task_context().resources[name]``); see :meth:`check_health`.

    Durations are float seconds or ``datetime.timedelta``; ``nan`` and negatives are a
    :class:`ConfigError`.
    """

    def __init__(
        self,
        store: SharedStore | None = None,
        *,
        start: S | None = None,
        executor: Executor | Literal["process", "inline"] | None = None,
        timeout: float | timedelta | None = None,
        max_parallel: int | None = None,
        name: str | None = None,
        observers: Iterable[Observer] = (),
        cancel_grace: float | timedelta = CANCEL_GRACE,
        checkpoint: str | os.PathLike[str] | CheckpointStore | None = None,
        checkpoint_keep: bool = False,
        checkpoint_durability: Literal["normal", "fsync"] = "normal",
        resources: Mapping[str, Resource[Any]] | None = None,
    ) -> None:
        self._checkpoint_arg = _checkpoint_arg(checkpoint, checkpoint_durability)
        self._checkpoint: CheckpointStore | None = None
        self.checkpoint_keep = bool(checkpoint_keep)
        self.checkpoint_durability = checkpoint_durability
        self.last_run_id: str | None = None
        if store is not None and not isinstance(store, SharedStore):
            raise ConfigError(f"store must be a SharedStore, got {store!r}")
        if (
            executor is not None
            and executor not in ("process", "inline")
            and not isinstance(executor, Executor)
        ):
            raise ConfigError(
                f"executor must be 'process', 'inline' or an Executor, got {executor!r}"
            )
        budget = limit(timeout, "timeout")
        grace = seconds(cancel_grace, "cancel_grace")
        if max_parallel is not None and (
            isinstance(max_parallel, bool) or not isinstance(max_parallel, int)
        ):
            raise ConfigError(f"max_parallel must be an int, got {max_parallel!r}")
        observers = tuple(observers)
        for obs in observers:
            if not isinstance(obs, Observer):
                raise ConfigError(f"observers must be Observer instances, got {obs!r}")
        self._store = store
        self._start = start
        self._executor_arg: Executor | str = executor if executor is not None else "process"
        self._executor: Executor | None = executor if isinstance(executor, Executor) else None
        self.timeout = budget
        self.max_parallel = max_parallel
        self.name = name or "workflow"
        self._observers = Observers(observers)  # _observe() adds one (serve --metrics-port)
        if resources is not None and not isinstance(resources, Mapping):
            raise ConfigError(f"resources must map names to Resource objects, got {resources!r}")
        self._resources = ResourceSet(resources or {}, name or "workflow") if resources else None
        self.cancel_grace = grace
        self._uid = next(_uids)
        self._regs: dict[Any, Registration] = {}
        self._wrappers: dict[int, Any] = {}  # id(fn) -> its task wrapper (fn kept alive)
        self._order: list[Any] = []
        self._exits: list[Any] = []
        self._version = 0
        self._plan: Plan | None = None
        self._plan_version = -1
        self._validated = -1
        self._lock = threading.Lock()
        self._quota = Quota(max_parallel) if max_parallel and max_parallel >= 1 else None

    # -- building ------------------------------------------------------------------------
    def _check_state(self, state: object, what: str) -> None:
        if not is_hashable(state):
            raise ConfigError(f"{what}: states must be hashable, got {state!r}")

    def _add(self, reg: Registration) -> Self:
        # Registering a state again replaces its task (re-running a notebook cell must not
        # leave a workflow that can never run); the state keeps its place in the order.
        if reg.state in self._regs:
            _log.debug(
                "workflow %r: state %s registered again; its task is replaced",
                self.name,
                label(reg.state),
            )
        else:
            self._order.append(reg.state)
        self._regs[reg.state] = reg
        self._version += 1
        return self

    def _as_unit(self, task: TaskLike, what: str) -> Any:
        # One wrapper per bare function: a function registered on 200 states is one task
        # object, pickled once per run.
        if isinstance(task, Task | Node | BatchTask) or not callable(task):
            return as_unit(task, what=what)
        unit = self._wrappers.get(id(task))
        if unit is None:
            unit = self._wrappers[id(task)] = as_unit(task, what=what)
        return unit

    def _observe(self, observer: Observer) -> None:
        """Notify ``observer`` too, from the next run on."""
        self._observers = self._observers.plus(observer)

    def register(
        self,
        state: S,
        task: TaskLike | SteppedTask[S, Any] | PollTask[S],
        *,
        config: TaskConfig | None = None,
        compensate: TaskLike | None = None,
    ) -> Self:
        """Run ``task`` (a Task, a Node, a ``@task`` function, ``fn(store)``, a BatchTask,
        a SteppedTask or a PollTask) in ``state``.

        ``config`` overrides the task's own ``config``. ``compensate`` (``fn(store)`` or a
        Task, run in the pool with its own retry policy) undoes the state's work when the
        run later fails: see :meth:`orchestrate`. Registering a state again (with
        ``register`` or ``register_split``) replaces what it ran.
        """
        self._check_state(state, "register()")
        if isinstance(task, SteppedTask):
            unit: Any = StepUnit(task, cursor_key(label(state)))
        elif isinstance(task, PollTask):
            unit = PollUnit(task)  # interval and timeout checked here (ConfigError)
        else:
            unit = self._as_unit(task, f"register({label(state)})")
        comp = None
        if compensate is not None:
            comp = self._as_unit(compensate, f"register({label(state)}, compensate=...)")
            if isinstance(comp, BatchTask):
                raise ConfigError(f"register({label(state)}): compensate cannot be a BatchTask")
        if config is not None and not isinstance(config, TaskConfig):
            raise ConfigError(f"config must be a TaskConfig, got {config!r}")
        problems: list[str] = []
        try:
            cfg = config if config is not None else unit_config(unit)
        except ConfigError as exc:
            problems.append(str(exc))
            cfg = TaskConfig()
        if isinstance(unit, BatchTask):
            problems.extend(batch_problems(unit))
        return self._add(Registration(state, [unit], [cfg], None, problems, comp))

    def register_split(self, state: S, tasks: Iterable[TaskLike], join: JoinConfig[S]) -> Self:
        """Run ``tasks`` in parallel in ``state``; continue as ``join`` decides.

        Registering a state again replaces what it ran.
        """
        self._check_state(state, "register_split()")
        if not isinstance(join, JoinConfig):
            raise ConfigError(f"join must be a JoinConfig, got {join!r}")
        units = [self._as_unit(t, f"register_split({label(state)})") for t in tasks]
        for u in units:
            if isinstance(u, BatchTask):
                raise ConfigError(
                    f"register_split({label(state)}): a BatchTask cannot be a split branch; "
                    "register it on a state of its own (it fans out by itself)"
                )
        problems: list[str] = []
        configs = []
        for u in units:
            try:
                configs.append(unit_config(u))
            except ConfigError as exc:
                problems.append(str(exc))
                configs.append(TaskConfig())
        self._check_state(join.join_state, "JoinConfig join_state")
        return self._add(Registration(state, units, configs, join, problems))

    def add_exit_state(self, state: S) -> Self:
        """Mark ``state`` as final: a run that reaches it ends there."""
        self._check_state(state, "add_exit_state()")
        if state not in self._exits:
            self._exits.append(state)
            self._version += 1
        return self

    def add_exit_states(self, states: Iterable[S]) -> Self:
        """Mark several states as final."""
        for s in states:
            self.add_exit_state(s)
        return self

    @property
    def store(self) -> SharedStore:
        """The default store, created on first use and reused across runs."""
        if self._store is None or self._store.closed:
            self._store = SharedStore()
        return self._store

    @property
    def states(self) -> list[S]:
        """Registered states, in registration order."""
        return list(self._order)

    @property
    def exit_states(self) -> list[S]:
        """Exit states."""
        return list(self._exits)

    @property
    def executor(self) -> Executor:
        """The executor runs use (the shared process pool by default)."""
        if self._executor is None:
            self._executor = (
                InlineExecutor() if self._executor_arg == "inline" else ProcessExecutor()
            )
        return self._executor

    def _use_workers(self, n: int | ProcessExecutor) -> bool:
        """Run on a pool of ``n`` workers (or that pool) unless an executor object or
        ``"inline"`` was given; returns whether it does."""
        if not isinstance(self._executor_arg, str) or self._executor_arg == "inline":
            return False
        self._executor = n if isinstance(n, ProcessExecutor) else ProcessExecutor(max_workers=n)
        return True

    # -- checking ------------------------------------------------------------------------
    def _problems(self) -> list[str]:
        return problems(self)

    def validate(self) -> None:
        """Check the whole workflow; raise :class:`ConfigError` listing every problem."""
        problems = self._problems()
        if problems:
            raise ConfigError(
                f"workflow {self.name!r} is invalid:\n" + "\n".join(f"- {p}" for p in problems)
            )
        self._validated = self._version

    def _get_plan(self) -> Plan:
        with self._lock:
            if self._validated != self._version:
                self.validate()
            if self._plan is None or self._plan_version != self._version:
                self._plan = build_plan(
                    self.name, self._regs, self._order, self._exits, self._resources
                )
                self._plan_version = self._version
            return self._plan

    def check_health(self) -> dict[str, bool]:
        """Each resource's health: its ``health()`` on the driver's instance now (set up if
        needed; a failing setup is ``False``), and-ed with the last verdict a worker
        recorded after setting it up. ``{}`` without resources."""
        return self._resources.check_health() if self._resources is not None else {}

    # -- running -------------------------------------------------------------------------
    def freeze(self) -> Frozen:
        """Validate and freeze the workflow for runs: its plan, and its tasks as they are
        now (pickled for the workers when first needed; sent again only if they changed).
        ``start_run`` freezes for each run; ``ConcurrentWorkflow`` once per ``execute``."""
        return self._get_plan().freeze()

    def start_run(
        self,
        store: SharedStore | None = None,
        initial_state: S | None = None,
        *,
        frozen: Frozen | None = None,
        run_id: str | None = None,
    ) -> Run:
        """A run of this workflow on ``store`` (default: the workflow's own), from
        ``initial_state`` (default: ``start``), validated and ready: ``run.run()`` drives
        it in the calling thread, ``run.cancel()`` stops it from another. The one way
        ``ConcurrentWorkflow`` and ``Scheduler`` start runs. With a checkpoint, the run is
        recorded under ``run_id`` (default: a new uuid4 hex; an existing id is a
        ``ConfigError``)."""
        if store is not None and not isinstance(store, SharedStore):
            raise ConfigError(f"store must be a SharedStore, got {store!r}")
        if frozen is None:
            frozen = self.freeze()
        cs = self.checkpoint_store
        if cs is not None:
            from ._resume import new_run_id

            run_id = new_run_id(run_id)
        run = self._make_run(frozen, store, self.initial_state(initial_state), run_id)
        if cs is not None:
            from ._resume import checkpointed_run

            checkpointed_run(self, run, cs, self.checkpoint_keep)
        self.last_run_id = run.run_id
        return run

    def _make_run(
        self,
        frozen: Frozen,
        store: SharedStore | None,
        initial: Any,
        run_id: str | None,
        completed: list[Any] | None = None,
    ) -> Run:
        return Run(
            frozen,
            store if store is not None else self.store,
            self.executor,
            observers=self._observers,
            timeout=self.timeout,
            quota=self._quota,
            cancel_grace=self.cancel_grace,
            initial=initial,
            run_id=run_id,
            completed=completed,
        )

    @property
    def checkpoint_store(self) -> CheckpointStore | None:
        """The :class:`CheckpointStore` of ``Workflow(checkpoint=...)``, or None."""
        if self._checkpoint is None and self._checkpoint_arg is not None:
            from ._resume import open_store

            self._checkpoint = open_store(self._checkpoint_arg, self.checkpoint_durability)
        return self._checkpoint

    def initial_state(self, initial_state: S | None = None) -> S:
        """The state a run starts in: ``initial_state``, else ``start``; ``ConfigError``
        when neither is given."""
        state = initial_state if initial_state is not None else self._start
        if state is None:
            raise ConfigError(
                f"workflow {self.name!r} has no initial state: pass orchestrate(initial_state) "
                "or build it with Workflow(start=...)"
            )
        return state

    def orchestrate(
        self,
        initial_state: S | None = None,
        *,
        store: SharedStore | None = None,
        run_id: str | None = None,
    ) -> S:
        """Run the workflow from ``initial_state`` (or ``start``) to an exit state; block.

        Returns the exit state reached. Raises ``TaskError`` (a task failed for good),
        ``TransitionError``, ``JoinError``, ``WorkflowTimeout`` or ``ConfigError``. On
        failure the store is as the last successful state committed it — then, when states
        were registered with ``compensate=``, the compensations of the states that
        completed run, last first, and the error carries ``.compensated`` and
        ``.compensation_errors``. Ctrl-C stops the run's work promptly and re-raises
        ``KeyboardInterrupt``; the pool stays usable. ``run_id`` names the run (with a
        checkpoint: a new id, resumable with :meth:`resume`; ``last_run_id`` tells it).
        """
        result: S = self.start_run(store, initial_state, run_id=run_id).run()
        return result

    def resume(self, run_id: str, *, store: SharedStore | None = None) -> S:
        """Continue run ``run_id`` of this workflow's checkpoint: its store (the workflow's,
        or ``store``) is restored as checkpointed when the run entered its last state, and
        the run goes on from that state (whose task runs again: make tasks idempotent).

        A completed run returns its final state at once, running nothing and leaving the
        store alone. ``ConfigError``: no checkpoint, an unknown run, one another process
        runs now, one that was rolled back, or a recorded state this workflow lacks.
        """
        made = self._resumed(run_id, store)
        if not isinstance(made, Run):
            final: S = made.state
            return final
        result: S = made.run()
        return result

    def _resumed(self, run_id: str, store: SharedStore | None) -> Any:
        if store is not None and not isinstance(store, SharedStore):
            raise ConfigError(f"store must be a SharedStore, got {store!r}")
        cs = self.checkpoint_store
        if cs is None:
            raise ConfigError(
                f"workflow {self.name!r} has no checkpoint: build it with "
                "Workflow(checkpoint='runs.db') to resume runs"
            )
        from ._resume import resumed_run

        def make(frozen: Frozen, state: Any, rid: str, completed: list[Any]) -> Run:
            return self._make_run(frozen, store, state, rid, completed)

        made = resumed_run(self, cs, self.checkpoint_keep, run_id, make)
        self.last_run_id = run_id
        return made

    async def orchestrate_async(
        self,
        initial_state: S | None = None,
        *,
        store: SharedStore | None = None,
        run_id: str | None = None,
    ) -> S:
        """``orchestrate()`` for asyncio: the run's driver runs in a thread.

        Cancelling the awaiting task cancels the run's work.
        """
        result: S = await _drive_async(self.start_run(store, initial_state, run_id=run_id))
        return result

    async def resume_async(self, run_id: str, *, store: SharedStore | None = None) -> S:
        """``resume()`` for asyncio, as :meth:`orchestrate_async` is for orchestrate."""
        made = self._resumed(run_id, store)
        if not isinstance(made, Run):
            final: S = made.state
            return final
        result: S = await _drive_async(made)
        return result

    # -- showing -------------------------------------------------------------------------
    def to_mermaid(self) -> str:
        """A Mermaid ``stateDiagram-v2`` of the states, declared transitions and exits.

        Every registered state is drawn; one whose task declares no next states has a
        dashed border and a note (its transitions are known only when it runs).
        """
        return mermaid(self)

    def _repr_markdown_(self) -> str:
        return f"```mermaid\n{self.to_mermaid()}```"

    def _repr_mimebundle_(
        self, include: Any = None, exclude: Any = None, **kwargs: Any
    ) -> dict[str, str]:
        # Jupyter renders the text/markdown entry (JupyterLab 4 and VS Code draw the
        # ```mermaid block); text/plain is what consoles and older front ends show.
        return {"text/markdown": self._repr_markdown_(), "text/plain": repr(self)}

    def __repr__(self) -> str:
        return (
            f"<Workflow {self.name!r}: {len(self._regs)} states, exits "
            f"{[label(s) for s in self._exits]}>"
        )


async def _drive_async(run: Run) -> Any:
    import asyncio  # not at module level: it costs ~10 ms of import time

    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(None, run.run)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        run.cancel()
        await asyncio.wait([fut])
        raise


def _checkpoint_arg(checkpoint: object, durability: object) -> Any:
    import os

    if durability not in ("normal", "fsync"):
        raise ConfigError(f"checkpoint_durability must be 'normal' or 'fsync', got {durability!r}")
    if checkpoint is None or isinstance(checkpoint, str | os.PathLike):
        return checkpoint
    if type(checkpoint).__name__ == "CheckpointStore":
        return checkpoint
    raise ConfigError(f"checkpoint must be a path or a CheckpointStore, got {checkpoint!r}")


public(Workflow)
