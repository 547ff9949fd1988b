"""Queue repository, reports: what the admin web page and the Prometheus metrics read (aggregates in SQL,
so every process of a gateway sharing one database reports the same figures)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, func, select

from gateway.lifecycle import State
from gateway.model import StudySummary
from gateway.rows import AuditRow, StudyUnitRow, TransferRow


class ReportsRepo:
    """Aggregates for the web page and /metrics (mixed into ``QueueStore``)."""

    def state_counts(self) -> dict[tuple[str, str], int]:
        """(direction 'out' | 'in', state) -> units."""
        direction = StudyUnitRow.origin_peer.is_(None)
        with self._sessions() as session:
            rows = session.execute(select(direction, StudyUnitRow.state, func.count(StudyUnitRow.id))
                                   .group_by(direction, StudyUnitRow.state)).all()
        return {("out" if local else "in", state): int(count) for local, state, count in rows}

    def recent_units(self, limit: int = 50) -> list[StudySummary]:
        """The units that moved last, newest first (in-flight ones always shown first)."""
        in_flight = (State.OFFERING.value, State.SENDING.value, State.RECEIVING.value, State.IMPORTING.value)
        active = self.studies(where=(StudyUnitRow.state.in_(in_flight),))
        with self._sessions() as session:
            ids = session.scalars(select(StudyUnitRow.id).order_by(StudyUnitRow.state_changed_at.desc(), StudyUnitRow.id.desc())
                                  .limit(limit)).all()
        shown = {s.unit_id for s in active}
        rest = [s for s in self.studies(where=(StudyUnitRow.id.in_(ids),)) if s.unit_id not in shown]
        rest.sort(key=lambda s: (s.state_changed_at, s.unit_id), reverse=True)
        return active + rest

    def transfer_totals(self) -> list[dict[str, Any]]:
        """Per direction, method and outcome: attempts, study bytes and wire bytes moved (every attempt ever recorded)."""
        with self._sessions() as session:
            rows = session.execute(
                select(TransferRow.direction, TransferRow.method, TransferRow.outcome, func.count(TransferRow.id),
                       func.coalesce(func.sum(TransferRow.bytes_moved), 0),
                       func.coalesce(func.sum(func.coalesce(TransferRow.wire_bytes, TransferRow.bytes_moved)), 0))
                .group_by(TransferRow.direction, TransferRow.method, TransferRow.outcome)).all()
        return [{"direction": d, "method": m or "none", "outcome": o, "count": int(c), "bytes": int(b), "wire_bytes": int(w)}
                for d, m, o, c, b, w in rows]

    def import_latencies(self) -> list[float]:
        """Seconds from a received study's verification (``received``) to the PACS holding it (``delivered``),
        per study received from a peer and delivered."""
        received = select(AuditRow.unit_id, func.min(AuditRow.at).label("at")).where(
            AuditRow.to_state == State.RECEIVED.value).group_by(AuditRow.unit_id).subquery()
        delivered = select(AuditRow.unit_id, func.max(AuditRow.at).label("at")).where(
            AuditRow.to_state == State.DELIVERED.value).group_by(AuditRow.unit_id).subquery()
        with self._sessions() as session:
            rows = session.execute(
                select(received.c.at, delivered.c.at)
                .join(delivered, delivered.c.unit_id == received.c.unit_id)
                .join(StudyUnitRow, and_(StudyUnitRow.id == received.c.unit_id, StudyUnitRow.origin_peer.is_not(None)))
            ).all()
        return [max(0.0, (end - start).total_seconds()) for start, end in rows]
