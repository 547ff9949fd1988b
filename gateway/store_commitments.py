"""Queue repository: Storage Commitment requests of modalities (``gateway.commitment``), until reported."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select

from gateway.rows import (
    AuditRow,
    CommitmentRequestRow,
    InstanceRow,
    StudyUnitRow,
    utcnow,
)


class CommitmentsRepo:
    """Mixed into ``QueueStore``."""

    def add_commitment_request(self, transaction_uid: str, calling_ae: str, address: str,
                               refs: list[tuple[str, str]], not_before: datetime | None = None) -> int:
        """Record a request (durably, before the N-ACTION is answered Success); audited. ``not_before``: no
        report on a new association before then (one goes on the request's own): in the same row, so that no
        tick finds the request due in between."""
        with self._unit_of_work() as session:
            row = CommitmentRequestRow(transaction_uid=transaction_uid, calling_ae=calling_ae, address=address[:64],
                                       requested_at=utcnow(), refs=json.dumps(refs), state="pending", attempts=0,
                                       next_attempt_at=not_before)
            session.add(row)
            session.add(AuditRow(at=utcnow(), event="commitment_requested",
                                 detail=f"Storage Commitment request from {calling_ae} ({address}): transaction "
                                        f"{transaction_uid}, {len(refs)} instance(s)"))
            session.flush()
            return row.id

    def due_commitments(self, now: datetime | None = None) -> list[dict[str, Any]]:
        """Pending requests whose next try is due."""
        moment = now or utcnow()
        with self._sessions() as session:
            rows = session.scalars(select(CommitmentRequestRow).where(
                CommitmentRequestRow.state == "pending",
                or_(CommitmentRequestRow.next_attempt_at.is_(None), CommitmentRequestRow.next_attempt_at <= moment))
                .order_by(CommitmentRequestRow.id).limit(100)).all()
            return [_request(r) for r in rows]

    def commitment_requests(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._sessions() as session:
            rows = session.scalars(select(CommitmentRequestRow).order_by(CommitmentRequestRow.id.desc()).limit(limit)).all()
            return [_request(r) for r in rows]

    def instance_states(self, sop_instance_uids: list[str]) -> dict[str, tuple[str, bool]]:
        """uid -> (SOP class as stored, delivered: every unit that sends it has its delivery receipt)."""
        found: dict[str, tuple[str, bool]] = {}
        with self._sessions() as session:
            for start in range(0, len(sop_instance_uids), 500):
                chunk = sop_instance_uids[start:start + 500]
                rows = session.execute(select(InstanceRow.sop_instance_uid, InstanceRow.sop_class_uid, InstanceRow.unit_id)
                                       .where(InstanceRow.sop_instance_uid.in_(chunk))).all()
                units = {unit_id for _uid, _cls, unit_id in rows}
                states: dict[int, list[str]] = {}
                if units:
                    for unit_id, source, state in session.execute(
                            select(StudyUnitRow.id, StudyUnitRow.instances_of, StudyUnitRow.state)
                            .where(or_(StudyUnitRow.id.in_(units), StudyUnitRow.instances_of.in_(units)))).all():
                        states.setdefault(source or unit_id, []).append(state)
                for uid, sop_class, unit_id in rows:
                    delivered = bool(states.get(unit_id)) and all(s == "delivered" for s in states[unit_id])
                    previous = found.get(uid)
                    found[uid] = (sop_class, delivered or bool(previous and previous[1]))
        return found

    def commitment_decided(self, request_id: int, event_type: int, committed: list[str],
                           failed: list[tuple[str, int]]) -> None:
        with self._unit_of_work() as session:
            row = session.get(CommitmentRequestRow, request_id)
            if row is not None and row.event_type is None:
                row.event_type = event_type
                row.result = json.dumps({"committed": committed, "failed": failed})

    def commitment_reported(self, request_id: int, how: str) -> None:
        with self._unit_of_work() as session:
            row = session.get(CommitmentRequestRow, request_id)
            if row is None or row.state != "pending":
                return
            row.state, row.reported_at, row.attempts = "reported", utcnow(), row.attempts + 1
            result = json.loads(row.result or "{}")
            session.add(AuditRow(at=utcnow(), event="commitment_reported", detail=(
                f"Storage Commitment report to {row.calling_ae} ({how}): transaction {row.transaction_uid}, "
                f"event type {row.event_type}, {len(result.get('committed', []))} committed, "
                f"{len(result.get('failed', []))} failed")))

    def commitment_retry(self, request_id: int, error: str, next_attempt_at: datetime | None) -> None:
        """The report could not be sent: tried again at ``next_attempt_at``; None: given up (``failed``)."""
        with self._unit_of_work() as session:
            row = session.get(CommitmentRequestRow, request_id)
            if row is None or row.state != "pending":
                return
            row.attempts += 1
            row.last_error = error[:2000]
            row.next_attempt_at = next_attempt_at
            if next_attempt_at is None:
                row.state = "failed"
                session.add(AuditRow(at=utcnow(), event="commitment_failed", detail=(
                    f"Storage Commitment report to {row.calling_ae} for transaction {row.transaction_uid} given up "
                    f"after {row.attempts} attempt(s): {error}")[:2000]))


def _request(r: CommitmentRequestRow) -> dict[str, Any]:
    return {"id": r.id, "transaction_uid": r.transaction_uid, "calling_ae": r.calling_ae, "address": r.address,
            "requested_at": r.requested_at, "refs": [tuple(x) for x in json.loads(r.refs)], "state": r.state,
            "event_type": r.event_type, "result": json.loads(r.result) if r.result else None, "attempts": r.attempts,
            "next_attempt_at": r.next_attempt_at, "reported_at": r.reported_at, "last_error": r.last_error}
