"""Log lines for people (``text``) or for a log collector (``json``), with the transfer they belong to.

:func:`bind` puts fields (``study_uid``, ``unit_id``, ``transfer_id``, ``peer``) into a context variable for
the duration of a block; every log line written inside it, on this thread, on the asyncio tasks it starts
and in ``asyncio.to_thread`` calls (which copy the context), carries them. ``json`` writes one object per
line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, the bound fields, and ``exc`` with the
traceback when there is one. :func:`configure` also routes Python warnings, uncaught exceptions of threads and
of the process through the same handler, so with ``json`` every line is one JSON object (the web server
logs through the root logger too: ``adapters.web``). Secrets never reach a log line here: nothing logs settings.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
_fields: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("dicomgw_log_fields", default={})


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every log line written inside the block (nested blocks add to the outer ones)."""
    token = _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _fields.reset(token)


def set_fields(**fields: Any) -> None:
    """Add ``fields`` for the rest of the current context (an asyncio task: until it ends)."""
    _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})


def bound() -> dict[str, Any]:
    return dict(_fields.get())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "dicomgw", {}),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "dicomgw", {})
        return f"{text} [{' '.join(f'{k}={v}' for k, v in fields.items())}]" if fields else text


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.dicomgw = _fields.get()
        return True


def configure(level: str = "INFO", log_format: str = "text") -> None:
    """The process's logging: one stderr handler in ``log_format`` (text or json)."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Every line through this handler: Python warnings (pydicom's, pynetdicom's), a thread's uncaught exception
    # and the process's own, not printed raw beside the JSON lines.
    logging.captureWarnings(True)
    threading.excepthook = _thread_exception
    sys.excepthook = _uncaught


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("gateway.threads").error("uncaught exception in thread %s", name,
                                               exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _uncaught(exc_type: type[BaseException], exc: BaseException, traceback: Any) -> None:
    logging.getLogger("gateway").critical("uncaught exception", exc_info=(exc_type, exc, traceback))
