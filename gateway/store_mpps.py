"""Queue repository: MPPS steps (``gateway.mpps``) and what they do to study units (stable at once, held)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import insert, select, update

from gateway.lifecycle import State
from gateway.rows import AuditRow, InstanceRow, MppsStepRow, StudyUnitRow, utcnow


class MppsRepo:
    """Mixed into ``QueueStore``."""

    def mpps_step(self, sop_instance_uid: str) -> dict[str, Any] | None:
        with self._sessions() as session:
            row = session.get(MppsStepRow, sop_instance_uid)
            return _step(row) if row is not None else None

    def mpps_create(self, sop_instance_uid: str, calling_ae: str, study_uids: list[str], refs: list[tuple[str, str]]) -> bool:
        """False: a step with this SOP Instance UID exists (0x0111)."""
        with self._unit_of_work() as session:
            if session.get(MppsStepRow, sop_instance_uid) is not None:
                return False
            now = utcnow()
            session.add(MppsStepRow(sop_instance_uid=sop_instance_uid, calling_ae=calling_ae, status="IN PROGRESS",
                                    study_uids=json.dumps(study_uids), refs=json.dumps(refs), reason="",
                                    created_at=now, updated_at=now, settled=False))
            session.add(AuditRow(at=now, event="mpps", study_instance_uid=(study_uids or [None])[0],
                                 detail=f"MPPS {sop_instance_uid} from {calling_ae}: IN PROGRESS"))
            return True

    def mpps_update(self, sop_instance_uid: str, status: str | None, refs: list[tuple[str, str]] | None,
                    study_uids: list[str] | None, reason: str) -> None:
        with self._unit_of_work() as session:
            row = session.get(MppsStepRow, sop_instance_uid, with_for_update=True)
            if row is None:
                return
            before = row.status
            if status:
                row.status = status
            if refs is not None:
                row.refs = json.dumps(refs)
            if study_uids:
                row.study_uids = json.dumps(study_uids)
            row.reason = reason or row.reason
            row.updated_at = utcnow()
            if status and status != before:
                session.add(AuditRow(at=row.updated_at, event="mpps",
                                     study_instance_uid=(json.loads(row.study_uids) or [None])[0],
                                     detail=f"MPPS {sop_instance_uid} from {row.calling_ae}: {before} -> {status}"
                                            + (f" ({reason})" if reason else "")
                                            + f", {len(json.loads(row.refs))} instance(s) referenced"))

    def mpps_steps(self, limit: int = 500) -> list[dict[str, Any]]:
        with self._sessions() as session:
            rows = session.scalars(select(MppsStepRow).order_by(MppsStepRow.updated_at.desc()).limit(limit)).all()
            return [_step(r) for r in rows]

    def mpps_unsettled(self) -> list[dict[str, Any]]:
        with self._sessions() as session:
            rows = session.scalars(select(MppsStepRow).where(
                MppsStepRow.settled.is_(False), MppsStepRow.status.in_(("COMPLETED", "DISCONTINUED"))).limit(200)).all()
            return [_step(r) for r in rows]

    def mpps_settle(self, sop_instance_uid: str) -> None:
        with self._unit_of_work() as session:
            session.execute(update(MppsStepRow).where(MppsStepRow.sop_instance_uid == sop_instance_uid).values(settled=True))

    def open_units_of(self, sop_instance_uids: list[str]) -> list[int]:
        """The local units (from modalities) still ``received`` that hold any of these instances."""
        found: set[int] = set()
        with self._sessions() as session:
            for start in range(0, len(sop_instance_uids), 500):
                found |= set(session.scalars(
                    select(StudyUnitRow.id).join(InstanceRow, InstanceRow.unit_id == StudyUnitRow.id).where(
                        InstanceRow.sop_instance_uid.in_(sop_instance_uids[start:start + 500]),
                        StudyUnitRow.state == State.RECEIVED.value, StudyUnitRow.origin_peer.is_(None))).all())
        return sorted(found)

    def make_stable(self, unit_ids: list[int], detail: str) -> list[int]:
        """``received`` -> ``stable`` now, whatever their stable age (a completed MPPS, an admin's release)."""
        if not unit_ids:
            return []
        with self._unit_of_work() as session:
            stamp = utcnow()
            moved = session.execute(
                update(StudyUnitRow).where(StudyUnitRow.id.in_(unit_ids), StudyUnitRow.state == State.RECEIVED.value)
                .values(state=State.STABLE.value, state_changed_at=stamp, error=None,
                        flags=_without(StudyUnitRow.flags))
                .returning(StudyUnitRow.id, StudyUnitRow.study_instance_uid).execution_options(synchronize_session=False)
            ).all()
            if moved:
                session.execute(insert(AuditRow), [
                    {"at": stamp, "unit_id": unit_id, "study_instance_uid": uid, "event": "transition",
                     "from_state": State.RECEIVED.value, "to_state": State.STABLE.value, "detail": detail}
                    for unit_id, uid in moved])
            return [unit_id for unit_id, _uid in moved]

    def hold_units(self, unit_ids: list[int], reason: str) -> None:
        """Flag ``held``: stable age does not apply until an admin releases (or drops) them."""
        with self._unit_of_work() as session:
            for unit in session.scalars(select(StudyUnitRow).where(StudyUnitRow.id.in_(unit_ids))).all():
                if "held" not in unit.flags.split(","):
                    unit.flags = ",".join(filter(None, [unit.flags, "held"]))
                    unit.error = reason[:2000]
                    session.add(AuditRow(at=utcnow(), unit_id=unit.id, study_instance_uid=unit.study_instance_uid,
                                         event="held", detail=reason[:2000]))


    def release_hold(self, unit_id: int, who: str) -> None:
        """A held unit from a peer (no mapping for its patient yet) is imported again: the flag goes, due now."""
        with self._unit_of_work() as session:
            unit = session.get(StudyUnitRow, unit_id)
            if unit is None:
                return
            unit.flags = ",".join(f for f in unit.flags.split(",") if f and f != "held")
            unit.next_attempt_at, unit.error = utcnow(), None
            session.add(AuditRow(at=utcnow(), unit_id=unit.id, study_instance_uid=unit.study_instance_uid,
                                 event="released", detail=f"released by {who}"))


def _without(flags: Any) -> Any:
    """SQL: the flags with 'held' removed (a released unit)."""
    from sqlalchemy import func

    return func.trim(func.replace(func.replace(flags, "held", ""), ",,", ","), ",")


def _step(r: MppsStepRow) -> dict[str, Any]:
    return {"sop_instance_uid": r.sop_instance_uid, "calling_ae": r.calling_ae, "status": r.status,
            "study_uids": json.loads(r.study_uids), "refs": [tuple(x) for x in json.loads(r.refs)], "reason": r.reason,
            "created_at": r.created_at, "updated_at": r.updated_at, "settled": r.settled}
