"""The queue database away while the gateway runs (a PostgreSQL restart, a failover, a full disk under SQLite).

The gateway keeps running through it: the SCP answers each C-STORE with Out of Resources (A700, the modality
sends again later) because nothing can be recorded, and the loops (ticks, heartbeats, dispatch, refusal
counts) try again at their own pace. What an admin must see is one line when it starts, naming the reason, and
one when it ends, with how long it lasted; not a traceback from every loop every second, and not a gateway
that ended on the first failed query (the main tick used to raise and stop the process).

:func:`unreachable` tells a database that cannot be reached or used (SQLAlchemy's ``OperationalError`` and
``InterfaceError``, with a DBAPI error inside) from every other error, which stays a logged traceback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import InterfaceError, OperationalError

from gateway.terminal import plain

log = logging.getLogger("gateway.outage")


UNREACHABLE = (OperationalError, InterfaceError)  # what a database that cannot be reached or used raises


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached or used (not a bug in a query)."""
    return isinstance(exc, UNREACHABLE)


def reason(exc: BaseException, limit: int = 300) -> str:
    """The driver's own words for a database error (SQLAlchemy's wrapper adds its SQL and a link), one line."""
    return plain(getattr(exc, "orig", None) or exc)[:limit]


class DatabaseOutage:
    """Notes failures and successes of database work from any thread; logs the first failure of an outage
    and its end, once each. ``clock``: monotonic seconds (tests give their own)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.since: float | None = None  # when the current outage began; None while the database answers
        self.failures = 0  # failed attempts in the current outage

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, where: str, exc: BaseException) -> None:
        """A piece of database work failed. A database that cannot be reached starts (or continues) an outage,
        said once; any other error is logged with its traceback, as it always was."""
        if not unreachable(exc):
            log.error("%s failed", where, exc_info=exc)
            return
        with self._lock:
            first = self.since is None
            if first:
                self.since = self._clock()
            self.failures += 1
        if first:
            log.error("queue database unreachable (%s: %s): instances are refused with Out of Resources (A700) "
                      "and nothing is sent or imported until it answers again; retrying", where, reason(exc))

    def answered(self) -> None:
        """A piece of database work succeeded: an outage, if any, is over."""
        if self.since is None:
            return
        with self._lock:
            since, failures = self.since, self.failures
            self.since, self.failures = None, 0
        if since is not None:
            log.warning("queue database answers again after %.0f s (%d failed attempts); the gateway goes on",
                        self._clock() - since, failures)
