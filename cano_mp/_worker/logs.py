"""A task's log records, from a pool worker to the driver's loggers.

::

    worker process                                   driver (the pool's manager thread)
    --------------                                   ----------------------------------
    logger.info(...) in a task
      -> ForwardLogs (the worker's only root handler)
         tags from the task's context; not from a
         task (or below the driver's level): dropped
      -> LogMessage("log", seq, record, tags) ------>  emit_remote(record, tags):
                                                         the logger of the same name handles
                                                         it, prefixed with task, state, item,
                                                         attempt and worker pid

The worker's root level follows the driver's (sent with each call), so a record nobody would
see is never sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .. import _context
from .._log import get_logger
from .._wire import LogMessage
from .flags import CallControl

__all__ = ["ForwardLogs", "emit_remote"]

log = get_logger("cano_mp.executor")


class ForwardLogs(logging.Handler):
    """Worker: sends a task's log records to the driver (while a call runs)."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None], control: CallControl) -> None:
        super().__init__()
        self._send = send
        self._control = control

    def emit(self, record: logging.LogRecord) -> None:
        tags = _context.log_tags
        if tags is None:
            return  # not from a task
        ctx = getattr(_context._local, "ctx", None)
        if isinstance(ctx, _context._LazyContext):  # a BatchTask item: say which
            tags = {**tags, "item": ctx.build().index}
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        exc_text = record.exc_text
        if record.exc_info and not exc_text:
            exc_text = logging.Formatter().formatException(record.exc_info)
        fields = {
            "name": record.name,
            "levelno": record.levelno,
            "levelname": record.levelname,
            "msg": message,
            "pathname": record.pathname,
            "filename": record.filename,
            "module": record.module,
            "lineno": record.lineno,
            "funcName": record.funcName,
            "created": record.created,
            "msecs": record.msecs,
            "process": record.process,
            "processName": record.processName,
            "thread": record.thread,
            "threadName": record.threadName,
            "exc_text": exc_text,
            "stack_info": record.stack_info,
        }
        try:
            self._send(tuple(LogMessage("log", self._control.seq, fields, dict(tags))))
        except Exception:
            pass  # the driver is gone or the record cannot be sent: never break the task


def emit_remote(fields: dict[str, Any], tags: dict[str, Any]) -> None:
    """Driver: hand a task's log record from a worker to the logger of the same name."""
    try:
        logger = logging.getLogger(fields["name"])
        if not logger.isEnabledFor(fields["levelno"]):
            return
        record = logging.makeLogRecord(fields)
        record.args = None
        item = f" item {tags['item']}," if tags.get("item") is not None else ""
        record.msg = (
            f"[{tags.get('task')} of {tags.get('state')},{item} attempt {tags.get('attempt')}, "
            f"worker {fields.get('process')}] {fields['msg']}"
        )
        for k, v in tags.items():
            setattr(record, k, v)
        record.worker_pid = fields.get("process")
        logger.handle(record)
    except Exception:  # a log record must never break the pool
        log.debug("could not re-emit a worker's log record", exc_info=True)
