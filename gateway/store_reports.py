"""Queue repository, reports: what the admin web page and the Prometheus metrics read (aggregates in SQL,
so every process of a gateway sharing one database reports the same figures)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select

from gateway.lifecycle import State
from gateway.model import StudySummary
from gateway.rows import StudyUnitRow, TallyRow, TransferRow


class ReportsRepo:
    """Aggregates for the web page and /metrics (mixed into ``QueueStore``)."""

    FOLD_AT = 1000  # tally rows of one kind beyond which a read folds them into one per key

    def _tallies(self, kind: str) -> dict[str, tuple[int, int, int, float]]:
        """key -> summed (n, b, w, f) of one kind of running total (migration 0015); folds the deltas when many."""
        with self._sessions() as session:
            rows = session.execute(select(TallyRow.key, func.count(TallyRow.id), func.sum(TallyRow.n), func.sum(TallyRow.b),
                                          func.sum(TallyRow.w), func.sum(TallyRow.f))
                                   .where(TallyRow.kind == kind).group_by(TallyRow.key)).all()
        if sum(int(r[1]) for r in rows) > self.FOLD_AT:
            self.fold_tallies(kind)
        return {key: (int(n or 0), int(b or 0), int(w or 0), float(f or 0.0)) for key, _rows, n, b, w, f in rows}

    def fold_tallies(self, kind: str) -> None:
        """Replace a kind's deltas by one row per key. ``DELETE ... RETURNING`` takes exactly the rows it removes, so
        two processes folding at once (or a trigger appending meanwhile) count each delta once."""
        with self._sessions() as session:
            taken = session.execute(delete(TallyRow).where(TallyRow.kind == kind)
                                    .returning(TallyRow.key, TallyRow.n, TallyRow.b, TallyRow.w, TallyRow.f)).all()
            sums: dict[str, list[float]] = {}
            for key, n, b, w, f in taken:
                total = sums.setdefault(key, [0, 0, 0, 0.0])
                total[0] += n
                total[1] += b
                total[2] += w
                total[3] += f
            for key, (n, b, w, f) in sums.items():
                if n or b or w or f:
                    session.add(TallyRow(kind=kind, key=key, n=int(n), b=int(b), w=int(w), f=float(f)))
            session.commit()

    def state_counts(self) -> dict[tuple[str, str], int]:
        """(direction 'out' | 'in', state) -> units."""
        counts = {}
        for key, (n, _b, _w, _f) in self._tallies("units").items():
            direction, _, state = key.partition("|")
            if n:
                counts[(direction, state)] = n
        return counts

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
        """Per direction, method and outcome: attempts, study bytes and wire bytes moved (every attempt ever recorded,
        archived ones included: ended attempts from the running totals, running ones read live)."""
        totals: dict[tuple[str, str, str], list[int]] = {}
        for key, (n, b, w, _f) in self._tallies("transfers").items():
            direction, method, outcome = (key.split("|", 2) + ["", ""])[:3]
            totals[(direction, method, outcome)] = [n, b, w]
        with self._sessions() as session:
            running = session.execute(
                select(TransferRow.direction, TransferRow.method, func.count(TransferRow.id),
                       func.coalesce(func.sum(TransferRow.bytes_moved), 0),
                       func.coalesce(func.sum(func.coalesce(TransferRow.wire_bytes, TransferRow.bytes_moved)), 0))
                .where(TransferRow.outcome == "running").group_by(TransferRow.direction, TransferRow.method)).all()
        for d, m, c, b, w in running:
            counted = totals.setdefault((d, m or "", "running"), [0, 0, 0])
            counted[0] += int(c)
            counted[1] += int(b)
            counted[2] += int(w)
        return [{"direction": d, "method": m or "none", "outcome": o, "count": c, "bytes": b, "wire_bytes": w}
                for (d, m, o), (c, b, w) in sorted(totals.items()) if c]

    def import_latency_histogram(self) -> tuple[dict[str, int], float]:
        """Imports of received studies by latency bucket (the upper bound in seconds as text, ``inf`` above the last;
        from the study's verification, ``received``, to the PACS holding it, ``delivered``), and their seconds summed."""
        tallies = self._tallies("latency")
        return {key: n for key, (n, _b, _w, _f) in tallies.items() if n}, sum(f for _n, _b, _w, f in tallies.values())
