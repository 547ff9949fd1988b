"""Claims with an owner and a lease: several gateway processes on one queue (PostgreSQL) never work on the
same study unit or receive the same bundle at once.

- A process *claims* a unit before it sends or imports it: one transaction selects due, unclaimed rows with
  ``FOR UPDATE SKIP LOCKED`` (PostgreSQL; SQLite has one writer at a time and ignores it) and writes its
  ``owner`` and ``lease_until``. Another process skips a unit whose lease runs, so a study is offered by one
  process at a time and a crash leftover is recognised as one only when its lease has expired.
- The owner renews its leases by a heartbeat (every ``lease_s / 4``); a SIGKILLed process stops renewing and
  its claims are free after ``lease_s``. An owner on this host whose PID no longer runs is free at once (a
  restarted single gateway resumes without waiting out its own old lease).
- The receiving side claims each inbound stream by the bundle's manifest SHA-256 (table ``stream_claims``):
  a stream of a bundle that another process receives is refused as busy while that one runs (within one
  process a new offer of the bundle, the sender's fallback from S5B to IBB, is admitted as before).

The owner id is ``host:pid:random``; every method is one short transaction.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from gateway.lifecycle import State
from gateway.rows import StreamClaimRow, StudyUnitRow, utcnow
from gateway.store import lease_engine

IN_FLIGHT = (State.OFFERING.value, State.SENDING.value, State.IMPORTING.value)


def new_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def local_pid(owner: str) -> int | None:
    """The PID ``owner`` (``host:pid:tag``) names when it names a process of this host, else None."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit() or len(pid_text) > 9:  # pid_max is 2^22
        return None
    return int(pid_text)


def pid_runs(pid: int) -> bool:
    """Whether a process with this PID runs on this host (another user's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone_here(owner: str) -> bool:
    """True when ``owner`` names a process on this host that no longer runs."""
    pid = local_pid(owner)
    return pid is not None and not pid_runs(pid)


class Claims:
    """This process's claims on the queue (thread-safe: every call is its own transaction)."""

    def __init__(self, engine: Engine, owner: str | None = None, lease_s: float = 60.0,
                 owner_gone: Callable[[str], bool] = owner_gone_here) -> None:
        self.owner = owner or new_owner_id()
        self.lease_s = lease_s
        self._owner_gone = owner_gone
        self._sessions = sessionmaker(lease_engine(engine), expire_on_commit=False)  # commits not waiting for the disk
        self._stream_refs: dict[str, int] = {}  # bundle -> streams of it this process admitted
        # Held across a stream claim's or release's row as well: a claim that came between a release's last
        # reference and its row's delete found this process's own row and was refused as "another stream".
        self._refs_lock = threading.Lock()

    def _until(self) -> datetime:
        return utcnow() + timedelta(seconds=self.lease_s)

    def free(self, now: datetime | None = None) -> ColumnElement[bool]:
        """SQL: the unit is claimed by nobody, by us, by a lease that ran out, or by a process gone from here."""
        moment = now or utcnow()
        clauses: list[Any] = [StudyUnitRow.owner.is_(None), StudyUnitRow.owner == self.owner,
                              StudyUnitRow.lease_until < moment]
        gone = self._gone_owners()
        if gone:
            clauses.append(StudyUnitRow.owner.in_(gone))
        return or_(*clauses)

    def lapsed(self, now: datetime | None = None) -> ColumnElement[bool]:
        """SQL: the unit is held by no live process (for recovery): unowned, its lease ran out, or its process
        is gone from this host; never a unit this process holds."""
        moment = now or utcnow()
        clauses: list[Any] = [StudyUnitRow.owner.is_(None), StudyUnitRow.lease_until < moment]
        gone = self._gone_owners()
        if gone:
            clauses.append(StudyUnitRow.owner.in_(gone))
        return and_(or_(StudyUnitRow.owner.is_(None), StudyUnitRow.owner != self.owner), or_(*clauses))

    def _gone_owners(self) -> list[str]:
        with self._sessions() as session:
            owners = session.scalars(select(StudyUnitRow.owner).where(StudyUnitRow.owner.is_not(None)).distinct()).all()
        return [o for o in owners if o and o != self.owner and self._owner_gone(o)]

    def claim_due(self, where: Sequence[Any], limit: int = 100) -> list[int]:
        """Claim up to ``limit`` unclaimed units matching ``where`` (skipping rows another process has locked);
        returns their ids, STAT first, then oldest first. Each row is taken by a compare-and-set, so SQLite (no row locks)
        is as safe as PostgreSQL."""
        free = self.free()
        until = self._until()
        with self._sessions.begin() as session:
            ids = session.scalars(
                select(StudyUnitRow.id).where(*where, free)
                .order_by(StudyUnitRow.priority != "stat", StudyUnitRow.id).limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            won = [unit_id for unit_id in ids if session.execute(
                update(StudyUnitRow).where(StudyUnitRow.id == unit_id, *where, free)
                .values(owner=self.owner, lease_until=until)).rowcount == 1]
        return won

    def claim(self, unit_id: int) -> bool:
        """Claim one unit if it is free (compare-and-set)."""
        with self._sessions.begin() as session:
            result = session.execute(update(StudyUnitRow).where(StudyUnitRow.id == unit_id, self.free())
                                     .values(owner=self.owner, lease_until=self._until()))
            return result.rowcount == 1

    def release(self, unit_id: int) -> None:
        with self._sessions.begin() as session:
            session.execute(update(StudyUnitRow).where(StudyUnitRow.id == unit_id, StudyUnitRow.owner == self.owner)
                            .values(owner=None, lease_until=None))

    def heartbeat(self) -> int:
        """Renew every lease this process holds; returns how many units and streams it holds."""
        until = self._until()
        with self._sessions.begin() as session:
            units = session.execute(update(StudyUnitRow).where(StudyUnitRow.owner == self.owner).values(lease_until=until))
            streams = session.execute(update(StreamClaimRow).where(StreamClaimRow.owner == self.owner).values(lease_until=until))
            return units.rowcount + streams.rowcount

    def held(self) -> list[int]:
        with self._sessions() as session:
            return list(session.scalars(select(StudyUnitRow.id).where(StudyUnitRow.owner == self.owner)).all())

    # -- inbound streams ------------------------------------------------------------------------
    def claim_stream(self, bundle_sha256: str, peer_jid: str) -> str | None:
        """Claim the inbound stream of a bundle for this process; None when claimed (or this process holds it
        already: a fallback offer from S5B to IBB supersedes its own first attempt), else who holds it."""
        with self._refs_lock:
            if self._stream_refs.get(bundle_sha256):
                self._stream_refs[bundle_sha256] += 1
                return None
            holder = self._claim_stream_row(bundle_sha256, peer_jid)
            if holder is None:
                self._stream_refs[bundle_sha256] = 1
            return holder

    def _claim_stream_row(self, bundle_sha256: str, peer_jid: str) -> str | None:
        now = utcnow()
        try:
            with self._sessions.begin() as session:
                session.add(StreamClaimRow(bundle_sha256=bundle_sha256, peer_jid=peer_jid, owner=self.owner,
                                           lease_until=self._until()))
            return None
        except IntegrityError:
            pass
        with self._sessions.begin() as session:
            row = session.get(StreamClaimRow, bundle_sha256, with_for_update=True)
            if row is None:
                session.add(StreamClaimRow(bundle_sha256=bundle_sha256, peer_jid=peer_jid, owner=self.owner,
                                           lease_until=self._until()))
                return None
            if row.lease_until < now or (row.owner != self.owner and self._owner_gone(row.owner)):
                row.owner, row.peer_jid, row.lease_until = self.owner, peer_jid, self._until()
                return None
            return row.owner

    def release_stream(self, bundle_sha256: str) -> None:
        with self._refs_lock:
            left = self._stream_refs.get(bundle_sha256, 0) - 1
            if left > 0:
                self._stream_refs[bundle_sha256] = left
                return
            self._stream_refs.pop(bundle_sha256, None)
            self._drop_stream_row(bundle_sha256)

    def _drop_stream_row(self, bundle_sha256: str) -> None:
        with self._sessions.begin() as session:
            session.execute(delete(StreamClaimRow).where(StreamClaimRow.bundle_sha256 == bundle_sha256,
                                                         StreamClaimRow.owner == self.owner))
