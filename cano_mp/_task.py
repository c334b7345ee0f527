"""Tasks, Nodes and the ``@task`` decorator: the units of work of a workflow.

A *unit* is what runs as one call (in a pool worker, or inline in the driver): a
:class:`Task`'s ``run``, or a :class:`Node`'s ``prep → exec → post``. A retry re-runs the
whole unit.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Hashable, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, overload

from ._batch import BatchTask
from ._errors import ConfigError
from ._public import public
from ._retry import RetryPolicy, TaskConfig

if TYPE_CHECKING:
    from ._store import SharedStore

__all__ = ["FunctionTask", "Node", "Task", "TaskLike", "task"]

S = TypeVar("S", bound=Hashable)
P = TypeVar("P")
E = TypeVar("E")


class Task(Generic[S]):
    """A unit of work: ``run(store)`` reads and writes the store and returns the next state.

    Subclass it and override :meth:`run`; set ``config`` (a class attribute or a property)
    for retries, timeout and placement, and optionally ``next_states`` to declare the states
    ``run`` may return (checked by ``Workflow.validate()`` and drawn by ``to_mermaid()``)::

        class Load(Task[Step]):
            config = TaskConfig(retry=RetryPolicy.fixed(2, 0.5), timeout=10)
            next_states = (Step.TRANSFORM,)

            def run(self, store: SharedStore) -> Step:
                store["rows"] = read_rows()
                return Step.TRANSFORM

    Tasks are pickled with cloudpickle and sent to each worker once per workflow;
    changing a task object after its first run is not seen by the workers.
    """

    config: TaskConfig = TaskConfig()
    next_states: tuple[S, ...] | None = None

    def run(self, store: SharedStore) -> S:
        """Do the work and return the next state."""
        raise NotImplementedError(f"{type(self).__name__}.run() is not implemented")

    @property
    def name(self) -> str:
        """The task's name in errors, logs and diagrams (its class name by default)."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"<{type(self).__name__} task>"


class Node(Generic[S, P, E]):
    """A unit with a ``prep → exec → post`` lifecycle, run and retried as one.

    ``prep(store)`` reads what ``exec`` needs, ``exec(prep_result)`` does the work without
    the store, and ``post(store, exec_result)`` writes results and returns the next state.

    :meth:`run` chains the three; a subclass that overrides ``run(store)`` runs through its
    own ``run`` instead (as in Cano), and may call ``super().run(store)``.
    """

    config: TaskConfig = TaskConfig()
    next_states: tuple[S, ...] | None = None

    def prep(self, store: SharedStore) -> P:
        """Read the inputs of :meth:`exec` from the store."""
        raise NotImplementedError(f"{type(self).__name__}.prep() is not implemented")

    def exec(self, prep_result: P) -> E:
        """Do the work."""
        raise NotImplementedError(f"{type(self).__name__}.exec() is not implemented")

    def post(self, store: SharedStore, exec_result: E) -> S:
        """Write the results and return the next state."""
        raise NotImplementedError(f"{type(self).__name__}.post() is not implemented")

    def run(self, store: SharedStore) -> S:
        """The whole unit: ``post(store, exec(prep(store)))``."""
        return self.post(store, self.exec(self.prep(store)))

    @property
    def name(self) -> str:
        """The node's name in errors, logs and diagrams (its class name by default)."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"<{type(self).__name__} node>"


class FunctionTask(Task[S]):
    """A :class:`Task` made from a plain function ``fn(store) -> state`` by :func:`task`."""

    def __init__(
        self,
        fn: Callable[[SharedStore], S],
        *,
        config: TaskConfig | None = None,
        next_states: Iterable[S] | None = None,
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise ConfigError(f"task() needs a callable, got {fn!r}")
        self.fn = fn
        self._name = name or getattr(fn, "__qualname__", None) or repr(fn)
        self.config = config if config is not None else TaskConfig()
        declared = tuple(next_states) if next_states is not None else _literal_return(fn)
        self.next_states = declared

    def run(self, store: SharedStore) -> S:
        return self.fn(store)

    def __call__(self, store: SharedStore) -> S:
        """Call the wrapped function directly (handy in unit tests)."""
        return self.fn(store)

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"<task {self._name}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # What a worker needs: the function, its name and declared states. The config
        # (retries, timeout) is the driver's business; leaving it out keeps a plan of 200
        # states cheap to pickle for every run.
        return (_function_task, (self.fn, self._name, self.next_states))


def _function_task(
    fn: Callable[[SharedStore], Any], name: str, next_states: tuple[Any, ...] | None
) -> FunctionTask[Any]:
    t: FunctionTask[Any] = FunctionTask.__new__(FunctionTask)
    t.fn, t._name, t.next_states = fn, name, next_states
    t.config = TaskConfig()
    return t


TaskLike = Task[Any] | Node[Any, Any, Any] | BatchTask[Any, Any, Any] | Callable[..., Any]
"""What ``register()`` accepts: a Task, a Node, a BatchTask or ``fn(store)``
(``register_split()``: all but BatchTask)."""


def _make_config(
    config: TaskConfig | None,
    retry: RetryPolicy | None,
    timeout: float | timedelta | None,
    inline: bool | None,
) -> TaskConfig | None:
    if config is not None and (retry is not None or timeout is not None or inline is not None):
        raise ConfigError("pass either config= or retry=/timeout=/inline=, not both")
    if config is not None:
        return config
    if retry is None and timeout is None and inline is None:
        return None
    default = TaskConfig()
    return TaskConfig(
        retry=retry if retry is not None else default.retry,
        timeout=timeout.total_seconds() if isinstance(timeout, timedelta) else timeout,
        inline=bool(inline),
    )


class TaskDecorator(Protocol):
    """What ``@task(...)`` without ``next=`` returns: generic in the state type."""

    def __call__(self, fn: Callable[[SharedStore], S], /) -> FunctionTask[S]: ...


@overload
def task(fn: Callable[[SharedStore], S], /) -> FunctionTask[S]: ...


@overload
def task(
    *,
    retry: RetryPolicy | None = None,
    timeout: float | timedelta | None = None,
    inline: bool | None = None,
    name: str | None = None,
    config: TaskConfig | None = None,
) -> TaskDecorator: ...


@overload
def task(
    *,
    retry: RetryPolicy | None = None,
    timeout: float | timedelta | None = None,
    inline: bool | None = None,
    next: Iterable[S],
    name: str | None = None,
    config: TaskConfig | None = None,
) -> Callable[[Callable[[SharedStore], S]], FunctionTask[S]]: ...


def task(
    fn: Callable[[SharedStore], S] | None = None,
    /,
    *,
    retry: RetryPolicy | None = None,
    timeout: float | timedelta | None = None,
    inline: bool | None = None,
    next: Iterable[S] | None = None,
    name: str | None = None,
    config: TaskConfig | None = None,
) -> FunctionTask[S] | TaskDecorator | Callable[[Callable[[SharedStore], S]], FunctionTask[S]]:
    """Turn a function ``fn(store) -> state`` into a :class:`Task`.

    Use it bare or with arguments::

        @task
        def load(store): ...

        @task(retry=RetryPolicy.fixed(2, 0.5), timeout=10.0, next=(S.A, S.B), name="load")
        def load(store): ...

    A ``Literal[...]`` return annotation declares the next states when ``next`` is omitted.
    """
    cfg = _make_config(config, retry, timeout, inline)

    def wrap(f: Callable[[SharedStore], S]) -> FunctionTask[S]:
        return FunctionTask(f, config=cfg, next_states=next, name=name)

    if fn is not None:
        return wrap(fn)
    return wrap


def _literal_return(fn: Callable[..., Any], *, none_ok: bool = False) -> tuple[Any, ...] | None:
    """States declared by a ``Literal[...]`` return annotation, or None. With ``none_ok``
    (``PollTask.poll``: ``None`` means "not yet"), ``None`` in the annotation is left out."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: nothing declared
        raw = getattr(fn, "__annotations__", {}).get("return")
        if raw is None or isinstance(raw, str):
            return None
        hints = {"return": raw}
    ret = hints.get("return")
    if ret is None:
        return None
    values = _literal_values(ret, none_ok)
    return values if values else None  # a bare None / Literal[None]: nothing declared


def _literal_values(annotation: object, none_ok: bool = False) -> tuple[Any, ...] | None:
    if typing.get_origin(annotation) is Literal:
        args = typing.get_args(annotation)
        return tuple(a for a in args if a is not None) if none_ok else tuple(args)
    if typing.get_origin(annotation) in (typing.Union, __import__("types").UnionType):
        values: list[Any] = []
        for arg in typing.get_args(annotation):
            if none_ok and arg is type(None):
                continue
            inner = _literal_values(arg, none_ok)
            if inner is None:
                return None
            values.extend(inner)
        return tuple(values)
    return None


def poll_next_states(fn: Callable[..., Any]) -> tuple[Any, ...] | None:
    """States declared by a ``poll`` method's return annotation (``Literal[...] | None``)."""
    return _literal_return(fn, none_ok=True)


def declared_next_states(unit: object) -> tuple[Any, ...] | None:
    """The states a unit declares it may return, or None when it declares none."""
    declared = getattr(unit, "next_states", None)
    if declared is not None:
        return tuple(declared)
    method: Callable[..., Any] | None = None
    if isinstance(unit, Node):
        # An overridden run() says what the unit returns; otherwise post() does.
        method = unit.run if type(unit).run is not Node.run else unit.post
    elif isinstance(unit, BatchTask):
        method = unit.finish
    elif isinstance(unit, Task):
        method = unit.run
    if method is not None:
        return _literal_return(method)
    return None


def unit_name(unit: object) -> str:
    """A readable name for a task, node or callable."""
    name = getattr(unit, "name", None)
    if isinstance(name, str):
        return name
    return getattr(unit, "__qualname__", None) or type(unit).__name__


def unit_config(unit: object) -> TaskConfig:
    """The unit's ``config`` (a class attribute or property), checked."""
    cfg = getattr(unit, "config", None)
    if cfg is None:
        return TaskConfig()
    if not isinstance(cfg, TaskConfig):
        raise ConfigError(f"{unit_name(unit)}.config must be a TaskConfig, got {cfg!r}")
    return cfg


def as_unit(
    obj: object, *, what: str
) -> Task[Any] | Node[Any, Any, Any] | BatchTask[Any, Any, Any]:
    """Accept a Task, Node, BatchTask or bare callable; wrap a callable with :func:`task`."""
    if isinstance(obj, Task | Node | BatchTask):
        return obj
    if isinstance(obj, type) and issubclass(obj, Task | Node | BatchTask):
        raise ConfigError(
            f"{what}: got the class {obj.__name__}, pass an instance: {obj.__name__}()"
        )
    if callable(obj):
        return FunctionTask(obj)
    raise ConfigError(f"{what}: expected a Task, a Node or a function fn(store), got {obj!r}")


public(FunctionTask, Node, Task)
