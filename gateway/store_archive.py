"""Queue repository, retention of rows (``[retention] keep_rows_days``, migration 0016): the instance and transfer rows
of units delivered longer ago move to archive tables in small batches, so that the live tables (what ingest, the
dispatcher and the claims read) hold the live work while a year of history stays answerable (``queue show``, the
study page, ``stats``). The unit row and its audit trail stay where they are."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, exists, func, insert, or_, select, update
from sqlalchemy.orm import aliased

from gateway.lifecycle import State
from gateway.rows import (
    AuditRow,
    InstanceArchiveRow,
    InstanceRow,
    StudyUnitRow,
    TransferArchiveRow,
    TransferRow,
    utcnow,
)


def _moved_columns(archive: type) -> list[str]:
    return [c.name for c in archive.__table__.columns]


class ArchiveRepo:
    """Moves rows of old delivered units to the archive (mixed into ``QueueStore``)."""

    def archive_rows(self, cutoff: datetime, require_purged: bool = True, batch: int = 100) -> list[int]:
        """One batch: up to ``batch`` units delivered before ``cutoff`` (and, with ``require_purged``, whose spool files
        the retention removed: the spool cleaner reads their instance rows) have their instance and transfer rows moved
        to the archive in one transaction. A unit whose instance rows another unit sends too (a study routed to several
        peers) waits until every one of them qualifies. Returns the units archived; empty when nothing is left."""
        copy = aliased(StudyUnitRow)
        unsettled_copy = exists().where(copy.instances_of == StudyUnitRow.id, or_(
            copy.state != State.DELIVERED.value, copy.state_changed_at > cutoff,
            *((copy.purged_at.is_(None),) if require_purged else ())))
        query = (select(StudyUnitRow.id, StudyUnitRow.study_instance_uid).where(
            StudyUnitRow.archived_at.is_(None), StudyUnitRow.state_changed_at <= cutoff,
            StudyUnitRow.state == State.DELIVERED.value, ~unsettled_copy,
            *((StudyUnitRow.purged_at.is_not(None),) if require_purged else ()))
            .order_by(StudyUnitRow.state_changed_at, StudyUnitRow.id).limit(batch))  # oldest first, always the same order
        with self._unit_of_work() as session:
            picked = session.execute(query.with_for_update(skip_locked=True)).all()
            if not picked:
                return []
            ids = [unit_id for unit_id, _uid in picked]
            for live, archive in ((InstanceRow, InstanceArchiveRow), (TransferRow, TransferArchiveRow)):
                columns = _moved_columns(archive)
                session.execute(insert(archive).from_select(
                    columns, select(*(live.__table__.c[c] for c in columns)).where(live.unit_id.in_(ids))))
                session.execute(delete(live).where(live.unit_id.in_(ids)))
            now = utcnow()
            session.execute(update(StudyUnitRow).where(StudyUnitRow.id.in_(ids)).values(archived_at=now))
            session.add_all(AuditRow(at=now, unit_id=unit_id, study_instance_uid=uid, event="archived",
                                     detail="instance and transfer rows moved to the archive (retention of rows)")
                            for unit_id, uid in picked)
        return ids

    def archived_counts(self) -> tuple[int, int]:
        """(instance rows, transfer rows) in the archive."""
        with self._sessions() as session:
            return (int(session.scalar(select(func.count(InstanceArchiveRow.id))) or 0),
                    int(session.scalar(select(func.count(TransferArchiveRow.id))) or 0))
