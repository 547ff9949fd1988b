"""Queue repository, the audit log and the running gateway's status rows."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select

from gateway.rows import (
    AuditRow,
    RuntimeStatusRow,
    utcnow,
)


class AuditRepo:
    """The audit log and runtime status rows (mixed into ``QueueStore``)."""

    def audit(self, event_name: str, detail: str, unit_id: int | None = None, study_instance_uid: str | None = None) -> None:
        with self._unit_of_work() as session:
            session.add(
                AuditRow(at=utcnow(), unit_id=unit_id, study_instance_uid=study_instance_uid, event=event_name, detail=detail)
            )

    def audit_repeated(self, event_name: str, key: str, detail: str, window_s: float = 60.0, count: int = 1) -> None:
        """One row per ``key`` (e.g. a refused sender) and ``window_s``: a repeat within the window only
        counts (``repeat_count``), so a flood of refusals cannot flood the audit log."""
        self.audit_counts([(event_name, key, detail, count)], window_s)

    def audit_counts(self, tallies: list[tuple[str, str, str, int]], window_s: float = 60.0) -> None:
        """(event, key, detail, count) tallies (``gateway.refusals``) folded into their rows in one transaction."""
        if not tallies:
            return
        since = utcnow() - timedelta(seconds=window_s)
        with self._unit_of_work() as session:
            for event_name, key, detail, count in tallies:
                marker = f"[{key}] "
                row = session.scalar(
                    select(AuditRow).where(AuditRow.event == event_name, AuditRow.at >= since,
                                           AuditRow.detail.startswith(marker, autoescape=True))
                    .order_by(AuditRow.id.desc()).limit(1).with_for_update()
                )
                if row is None:
                    session.add(AuditRow(at=utcnow(), event=event_name, detail=marker + detail, repeat_count=count))
                else:
                    row.repeat_count += count

    def set_runtime_status(self, name: str, value: str) -> None:
        with self._unit_of_work() as session:
            row = session.get(RuntimeStatusRow, name)
            if row is None:
                session.add(RuntimeStatusRow(name=name, value=value, updated_at=utcnow()))
            else:
                row.value, row.updated_at = value, utcnow()

    def runtime_status(self, name: str) -> tuple[str, datetime] | None:
        with self._sessions() as session:
            row = session.get(RuntimeStatusRow, name)
            return (row.value, row.updated_at) if row is not None else None

    def runtime_statuses(self, prefix: str) -> list[tuple[str, str, datetime]]:
        """(name, value, updated_at) of every row whose name starts with ``prefix`` (``gateway.processes``)."""
        with self._sessions() as session:
            rows = session.scalars(select(RuntimeStatusRow).where(
                RuntimeStatusRow.name.startswith(prefix, autoescape=True))).all()
            return [(r.name, r.value, r.updated_at) for r in rows]

    def drop_runtime_status(self, names: list[str]) -> None:
        with self._unit_of_work() as session:
            session.execute(delete(RuntimeStatusRow).where(RuntimeStatusRow.name.in_(names)))

    def audit_entries(self, limit: int = 100, unit_id: int | None = None) -> list[dict[str, Any]]:
        query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if unit_id is not None:
            query = query.where(AuditRow.unit_id == unit_id)
        with self._sessions() as session:
            rows = session.scalars(query).all()
        return [
            {
                "id": r.id,
                "at": r.at.isoformat(),
                "unit_id": r.unit_id,
                "study_instance_uid": r.study_instance_uid,
                "event": r.event,
                "from_state": r.from_state,
                "to_state": r.to_state,
                "detail": r.detail,
                "count": r.repeat_count,
            }
            for r in rows
        ]

