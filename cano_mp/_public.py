"""Public classes report ``cano_mp`` as their module, so that reprs, tracebacks and the API
reference show ``cano_mp.Workflow``, not the private module that defines it. Pickling by
reference still works: every such class is an attribute of the ``cano_mp`` package."""

from __future__ import annotations

__all__ = ["public"]


def public(*objects: object) -> None:
    """Make each class (or function) of ``objects`` report ``__module__ == "cano_mp"``."""
    for obj in objects:
        obj.__module__ = "cano_mp"
