"""cano_mp's loggers: every record carries ``run_id``, ``workflow``, ``state``, ``task`` and
``attempt`` attributes (``None`` where they do not apply), so that a format such as
``"%(workflow)s %(state)s %(task)s %(message)s"`` works for every record."""

from __future__ import annotations

import logging

__all__ = ["TAGS", "get_logger"]

TAGS = ("run_id", "workflow", "state", "task", "attempt")


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
