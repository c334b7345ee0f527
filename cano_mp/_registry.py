"""A workflow's registrations as data: checked (``problems``) and drawn (``mermaid``) without
running anything. ``Workflow`` keeps one :class:`Registration` per state."""

from __future__ import annotations

import enum
import itertools
import re
from dataclasses import dataclass
from typing import Any

from ._batch import BatchTask
from ._engine import Plan, StateEntry, is_hashable, make_unit_ref
from ._join import JoinConfig
from ._poll import PollUnit
from ._retry import TaskConfig
from ._stepped import StepUnit
from ._task import Node, Task, declared_next_states, unit_config, unit_name

__all__ = ["Registration", "build_plan", "label", "mermaid", "problems"]


@dataclass(eq=False)
class Registration:
    """What ``register`` / ``register_split`` recorded for one state."""

    state: Any
    units: list[Task[Any] | Node[Any, Any, Any] | BatchTask[Any, Any, Any]]
    configs: list[TaskConfig]
    join: JoinConfig[Any] | None
    problems: list[str]
    compensate: Any = None  # a Task run when a later failure rolls the run back


def label(state: object) -> str:
    """A state as messages and diagrams show it."""
    if isinstance(state, enum.Enum):
        return state.name
    return str(state)


def problems(wf: Any) -> list[str]:
    """Every problem of ``wf``'s registrations (what ``Workflow.validate`` raises)."""
    problems: list[str] = []
    exits = set(wf._exits)
    for s in wf._exits:
        if s in wf._regs:
            problems.append(f"exit state {label(s)} also has a task")
    if not wf._exits:
        problems.append("no exit state: add one with add_exit_state()")
    # A start state that is an exit state is valid: orchestrate() returns it at once.
    if wf._start is not None and wf._start not in wf._regs and wf._start not in exits:
        problems.append(f"start state {label(wf._start)} has no task")
    if wf.max_parallel is not None and wf.max_parallel < 1:
        problems.append(f"max_parallel must be >= 1, got {wf.max_parallel}")
    known = set(wf._regs) | exits
    for state, reg in wf._regs.items():
        problems.extend(reg.problems)
        if reg.join is None:
            declared = declared_next_states(reg.units[0])
            for nxt in declared or ():
                if not is_hashable(nxt) or nxt not in known:
                    problems.append(
                        f"task {unit_name(reg.units[0])!r} of state {label(state)} declares "
                        f"next state {label(nxt)}, which is neither registered nor an exit "
                        "state"
                    )
            continue
        join, n = reg.join, len(reg.units)
        if n == 0:
            problems.append(f"split state {label(state)} has no tasks")
        if join.join_state not in known:
            problems.append(
                f"join state {label(join.join_state)} of split {label(state)} is neither "
                "registered nor an exit state"
            )
        strat = join.strategy
        if strat.n is not None and n and not 1 <= strat.n <= n:
            problems.append(
                f"split {label(state)}: {strat.kind}({strat.n}) needs 1 <= n <= {n} "
                "(the number of tasks)"
            )
        if strat.p is not None and not 0 < strat.p <= 1:
            problems.append(f"split {label(state)}: percentage must be within (0, 1]")
        if strat.kind == "partial_timeout" and join.timeout is None:
            problems.append(
                f"split {label(state)}: partial_timeout() needs JoinConfig(timeout=...)"
            )
        if join.max_parallel is not None and join.max_parallel < 1:
            problems.append(
                f"split {label(state)}: max_parallel must be >= 1, got {join.max_parallel}"
            )
    return problems


def mermaid(wf: Any) -> str:
    """A Mermaid ``stateDiagram-v2`` of ``wf``'s states, declared transitions and exits.

    Every registered state is drawn; one whose task declares no next states has a
    dashed border and a note (its transitions are known only when it runs).
    """
    ids: dict[Any, str] = {}
    used: set[str] = set()

    def ident(state: Any) -> str:
        if state not in ids:
            base = re.sub(r"\W", "_", label(state)) or "state"
            if base[0].isdigit():
                base = "s_" + base
            name, n = base, 2
            while name in used:
                name, n = f"{base}_{n}", n + 1
            used.add(name)
            ids[state] = name
        return ids[state]

    lines = ["stateDiagram-v2"]
    for state in dict.fromkeys([*wf._order, *wf._exits]):
        sid = ident(state)
        # Declared on a line of its own, a state is drawn even without transitions.
        if sid != label(state):
            lines.append(f'    state "{label(state)}" as {sid}')
        else:
            lines.append(f"    {sid}")
    undeclared: list[str] = []
    if wf._start is not None:
        lines.append(f"    [*] --> {ident(wf._start)}")
    for state in wf._order:
        reg = wf._regs[state]
        if reg.join is None:
            declared = declared_next_states(reg.units[0])
            if declared is None:
                undeclared.append(ident(state))
            for nxt in declared or ():
                if is_hashable(nxt):
                    lines.append(f"    {ident(state)} --> {ident(nxt)}")
        else:
            names = ", ".join(unit_name(u) for u in reg.units)
            lines.append(
                f"    {ident(state)} --> {ident(reg.join.join_state)}: "
                f"split [{names}] {reg.join.strategy!r}"
            )
    for state in wf._exits:
        lines.append(f"    {ident(state)} --> [*]")
    if undeclared:
        lines.append("    classDef undeclared stroke-dasharray: 5 5")
        lines.append(f"    class {', '.join(undeclared)} undeclared")
        for sid in undeclared:
            lines.append(f"    note right of {sid}: next states not declared")
    return "\n".join(lines) + "\n"


def build_plan(
    name: str,
    regs: dict[Any, Registration],
    order: list[Any],
    exits: list[Any],
    resources: Any,
) -> Plan:
    """The registrations frozen for running: one ``UnitRef`` per task (compensations
    included), numbered in registration order."""
    table = tuple(dict.fromkeys([*order, *exits]))
    entries: dict[Any, StateEntry] = {}
    index = itertools.count()
    for state, reg in regs.items():
        refs = []
        for unit, cfg in zip(reg.units, reg.configs, strict=True):
            refs.append(
                make_unit_ref(
                    unit,
                    unit_name(unit),
                    cfg,
                    declared_next_states(unit) if reg.join is None else None,
                    state,
                    table,
                    next(index),
                    name,
                )
            )
        batch = reg.join is None and isinstance(reg.units[0], BatchTask)
        stepped = reg.join is None and isinstance(reg.units[0], StepUnit)
        if stepped:
            reg.units[0].enums = _enums(table)  # type: ignore[union-attr]
        poll = reg.join is None and isinstance(reg.units[0], PollUnit)
        entries[state] = StateEntry(state, refs, reg.join, batch, stepped, poll)
    comps = {
        state: _compensation_ref(reg, table, next(index), name)
        for state, reg in regs.items()
        if reg.compensate is not None
    }
    return Plan(name, entries, frozenset(exits), table, comps, resources)


def _enums(table: tuple[Any, ...]) -> tuple[type[enum.Enum], ...]:
    return tuple(dict.fromkeys(type(s) for s in table if isinstance(s, enum.Enum)))


def _compensation_ref(reg: Registration, table: tuple[Any, ...], index: int, wf: str) -> Any:
    unit = reg.compensate
    return make_unit_ref(
        unit, f"compensate {unit_name(unit)}", unit_config(unit), None, reg.state, table, index, wf
    )
