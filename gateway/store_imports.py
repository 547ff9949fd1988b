"""Queue repository, the receiving side: import into the local PACS, Storage Commitment, receipts, retention."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, select, update

from gateway.lifecycle import State
from gateway.model import StudySummary
from gateway.rows import (
    AuditRow,
    InstanceRow,
    StudyUnitRow,
    utcnow,
)
from gateway.store_units import instance_source


class ImportsRepo:
    """The receiving side: imports, commitments, receipts, retention (mixed into ``QueueStore``)."""

    def due_for_import(self, now: datetime | None = None) -> list[StudySummary]:
        """Received units from peers whose bundle is fully in the spool (``next_attempt_at`` set) and due."""
        moment = now or utcnow()
        return self.studies(state=State.RECEIVED.value, where=(
            StudyUnitRow.origin_peer.is_not(None), StudyUnitRow.next_attempt_at <= moment,
            ~StudyUnitRow.flags.contains("held"),  # waits for an admin (gateway.coercion: no mapping yet)
        ))

    def ready_for_import(self, unit_id: int) -> None:
        with self._unit_of_work() as session:
            session.execute(update(StudyUnitRow).where(StudyUnitRow.id == unit_id).values(next_attempt_at=utcnow()))

    def record_imports(self, results: list[tuple[int, int | None, str, str]]) -> None:
        """Several (instance id, status, verdict, detail) in one transaction."""
        now = utcnow()
        with self._engine.begin() as conn:
            conn.execute(
                update(InstanceRow.__table__).where(InstanceRow.__table__.c.id == bindparam("iid")).values(
                    pacs_status=bindparam("st"), pacs_verdict=bindparam("vd"), pacs_detail=bindparam("dt"), imported_at=now,
                ),
                [{"iid": i, "st": s, "vd": v, "dt": d} for i, s, v, d in results],
            )

    def record_imports_by_uid(self, unit_id: int, results: dict[str, tuple[int | None, str, str]]) -> int:
        """Statuses of the early import, by SOP Instance UID, for the instances of ``unit_id``."""
        ids = {i.sop_instance_uid: i.instance_id for i in self.unit_instances(unit_id)}
        rows = [(ids[uid], *value) for uid, value in results.items() if uid in ids]
        if rows:
            self.record_imports(rows)
        return len(rows)

    def clear_imports(self, unit_id: int, sop_instance_uids: set[str]) -> None:
        """Forget the PACS status of these instances so that the next attempt sends them again."""
        with self._unit_of_work() as session:
            session.execute(
                update(InstanceRow)
                .where(InstanceRow.unit_id == unit_id, InstanceRow.sop_instance_uid.in_(sorted(sop_instance_uids)))
                .values(pacs_status=None, pacs_verdict=None, pacs_detail=None, imported_at=None)
            )

    def set_commitment(self, unit_id: int, transaction_uid: str) -> None:
        with self._unit_of_work() as session:
            session.execute(update(StudyUnitRow).where(StudyUnitRow.id == unit_id).values(commit_uid=transaction_uid))

    def unit_for_commitment(self, transaction_uid: str) -> int | None:
        with self._sessions() as session:
            return session.scalar(
                select(StudyUnitRow.id).where(
                    StudyUnitRow.commit_uid == transaction_uid, StudyUnitRow.state == State.IMPORTING.value
                )
            )

    def add_flag(self, unit_id: int, flag: str) -> None:
        with self._unit_of_work() as session:
            unit = session.get(StudyUnitRow, unit_id)
            if unit is not None and flag not in unit.flags.split(","):
                unit.flags = ",".join(filter(None, [unit.flags, flag]))

    def inbound_bundle_state(self, origin_peer: str, bundle_sha256: str) -> tuple[int, str] | None:
        """(unit id, state) of a bundle from this peer that was already verified here, if any."""
        with self._sessions() as session:
            row = session.execute(
                select(StudyUnitRow.id, StudyUnitRow.state)
                .where(
                    StudyUnitRow.origin_peer == origin_peer,
                    StudyUnitRow.bundle_sha256 == bundle_sha256,
                    StudyUnitRow.state.in_(
                        (State.RECEIVED.value, State.IMPORTING.value, State.DELIVERED.value, State.FAILED.value)
                    ),
                )
                .order_by(StudyUnitRow.id.desc())
            ).first()
        if row is None or (row.state == State.FAILED.value and "pacs-refused" not in self.unit(row.id).flags):
            return None  # a bundle that failed verification is received again
        return row.id, row.state

    def bytes_held(self, origin_peer: str, bundle_sha256: str) -> int:
        """What this gateway already holds of a bundle it is receiving from this peer (a paused stream's
        progress: the resume needs only the rest); 0 if none."""
        with self._sessions() as session:
            held = session.execute(
                select(StudyUnitRow.progress_bytes)
                .where(StudyUnitRow.origin_peer == origin_peer, StudyUnitRow.bundle_sha256 == bundle_sha256,
                       StudyUnitRow.state == State.RECEIVING.value)
                .order_by(StudyUnitRow.id.desc())
            ).scalar()
        return max(0, held or 0)

    def resend_receipt(self, unit_id: int, reason: str) -> None:
        with self._unit_of_work() as session:
            unit = session.get(StudyUnitRow, unit_id)
            if unit is not None:
                unit.receipt_at = None
                session.add(AuditRow(at=utcnow(), unit_id=unit_id, study_instance_uid=unit.study_instance_uid,
                                     event="receipt_resend", detail=reason))

    def receipts_due(self) -> list[StudySummary]:
        """Receiver units whose outcome (delivered, or refused by the PACS) the sender has not acknowledged."""
        candidates = self.studies(where=(
            StudyUnitRow.origin_peer.is_not(None), StudyUnitRow.bundle_sha256.is_not(None), StudyUnitRow.receipt_at.is_(None),
            StudyUnitRow.state.in_((State.DELIVERED.value, State.FAILED.value)),
        ))
        return [s for s in candidates if s.state == State.DELIVERED.value or "pacs-refused" in s.flags]

    def receipt_acknowledged(self, unit_id: int, detail: str) -> None:
        with self._unit_of_work() as session:
            unit = session.get(StudyUnitRow, unit_id)
            if unit is not None:
                unit.receipt_at = utcnow()
                session.add(AuditRow(at=utcnow(), unit_id=unit_id, study_instance_uid=unit.study_instance_uid,
                                     event="receipt_sent", detail=detail))

    def confirm_delivery(self, peer_bare: str, study_instance_uid: str, bundle_sha256: str, delivered: bool, detail: str) -> str:
        """A receipt from ``peer_bare``: 'delivered' | 'failed' | 'noted' (kept for the running attempt) | 'unknown'."""
        with self._unit_of_work() as session:
            unit = session.scalar(
                select(StudyUnitRow).where(
                    StudyUnitRow.origin_peer.is_(None),
                    StudyUnitRow.destination == peer_bare,
                    StudyUnitRow.bundle_sha256 == bundle_sha256,
                ).order_by(StudyUnitRow.id.desc()).with_for_update()
            )
            if unit is None:
                return "unknown"
            self._lock_fresh(session, unit)  # the verdict's `sent` committed meanwhile must be seen here
            if unit.state == State.DELIVERED.value:
                return "delivered"
            if not delivered:
                if unit.state == State.SENT.value:
                    self._move(session, unit, State.FAILED, f"{peer_bare}: {detail}", f"receiver's PACS refused: {detail}")
                    return "failed"
                return "noted"
            unit.receipt_at = utcnow()
            if unit.state in (State.SENT.value, State.QUEUED.value, State.WAITING_PEER.value, State.WAITING_WINDOW.value,
                              State.FAILED.value):
                self._move(session, unit, State.DELIVERED, f"receipt from {peer_bare}: {detail}")
                return "delivered"
            return "noted"

    def mark_sent(self, unit_id: int, detail: str, **values: Any) -> str:
        """``sent``; straight on to ``delivered`` when the receipt already came (it may overtake the verdict)."""
        with self._unit_of_work() as session:
            unit = session.get(StudyUnitRow, unit_id, with_for_update=True)
            if unit is None:
                raise KeyError(f"no study unit {unit_id}")
            self._lock_fresh(session, unit)  # a receipt committed meanwhile must be seen here
            if unit.state == State.DELIVERED.value:
                return State.DELIVERED.value  # the receipt came first and already said more
            if unit.state in (State.QUEUED.value, State.WAITING_PEER.value, State.WAITING_WINDOW.value):
                # Our lease lapsed while the stream ran (a process too busy to renew it in time) and a recovery
                # queued the unit again: the receiver has verified it all the same, which is what counts.
                self._move(session, unit, State.OFFERING, "the attempt that was running when this process's lease "
                           "lapsed has ended")
            self._move(session, unit, State.SENT, detail)
            if values:
                session.execute(update(StudyUnitRow).where(StudyUnitRow.id == unit_id).values(**values))
            if unit.receipt_at is not None:
                unit.state = State.SENT.value
                self._move(session, unit, State.DELIVERED, "the delivery receipt had already arrived")
                return State.DELIVERED.value
        return State.SENT.value

    def overdue_sent(self, receipt_timeout_s: float, now: datetime | None = None) -> list[StudySummary]:
        cutoff = (now or utcnow()) - timedelta(seconds=receipt_timeout_s)
        return self.studies(state=State.SENT.value, where=(StudyUnitRow.origin_peer.is_(None), StudyUnitRow.state_changed_at <= cutoff))

    def purgeable(self, keep_s: float, now: datetime | None = None) -> list[StudySummary]:
        cutoff = (now or utcnow()) - timedelta(seconds=keep_s)
        return self.studies(state=State.DELIVERED.value, where=(StudyUnitRow.purged_at.is_(None), StudyUnitRow.state_changed_at <= cutoff))

    def shared_and_pending(self, unit_id: int, keep_s: float, now: datetime | None = None) -> bool:
        """The unit's spool files are also those of another unit (a study routed to several peers) that is not
        yet delivered, or delivered less than ``keep_s`` ago: they must stay."""
        cutoff = (now or utcnow()) - timedelta(seconds=keep_s)
        with self._sessions() as session:
            source = instance_source(session, unit_id)
            pending = session.scalar(select(StudyUnitRow.id).where(
                (StudyUnitRow.id == source) | (StudyUnitRow.instances_of == source),
                (StudyUnitRow.state != State.DELIVERED.value) | (StudyUnitRow.state_changed_at > cutoff)).limit(1))
        return pending is not None

    def mark_purged(self, unit_id: int, detail: str) -> None:
        with self._unit_of_work() as session:
            unit = session.get(StudyUnitRow, unit_id)
            if unit is not None:
                unit.purged_at = utcnow()
                session.add(AuditRow(at=utcnow(), unit_id=unit_id, study_instance_uid=unit.study_instance_uid,
                                     event="purged", detail=detail))

