"""PollTask: wait for something outside the workflow by asking again and again.

The engine runs a PollTask through :class:`PollUnit`, an ordinary task whose every call is
*one* poll: ``poll(store)`` returns the next state, or ``None`` for "not yet" (sent back as
``CONTINUE``). Between polls the driver sleeps (``engine/poll_state.py``): no pool slot is
held while waiting. A poll that says "not yet" has its writes discarded, so state-level
isolation holds: only the poll that returns a state commits.
"""

from __future__ import annotations

from collections.abc import Hashable
from datetime import timedelta
from typing import Any, Generic, TypeVar

from ._durations import limit, seconds
from ._public import public
from ._retry import TaskConfig
from ._stepped import CONTINUE
from ._store import SharedStore
from ._task import Task, poll_next_states

__all__ = ["PollTask", "PollUnit"]

S = TypeVar("S", bound=Hashable)


class PollTask(Generic[S]):
    """Poll until ``poll`` returns a state::

        class WaitForFile(PollTask[S]):
            interval = 5.0        # seconds between the end of a poll and the next one
            timeout = 3600.0      # the whole wait: TaskTimeout when it is exceeded
            def poll(self, store) -> S | None:
                return S.LOAD if Path(store["path"]).exists() else None

    Each poll is one call in the pool (in the driver with ``config.inline``) with
    ``config``'s timeout; ``config``'s retries apply to a poll that raises. The driver
    sleeps between polls, holding no pool slot. ``timeout`` (``None`` or ``math.inf``: no
    limit) bounds the whole wait, polls, retries and sleeps together. Only the poll that
    returns a state commits its writes to the store.

    The states ``poll`` may return are declared by ``next_states`` or, as for
    :class:`Task`, by a ``Literal`` return annotation (``None`` in it is "not yet")::

        def poll(self, store) -> Literal[S.LOAD, S.GIVE_UP] | None: ...
    """

    interval: float | timedelta = 1.0
    timeout: float | timedelta | None = None
    config: TaskConfig = TaskConfig()
    next_states: tuple[S, ...] | None = None

    def poll(self, store: SharedStore) -> S | None:
        """The next state, or ``None`` to poll again after ``interval``."""
        raise NotImplementedError(f"{type(self).__name__}.poll() is not implemented")

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"<PollTask {self.name}>"


class PollUnit(Task[Any]):
    """One poll per call (see the module docstring); ``interval`` and ``timeout`` checked
    when it is registered."""

    def __init__(self, polled: PollTask[Any]) -> None:
        self.polled = polled
        name = self.name
        self.interval = seconds(getattr(polled, "interval", 1.0), f"{name}.interval")
        self.timeout = limit(getattr(polled, "timeout", None), f"{name}.timeout")
        cfg = getattr(polled, "config", None)
        self.config = cfg if cfg is not None else TaskConfig()
        declared = getattr(polled, "next_states", None)
        if declared is None:  # as Task.run's: a ``-> Literal[S.X, S.Y] | None`` annotation
            poll = getattr(polled, "poll", None)
            declared = poll_next_states(poll) if callable(poll) else None
        self.next_states = tuple(declared) if declared is not None else None

    @property
    def name(self) -> str:
        name = getattr(self.polled, "name", None)
        return name if isinstance(name, str) else type(self.polled).__name__

    def run(self, store: SharedStore) -> Any:
        out = self.polled.poll(store)
        return CONTINUE if out is None else out


public(PollTask)
