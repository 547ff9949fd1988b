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
import time
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
    handler.addFilter(LibraryFlood())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Every line through this handler: Python warnings (pydicom's, pynetdicom's), a thread's uncaught exception
    # and the process's own, not printed raw beside the JSON lines.
    logging.captureWarnings(True)
    threading.excepthook = _thread_exception
    sys.excepthook = _uncaught


class LibraryFlood(logging.Filter):
    """Warnings of the DICOM libraries about the data they parse (pydicom's through ``py.warnings``,
    pynetdicom's own): hostile or sloppy input made thousands of them, one per element. The first line of each
    kind (library and the message's first 60 characters) per ``window_s`` passes; the rest are counted, and the
    next line of that kind after the window says how many were left out. Our own lines are never held back."""

    LIBRARIES = ("py.warnings", "pynetdicom", "pydicom")

    def __init__(self, window_s: float = 60.0, max_kinds: int = 500) -> None:
        super().__init__()
        self.window_s, self.max_kinds = window_s, max_kinds
        self._seen: dict[tuple[str, str], list[float]] = {}  # kind -> [window start, left out]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.LIBRARIES):
            return True
        kind = (record.name.split(".", 1)[0], record.getMessage()[:60])
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(kind)
            if seen is not None and now - seen[0] < self.window_s:
                seen[1] += 1
                return False
            if seen is None and len(self._seen) >= self.max_kinds:
                self._seen.clear()
            left_out = int(seen[1]) if seen is not None else 0
            self._seen[kind] = [now, 0]
        if left_out:
            record.msg = f"{record.getMessage()} ({left_out} more like it in the last {self.window_s:.0f} s not shown)"
            record.args = None
        return True


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("gateway.threads").error("uncaught exception in thread %s", name,
                                               exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _uncaught(exc_type: type[BaseException], exc: BaseException, traceback: Any) -> None:
    logging.getLogger("gateway").critical("uncaught exception", exc_info=(exc_type, exc, traceback))
