"""The queue database away while the gateway runs (a PostgreSQL restart, a failover, a full disk under SQLite).

The gateway keeps running through it: the SCP answers each C-STORE with Out of Resources (A700, the modality
sends again later) because nothing can be recorded, and the loops (ticks, heartbeats, dispatch, refusal
counts) try again at their own pace. What an admin must see is one line when it starts, naming the reason, and
one when it ends, with how long it lasted; not a traceback from every loop every second, and not a gateway
that ended on the first failed query (the main tick used to raise and stop the process).

:func:`unreachable` tells a database that cannot be reached or used (SQLAlchemy's ``OperationalError`` and
``InterfaceError``, with a DBAPI error inside) from every other error, which stays a logged traceback.

:func:`kind` tells the outages apart, because they are told differently and end differently: a database that
does not answer (``unreachable``) is back at its first answer; a database that answers reads but refuses writes
(its disk full: SQLite's SQLITE_FULL, PostgreSQL's 53100; or read-only: SQLite's SQLITE_READONLY, a PostgreSQL
standby or ``default_transaction_read_only``, 25006) is back only when a write succeeds. A full disk under SQLite
used to be said as "unreachable" and, since the main tick's reads still succeeded, as "answers again" five
seconds later, a pair of untrue lines every heartbeat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from gateway.terminal import plain

log = logging.getLogger("gateway.outage")


UNREACHABLE = (OperationalError, InterfaceError)  # what a database that cannot be reached or used raises


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached, used or written (not a bug in a query)."""
    return kind(exc) is not None


FULL, READ_ONLY, UNREACHABLE_KIND = "full", "read-only", "unreachable"
_WRITE_KINDS = (FULL, READ_ONLY)
_SQLSTATES = {"53100": FULL, "25006": READ_ONLY}  # PostgreSQL: disk_full, read_only_sql_transaction
_SAID = {
    UNREACHABLE_KIND: "the queue database cannot be reached",
    FULL: "the queue database cannot be written: its disk is full",
    READ_ONLY: "the queue database cannot be written: it is read-only",
}
_COMMENT = {  # a C-STORE refusal's Error Comment (LO: 64 characters at most)
    UNREACHABLE_KIND: "gateway queue database unreachable",
    FULL: "gateway queue database full",
    READ_ONLY: "gateway queue database read-only",
}


def kind(exc: BaseException) -> str | None:
    """``full``, ``read-only`` or ``unreachable`` for an error that says the database cannot be used; None
    for any other error (a bug in a query)."""
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig
    found = _SQLSTATES.get(str(getattr(orig, "sqlstate", "") or ""))
    if found is not None:  # psycopg raises 25006 as an InternalError, not an OperationalError
        return found
    if not isinstance(exc, UNREACHABLE):
        return None
    name = str(getattr(orig, "sqlite_errorname", "") or "")  # Python's sqlite3 names SQLite's extended code
    text = str(orig or exc).lower()
    if name == "SQLITE_FULL" or "database or disk is full" in text:
        return FULL
    if name.startswith("SQLITE_READONLY") or "readonly database" in text or "read-only transaction" in text:
        return READ_ONLY
    return UNREACHABLE_KIND


def said(exc: BaseException) -> str:
    """What the database's state is, for a refusal's log line: 'the queue database cannot be reached' or
    'the queue database cannot be written: its disk is full' (or 'it is read-only')."""
    return _SAID[kind(exc) or UNREACHABLE_KIND]


def comment(exc: BaseException) -> str:
    """The same for a DICOM refusal's Error Comment (at most 64 characters)."""
    return _COMMENT[kind(exc) or UNREACHABLE_KIND]


def reason(exc: BaseException, limit: int = 300) -> str:
    """The driver's own words for a database error (SQLAlchemy's wrapper adds its SQL and a link), one line."""
    return plain(getattr(exc, "orig", None) or exc)[:limit]


class DatabaseOutage:
    """Notes failures and successes of database work from any thread; logs the first failure of an outage,
    a change of its kind, and its end, once each. ``clock``: monotonic seconds (tests give their own);
    ``wall``: the time of day for the web page (tests give their own too)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self.since: float | None = None  # when the current outage began; None while the database answers
        self.failures = 0  # failed attempts in the current outage
        self.kind: str | None = None  # full, read-only or unreachable while down
        self.reason = ""  # the driver's words for the failure that began the outage (or changed its kind)
        self.since_wall: float | None = None
        self._said: set[str] = set()  # the kinds this outage has said (a disk full may also give I/O errors)

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, where: str, exc: BaseException) -> None:
        """A piece of database work failed. A database that cannot be reached or written starts (or continues)
        an outage, said once (and again only if its kind changes: the server back but its disk full); any other
        error is logged with its traceback, as it always was."""
        found = kind(exc)
        if found is None:
            log.error("%s failed", where, exc_info=exc)
            return
        with self._lock:
            first = self.since is None
            if first:
                self.since, self.since_wall = self._clock(), self._wall()
            if self.kind != found:
                self.kind, self.reason = found, reason(exc)
            self.failures += 1
            new = found not in self._said
            self._said.add(found)
        if not new:
            return
        if found == UNREACHABLE_KIND:
            log.error("queue database unreachable (%s: %s): instances are refused with Out of Resources (A700) "
                      "and nothing is sent or imported until it answers again; retrying", where, reason(exc))
        else:
            log.error("%s (%s: %s): instances are refused with Out of Resources (A700) and nothing is sent or "
                      "imported until it takes writes again; retrying", _SAID[found].replace("the queue", "queue", 1),
                      where, reason(exc))

    def answered(self, wrote: bool = True) -> None:
        """A piece of database work succeeded (``wrote``: it committed a write). An outage is over at the first
        answer when the database could not be reached, and only at a write when it could not be written."""
        if self.since is None or (not wrote and not self._said.isdisjoint(_WRITE_KINDS)):
            return
        with self._lock:
            since, failures, unwritable = self.since, self.failures, not self._said.isdisjoint(_WRITE_KINDS)
            self.since, self.failures, self.kind, self.reason, self.since_wall = None, 0, None, "", None
            self._said = set()
        if since is None:
            return
        if unwritable:
            log.warning("queue database takes writes again after %.0f s (%d failed attempts); the gateway goes on",
                        self._clock() - since, failures)
        else:
            log.warning("queue database answers again after %.0f s (%d failed attempts); the gateway goes on",
                        self._clock() - since, failures)

    def state(self) -> dict[str, object] | None:
        """The current outage for the web page and /metrics: kind, what it means, the driver's words, since
        (seconds since the epoch); None while the database answers."""
        with self._lock:
            if self.since is None:
                return None
            return {"kind": self.kind, "said": _SAID[self.kind or UNREACHABLE_KIND], "reason": self.reason,
                    "since": self.since_wall}
