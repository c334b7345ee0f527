"""Checkpoints of runs: an embedded SQLite database (``store``), data
files beside it (``files``), a store's contents as a checkpoint and back (``capture``), and
what one run does with them (``session``).

Layers: uses the store (its snapshot index and segments) and the errors; nothing here knows
about workflows or the engine, which call it through :class:`~.session.Session`.
"""

from __future__ import annotations

from .store import SCHEMA_VERSION, CheckpointStore, RunRecord, Saved

__all__ = ["SCHEMA_VERSION", "CheckpointStore", "RunRecord", "Saved"]
