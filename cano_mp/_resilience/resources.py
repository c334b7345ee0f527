"""Resources: a connection (a client, a model...) set up once per process that uses it.

::

    Workflow(resources={"db": Resource(setup=connect, teardown=close, health=ping)})
        |  a ResourceSet (the mapping + a key made once per workflow) travels with the
        |  workflow's units in the plan's blob: pickled once per run, sent when it changed
        v
    worker process: task_context().resources["db"]
        first use here -> setup() -> kept in this module's registry, keyed (workflow, name)
        later uses     -> the same object
        process exit   -> teardown() (atexit: a pool's close stops its workers with an
                          orderly exit; a worker killed by a signal cannot run it)

Inline tasks, ``BatchTask.load``/``finish`` and :meth:`Workflow.check_health` use the
driver's own instance, set up the same way. A failing ``setup`` raises
:class:`ResourceError` in the task that asked (its retry policy decides) and is tried
again on the next use. Each process records its resource's last ``health()`` verdict (or
a failed setup) in a shared cell, which ``check_health()`` reports beside the driver's
own probe.
"""

from __future__ import annotations

import atexit
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from .._errors import CanoError, ConfigError
from .._log import get_logger
from .._public import public
from .._store import shm as _shm
from .shared import SharedCell

__all__ = ["Resource", "ResourceError", "ResourceSet", "teardown_all"]

log = get_logger("cano_mp.resources")

T = TypeVar("T")


class ResourceError(CanoError):
    """A resource's ``setup`` failed; it is tried again on the next use.

    Raised by ``task_context().resources[name]`` (and :meth:`Workflow.check_health` reports
    ``False`` for it). In task code it can be caught to fall back; a task that lets it
    propagate fails that attempt, its retry policy decides, and the :class:`TaskError`
    that ends the run has it as ``__cause__``::

        try:
            flow.orchestrate()
        except TaskError as err:
            if isinstance(err.__cause__, ResourceError):
                ...  # the database never came up

    Its message names the resource, the workflow, the process and the setup's exception
    (``__cause__`` of the ``ResourceError`` itself when it was raised in this process).
    """


class Resource(Generic[T]):
    """Something a task needs that is costly to make: made once per process, on first use.

    ::

        wf = Workflow(start=S.A, resources={
            "db": Resource(setup=lambda: connect(URL), teardown=lambda c: c.close(),
                           health=lambda c: c.ping()),
        })
        # in a task:  conn = task_context().resources["db"]

    ``setup()`` runs in each worker process the first time a task there asks for it (and
    once in the driver for inline tasks); ``teardown(value)`` when that process exits (a
    pool's ``close()``, interpreter exit); ``health(value) -> bool`` after setup and from
    :meth:`Workflow.check_health`. The callables are pickled to the workers with the
    workflow's tasks (cloudpickle: lambdas and ``__main__`` functions work).
    """

    def __init__(
        self,
        setup: Callable[[], T],
        teardown: Callable[[T], None] | None = None,
        health: Callable[[T], bool] | None = None,
    ) -> None:
        for what, fn in (("setup", setup), ("teardown", teardown), ("health", health)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"Resource {what} must be callable, got {fn!r}")
        if setup is None:
            raise ConfigError("Resource needs a setup callable")
        self.setup = setup
        self.teardown = teardown
        self.health = health

    def __repr__(self) -> str:
        return f"Resource(setup={getattr(self.setup, '__qualname__', self.setup)!r})"


_lock = threading.RLock()
_live: dict[tuple[str, str], tuple[int, Resource[Any], Any]] = {}  # -> (pid, resource, value)
_atexit_pid: int | None = None


def _health_cell(key: str, name: str) -> SharedCell:
    # last verdict (1 healthy, 0 not, -1 never), when (monotonic), by which pid
    return SharedCell("health", f"{key}\0{name}", (), "qdq", (-1, 0.0, 0))


def _note_health(key: str, name: str, ok: bool) -> None:
    if not os.environ.get(_shm.OWNER_ENV):
        return  # the driver: check_health() probes its instance itself
    try:
        cell = _health_cell(key, name)
        cell.lock()
        try:
            cell.write((int(ok), time.monotonic(), os.getpid()))
        finally:
            cell.unlock()
    except Exception:  # never fail a task over bookkeeping
        log.debug("could not record the health of resource %r", name, exc_info=True)


def _probe(resource: Resource[Any], value: Any, name: str) -> bool:
    if resource.health is None:
        return True
    try:
        return bool(resource.health(value))
    except Exception:
        log.warning("health() of resource %r raised; counted unhealthy", name, exc_info=True)
        return False


class ResourceSet(Mapping[str, Any]):
    """A workflow's resources as tasks see them: ``resources[name]`` sets up on first use
    in this process. Pickles as the mapping and its key, never as the live values."""

    def __init__(self, resources: Mapping[str, Resource[Any]], label: str = "") -> None:
        checked: dict[str, Resource[Any]] = {}
        for name, res in resources.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"resource names must be non-empty str, got {name!r}")
            if not isinstance(res, Resource):
                raise ConfigError(f"resource {name!r} must be a Resource, got {res!r}")
            checked[name] = res
        self.resources = checked
        self.label = label
        self.key = secrets.token_hex(8)

    def __getitem__(self, name: str) -> Any:
        resource = self.resources.get(name)
        if resource is None:
            known = ", ".join(sorted(self.resources)) or "none"
            raise KeyError(f"no resource {name!r} in workflow {self.label!r} (known: {known})")
        return self._instance(name, resource)

    def __iter__(self) -> Iterator[str]:
        return iter(self.resources)

    def __len__(self) -> int:
        return len(self.resources)

    def _instance(self, name: str, resource: Resource[Any]) -> Any:
        global _atexit_pid
        key, pid = (self.key, name), os.getpid()
        with _lock:
            live = _live.get(key)
            if live is not None and live[0] == pid:
                return live[2]
            try:
                value = resource.setup()
            except Exception as exc:
                _note_health(self.key, name, False)
                raise ResourceError(
                    f"setup of resource {name!r} of workflow {self.label!r} failed in process "
                    f"{pid}: {type(exc).__name__}: {exc} (it is tried again on the next use)"
                ) from exc
            _live[key] = (pid, resource, value)
            if _atexit_pid != pid:
                _atexit_pid = pid
                atexit.register(teardown_all)
        _note_health(self.key, name, _probe(resource, value, name))
        return value

    def check_health(self) -> dict[str, bool]:
        """Each resource: the driver's instance probed now (set up if needed), and the last
        verdict a worker recorded (after its setup: healthy, or setup failed)."""
        report = {}
        for name, resource in self.resources.items():
            try:
                value = self._instance(name, resource)
            except ResourceError:
                report[name] = False
                continue
            report[name] = _probe(resource, value, name) and self._workers_ok(name)
        return report

    def _workers_ok(self, name: str) -> bool:
        cell = _health_cell(self.key, name)
        cell.lock()
        try:
            verdict, _at, _pid = cell.read()
        finally:
            cell.unlock()
        return bool(verdict != 0)

    def __getstate__(self) -> dict[str, Any]:
        return {"resources": self.resources, "label": self.label, "key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def teardown_all() -> None:
    """Tear down what this process set up (at exit), last made first."""
    pid = os.getpid()
    with _lock:
        mine = [(k, v) for k, v in _live.items() if v[0] == pid]
        for k, _v in mine:
            del _live[k]
    for (_key, name), (_pid, resource, value) in reversed(mine):
        if resource.teardown is None:
            continue
        try:
            resource.teardown(value)
        except Exception:
            log.warning("teardown of resource %r failed", name, exc_info=True)


public(Resource, ResourceError)
