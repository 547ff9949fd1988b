"""Queue repository, transfer attempts (one row per attempt, from its first byte) and peers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from gateway.lifecycle import State
from gateway.model import PeerConfig
from gateway.rows import (
    AuditRow,
    PeerRow,
    PeerSigningRow,
    StudyUnitRow,
    TransferArchiveRow,
    TransferRow,
    utcnow,
)


class TransfersRepo:
    """Transfer attempts and peers (mixed into ``QueueStore``)."""

    def record_transfer(self, unit_id: int | None, sid: str, peer_jid: str, direction: str, method: str,
                        offset_bytes: int, bytes_moved: int, started_at: datetime, outcome: str, error: str | None,
                        stream_s: float | None = None, wire_bytes: int | None = None) -> None:
        self.close_transfer(None, unit_id, sid, peer_jid, direction, method, offset_bytes, bytes_moved, started_at,
                            outcome, error, stream_s, wire_bytes)

    def open_transfer(self, unit_id: int | None, sid: str, peer_jid: str, direction: str, method: str,
                      offset_bytes: int) -> int:
        """The row of a stream at its first byte (outcome ``running``); returns its id."""
        with self._unit_of_work() as session:
            row = TransferRow(unit_id=unit_id, sid=sid, peer_jid=peer_jid, direction=direction, method=method,
                              offset_bytes=offset_bytes, bytes_moved=0, started_at=utcnow(), outcome="running")
            session.add(row)
            session.flush()
            return row.id

    def transfer_progress(self, row_id: int, bytes_moved: int) -> None:
        with self._unit_of_work() as session:
            session.execute(update(TransferRow).where(TransferRow.id == row_id, TransferRow.outcome == "running")
                            .values(bytes_moved=bytes_moved))

    def close_transfer(self, row_id: int | None, unit_id: int | None, sid: str, peer_jid: str, direction: str,
                       method: str, offset_bytes: int, bytes_moved: int, started_at: datetime, outcome: str,
                       error: str | None, stream_s: float | None = None, wire_bytes: int | None = None) -> None:
        """End an attempt's row (the one :meth:`open_transfer` made, or a new one for an attempt that moved
        no byte). ``bytes_moved``: study bytes (the bundle's own); ``wire_bytes``: on the stream, if compressed."""
        with self._unit_of_work() as session:
            row = session.get(TransferRow, row_id) if row_id is not None else None
            if row is None:
                row = TransferRow(unit_id=unit_id, sid=sid, peer_jid=peer_jid, direction=direction, started_at=started_at)
                session.add(row)
            row.method, row.offset_bytes, row.bytes_moved = method, offset_bytes, bytes_moved
            row.started_at = min(row.started_at, started_at)  # the offer, not the first byte: its set-up counts
            row.ended_at, row.outcome, row.error, row.stream_s = utcnow(), outcome, error, stream_s
            row.wire_bytes = wire_bytes

    def close_as_received(self, unit_id: int, detail: str) -> bool:
        """The peer answered a new offer with "already received": the unit's last outbound attempt, if it was
        left ``interrupted`` (the process stopped after the last byte) or ``cut`` (its verdict was lost), did
        deliver the bundle; it is closed as ``received`` with its whole stream counted. False: nothing to close."""
        with self._unit_of_work() as session:
            last = session.scalar(select(TransferRow).where(
                TransferRow.unit_id == unit_id, TransferRow.direction == "out",
                TransferRow.outcome != "held").order_by(TransferRow.started_at.desc(), TransferRow.id.desc()).limit(1))
            if last is None or last.outcome not in ("interrupted", "cut"):
                return False
            unit = session.get(StudyUnitRow, unit_id)
            whole = max(0, (unit.bundle_bytes or 0) - last.offset_bytes) if unit is not None else last.bytes_moved
            last.error = f"was {last.outcome}; {detail}"[:2000]
            last.outcome, last.bytes_moved = "received", max(last.bytes_moved, whole)
            return True

    def transfers(self, unit_id: int | None = None, last: int | None = None) -> list[dict[str, Any]]:
        """Attempts, oldest first: the live rows and, for one unit, its archived ones (``gateway.store_archive``);
        ``last``: only the newest so many (read as such: a year of attempts is not loaded to show 50)."""
        rows: list[Any] = []
        with self._sessions() as session:
            for table in (TransferRow, TransferArchiveRow) if unit_id is not None else (TransferRow,):
                query = select(table)
                if unit_id is not None:
                    query = query.where(table.unit_id == unit_id)
                if last is not None:
                    query = query.order_by(table.started_at.desc(), table.id.desc()).limit(last)
                rows.extend(session.scalars(query).all())
        rows.sort(key=lambda r: (r.started_at, r.id))
        if last is not None:
            rows = rows[-last:] if last else []
        return [
            {"unit_id": r.unit_id, "sid": r.sid, "peer_jid": r.peer_jid, "direction": r.direction, "method": r.method,
             "offset_bytes": r.offset_bytes, "bytes": r.bytes_moved,
             "wire_bytes": r.wire_bytes if r.wire_bytes is not None else r.bytes_moved, "started_at": r.started_at.isoformat(),
             "ended_at": r.ended_at.isoformat() if r.ended_at else None, "outcome": r.outcome, "error": r.error,
             "stream_s": r.stream_s}
            for r in rows
        ]

    def add_peer(self, jid: str, name: str = "", fingerprint: str | None = None, **config: Any) -> None:
        """Allow ``jid`` (again) and set what is given; audited. ``config``: destinations (tuple),
        max_concurrent, directions, schedule (``gateway.model.PeerConfig``)."""
        with self._unit_of_work() as session:
            existing = session.scalar(select(PeerRow).where(PeerRow.jid == jid))
            if existing is None:
                existing = PeerRow(jid=jid, name=name, allowed=True, created_at=utcnow(), destinations="",
                                   max_concurrent=1, directions="both", schedule="")
                session.add(existing)
            else:
                existing.allowed = True
                existing.name = name or existing.name
            pinned = ""
            if fingerprint:
                pinned = f"; certificate pinned to SHA-256 {fingerprint}"
                if existing.fingerprint and existing.fingerprint != fingerprint:
                    pinned = f"; certificate pin changed from {existing.fingerprint} to {fingerprint}"
                existing.fingerprint = fingerprint
            changes = _apply_config(existing, config)
            session.add(AuditRow(at=utcnow(), event="peer_added", detail=f"{jid} may exchange studies{pinned}{changes}"))

    def edit_peer(self, jid: str, name: str | None = None, fingerprint: str | None = None, **config: Any) -> bool:
        """Change what is given of a known peer; audited with the old and new values. False: unknown peer."""
        with self._unit_of_work() as session:
            existing = session.scalar(select(PeerRow).where(PeerRow.jid == jid))
            if existing is None:
                return False
            changes = _apply_config(existing, {**config, **({"name": name} if name is not None else {}),
                                               **({"fingerprint": fingerprint} if fingerprint else {})})
            session.add(AuditRow(at=utcnow(), event="peer_edited", detail=f"{jid}{changes or ': nothing changed'}"))
            if "; schedule " in changes:  # studies waiting for the old window are looked at again now
                session.execute(update(StudyUnitRow).where(StudyUnitRow.destination == jid,
                                                           StudyUnitRow.state == State.WAITING_WINDOW.value)
                                .values(next_attempt_at=None))
            return True

    def remove_peer(self, jid: str) -> bool:
        with self._unit_of_work() as session:
            existing = session.scalar(select(PeerRow).where(PeerRow.jid == jid))
            if existing is None:
                return False
            existing.allowed = False
            session.add(AuditRow(at=utcnow(), event="peer_removed", detail=f"{jid} may no longer exchange studies"))
            return True

    def peers(self) -> list[dict[str, Any]]:
        with self._sessions() as session:
            rows = session.scalars(select(PeerRow).order_by(PeerRow.jid)).all()
        return [{"jid": r.jid, "name": r.name, "allowed": r.allowed, "fingerprint": r.fingerprint,
                 "destinations": _split(r.destinations), "max_concurrent": r.max_concurrent or 1,
                 "directions": r.directions or "both", "schedule": r.schedule or "",
                 "created_at": r.created_at.isoformat()} for r in rows]

    def signing_pins(self) -> dict[str, str]:
        """Peer bare JID -> the fingerprint of our identity it pins, as its last completed exchange showed (``note_signing``)."""
        with self._sessions() as session:
            return {r.peer_jid: r.fingerprint for r in session.scalars(select(PeerSigningRow))}

    def peers_pinning(self, fingerprint: str) -> list[tuple[str, datetime]]:
        """(peer, since when) of the peers whose last exchange pinned only our identity ``fingerprint``."""
        with self._sessions() as session:
            rows = session.scalars(select(PeerSigningRow).where(PeerSigningRow.fingerprint == fingerprint)
                                   .order_by(PeerSigningRow.peer_jid))
            return [(r.peer_jid, r.updated_at) for r in rows]

    def note_signing(self, peer_jid: str, fingerprint: str) -> None:
        """Keep which of our identities ``peer_jid`` pins (an exchange completed under it): the receipts to it
        are signed with that key, whichever process sends them and after a restart."""
        for _attempt in range(2):  # two processes may insert the first row for a peer at once
            try:
                with self._unit_of_work() as session:
                    row = session.get(PeerSigningRow, peer_jid)
                    if row is None:
                        session.add(PeerSigningRow(peer_jid=peer_jid, fingerprint=fingerprint, updated_at=utcnow()))
                    elif row.fingerprint != fingerprint:
                        row.fingerprint, row.updated_at = fingerprint, utcnow()
                return
            except IntegrityError:
                continue

    def peer_configs(self) -> dict[str, PeerConfig]:
        """Every peer row as set by the admin, allowed or not, by bare JID."""
        with self._sessions() as session:
            rows = session.scalars(select(PeerRow)).all()
        return {r.jid: PeerConfig(r.jid, r.name, r.fingerprint, tuple(_split(r.destinations)), r.max_concurrent or 1,
                                  r.directions or "both", r.schedule or "", r.allowed) for r in rows}



def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _apply_config(row: PeerRow, config: dict[str, Any]) -> str:
    """Set the given columns; returns '; key old -> new' for each change (for the audit)."""
    changes = []
    for key, value in config.items():
        if value is None:
            continue
        stored = ",".join(value) if key == "destinations" else value
        before = getattr(row, key)
        if before != stored:
            setattr(row, key, stored)
            changes.append(f"; {key} {before!r} -> {stored!r}")
    return "".join(changes)
