"""cano_mp's loggers: every record carries ``run_id``, ``workflow``, ``state``, ``task`` and
``attempt`` attributes (``None`` where they do not apply), so that a format such as
``"%(workflow)s %(state)s %(task)s %(message)s"`` works for every record."""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["TAGS", "Tags", "emit", "get_logger"]

TAGS = ("run_id", "workflow", "state", "task", "attempt")
# One record's tags, in TAGS order (a plain tuple: built once per record on hot paths).
Tags = tuple[str | None, str | None, Any, str | None, int | None]


class _FillTags(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        d = record.__dict__
        for tag in TAGS:
            if tag not in d:
                d[tag] = None
        return True


_FILL = _FillTags()


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` (under ``cano_mp.``), its records always tagged."""
    logger = logging.getLogger(name)
    if _FILL not in logger.filters:
        logger.addFilter(_FILL)
    return logger


def emit(logger: logging.Logger, level: int, msg: str, args: tuple[Any, ...], tags: Tags) -> None:
    """``logger.log(level, msg, *args)`` with ``tags`` as the record's tag attributes, for
    the engine's per-transition lines: the caller checks ``logger.isEnabledFor(level)``
    first. The record is the one ``Logger.log`` would make (the record factory in force,
    the caller's file, line and function), made without ``findCaller``'s walk up the stack
    and without ``extra``'s per-key checks (the tags are never LogRecord attributes)."""
    frame = sys._getframe(1)
    code = frame.f_code
    record = logging.getLogRecordFactory()(
        logger.name, level, code.co_filename, frame.f_lineno, msg, args, None, code.co_name, None
    )
    d = record.__dict__
    d["run_id"], d["workflow"], d["state"], d["task"], d["attempt"] = tags
    logger.handle(record)
