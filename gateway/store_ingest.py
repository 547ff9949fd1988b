"""Queue repository, ingest: record instances (the hot path), open and grow study units."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway.lifecycle import OPEN_FOR_INSTANCES, State
from gateway.model import InstanceHeader
from gateway.rows import (
    _GROW_OPEN_UNIT,
    _INSERT_INSTANCE,
    _SELECT_COPIES,
    AuditRow,
    DuplicateInstance,
    InstanceRow,
    StudyUnitRow,
    utcnow,
)


class IngestRepo:
    """Recording instances into study units (mixed into ``QueueStore``)."""

    def instance_hashes(self, sop_instance_uid: str) -> list[tuple[str, str]]:
        """(sha256, spool_path) of every stored copy of this SOP Instance UID."""
        with self._engine.connect() as conn:
            rows = conn.execute(_SELECT_COPIES, {"uid": sop_instance_uid}).all()
        return [(r.sha256, r.spool_path) for r in rows]

    def hashes_by_uid(self, sop_instance_uids: Iterable[str]) -> dict[str, set[str]]:
        """SHA-256 of every stored copy of each SOP Instance UID (one query per 500 UIDs, a bundle's worth)."""
        uids = list(dict.fromkeys(sop_instance_uids))
        found: dict[str, set[str]] = {}
        with self._engine.connect() as conn:
            for start in range(0, len(uids), 500):
                query = select(InstanceRow.sop_instance_uid, InstanceRow.sha256).where(
                    InstanceRow.sop_instance_uid.in_(uids[start : start + 500]))
                for uid, sha256 in conn.execute(query):
                    found.setdefault(uid, set()).add(sha256)
        return found

    def record_instance(
        self,
        header: InstanceHeader,
        *,
        spool_path: str,
        size_bytes: int,
        sha256: str,
        source: str,
        conflict: bool,
        origin_peer: str | None = None,
    ) -> int:
        """Record one stored instance in its study's open unit (created when needed); returns the unit id.

        Raises :class:`DuplicateInstance` if identical bytes for the SOP Instance UID were recorded first
        by another writer. Text values are indexed as :func:`indexed` makes them (the file keeps them whole).
        """
        header, source = indexed(header), _text(source)
        for _attempt in range(3):
            try:
                if not conflict:
                    unit_id = self._record_fast(header, spool_path, size_bytes, sha256, source, origin_peer)
                    if unit_id is not None:
                        return unit_id
                with self._unit_of_work() as session:
                    unit_id = self._record(session, header, spool_path, size_bytes, sha256, source, conflict, origin_peer)
                self._open_unit_hint[(header.study_instance_uid, origin_peer)] = unit_id
                return unit_id
            except IntegrityError as exc:
                if "uq_instance_uid_sha256" in str(exc) or "instances.sop_instance_uid, instances.sha256" in str(exc):
                    raise DuplicateInstance(header.sop_instance_uid) from exc
                continue  # another process opened the same unit first: look again
        raise RuntimeError(f"could not open a study unit for {header.study_instance_uid}")

    def record_instances(self, rows: list[tuple[InstanceHeader, str, int, str, bool]], source: str,
                         origin_peer: str | None = None, received: tuple[int, str, int] | None = None) -> list[int]:
        """Record (header, spool_path, size, sha256, conflict) rows in one transaction; returns unit ids.
        The instance rows go in as one Core executemany, no ORM object or bulk bookkeeping per row: as objects, a
        400-instance bundle's rows cost the receiver ~85 ms between its last byte and its verdict.
        ``received``: (unit id, detail, bytes) of a verified inbound bundle's unit, moved from ``receiving`` to
        ``received`` first in the same transaction (the rows then go to it)."""
        with self._unit_of_work() as session:
            if received is not None:
                unit_id, detail, progress = received
                verified = session.get(StudyUnitRow, unit_id, with_for_update=True)
                if verified is None:
                    raise KeyError(f"no study unit {unit_id}")
                self._move(session, verified, State.RECEIVED, detail)
                verified.progress_bytes = progress
                session.flush()
            now, source = utcnow(), _text(source)
            units: dict[str, StudyUnitRow] = {}  # a bundle is one study: its unit is looked up once, not per row
            ids, values = [], []
            for header, path, size, sha256, conflict in rows:
                header = indexed(header)
                unit = units.get(header.study_instance_uid)
                if unit is None:
                    unit = units[header.study_instance_uid] = self._open_unit(session, header, now, origin_peer)
                values.append(self._count_instance(session, unit, header, path, size, sha256, source, conflict, now))
                ids.append(unit.id)
            session.flush()  # the units' counts (and a new unit) before their instances
            if values:
                session.connection().execute(insert(InstanceRow.__table__), values)  # Core: one executemany
            return ids

    def _record_fast(
        self, header: InstanceHeader, spool_path: str, size_bytes: int, sha256: str, source: str, origin_peer: str | None
    ) -> int | None:
        """One UPDATE + one INSERT on the unit this process saw open last, committed with the other associations'
        instances waiting at the same moment (``grow_commits``); None if the unit is no longer open."""
        key = (header.study_instance_uid, origin_peer)
        unit_id = self._open_unit_hint.get(key)
        if unit_id is None:
            return None
        now = utcnow()
        values = _instance_values(header, unit_id, spool_path, size_bytes, sha256, source, False, now)
        if not self.grow_commits.submit(values):
            self._open_unit_hint.pop(key, None)
            return None
        return unit_id

    def _grow_units(self, rows: list[dict[str, Any]]) -> list[bool]:
        """Each instance row into its open unit, all in one transaction; False for a row whose unit is no longer
        open (not inserted: its caller opens a unit)."""
        grown = []
        with self._engine.begin() as conn:
            for values in rows:
                moved = conn.execute(_GROW_OPEN_UNIT, {"unit": values["unit_id"], "bytes": values["size_bytes"],
                                                       "now": values["received_at"]})
                grown.append(moved.rowcount == 1)
                if grown[-1]:
                    conn.execute(_INSERT_INSTANCE, values)
        return grown

    def _record(
        self,
        session: Session,
        header: InstanceHeader,
        spool_path: str,
        size_bytes: int,
        sha256: str,
        source: str,
        conflict: bool,
        origin_peer: str | None = None,
    ) -> int:
        now = utcnow()
        unit = self._open_unit(session, header, now, origin_peer)
        self._add_instance(session, unit, header, spool_path, size_bytes, sha256, source, conflict, now)
        session.flush()
        return unit.id

    @staticmethod
    def _add_instance(session: Session, unit: StudyUnitRow, header: InstanceHeader, spool_path: str, size_bytes: int,
                      sha256: str, source: str, conflict: bool, now: datetime) -> None:
        """The instance's row in ``unit`` and the unit's counts (flushed by the caller)."""
        session.add(InstanceRow(**IngestRepo._count_instance(session, unit, header, spool_path, size_bytes, sha256,
                                                             source, conflict, now)))

    @staticmethod
    def _count_instance(session: Session, unit: StudyUnitRow, header: InstanceHeader, spool_path: str, size_bytes: int,
                        sha256: str, source: str, conflict: bool, now: datetime) -> dict[str, Any]:
        """The unit's counts (and a conflict's audit row) for one more instance; returns the instance row's values."""
        unit.instance_count += 1
        unit.size_bytes += size_bytes
        unit.last_instance_at = now
        if conflict and "conflict" not in unit.flags:
            unit.flags = ",".join(filter(None, [unit.flags, "conflict"]))
            session.add(
                AuditRow(
                    at=now,
                    unit_id=unit.id,
                    study_instance_uid=unit.study_instance_uid,
                    event="conflict",
                    detail=f"SOP Instance UID {header.sop_instance_uid} received again with different bytes "
                    f"(sha256 {sha256}); kept beside the first copy at {spool_path}",
                )
            )
        return _instance_values(header, unit.id, spool_path, size_bytes, sha256, source, conflict, now)

    def _open_unit(self, session: Session, header: InstanceHeader, now: datetime, origin_peer: str | None) -> StudyUnitRow:
        units = session.scalars(
            select(StudyUnitRow)
            .where(StudyUnitRow.study_instance_uid == header.study_instance_uid)
            .order_by(StudyUnitRow.unit_seq.desc())
        ).all()
        for unit in units:
            if unit.state in OPEN_FOR_INSTANCES and unit.origin_peer == origin_peer:
                if not unit.patient_name and not unit.study_description:  # a unit opened by an offer
                    unit.patient_name, unit.patient_id = header.patient_name, header.patient_id
                    unit.study_description, unit.study_date = header.study_description, header.study_date
                    unit.accession_number = header.accession_number
                return unit
        unit = StudyUnitRow(
            study_instance_uid=header.study_instance_uid,
            unit_seq=(units[0].unit_seq + 1) if units else 1,
            state=State.RECEIVED.value,
            patient_name=header.patient_name,
            patient_id=header.patient_id,
            study_description=header.study_description,
            study_date=header.study_date,
            accession_number=header.accession_number,
            created_at=now,
            last_instance_at=now,
            state_changed_at=now,
            origin_peer=origin_peer,
        )
        session.add(unit)
        session.flush()
        detail = (f"received from {origin_peer}: " if origin_peer else "") + "new study" if not units else f"follow-up unit {unit.unit_seq}: late instances after unit {units[0].unit_seq} left 'received'"
        session.add(
            AuditRow(
                at=now,
                unit_id=unit.id,
                study_instance_uid=unit.study_instance_uid,
                event="created",
                to_state=State.RECEIVED.value,
                detail=detail,
            )
        )
        return unit



def _instance_values(
    header: InstanceHeader,
    unit_id: int,
    spool_path: str,
    size_bytes: int,
    sha256: str,
    source: str,
    conflict: bool,
    now: datetime,
) -> dict[str, Any]:
    return {
        "unit_id": unit_id,
        "sop_instance_uid": header.sop_instance_uid,
        "sop_class_uid": header.sop_class_uid,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "series_instance_uid": header.series_instance_uid,
        "series_number": header.series_number,
        "series_description": header.series_description,
        "modality": header.modality,
        "instance_number": header.instance_number,
        "size_bytes": size_bytes,
        "sha256": sha256,
        "spool_path": spool_path,
        "conflict": conflict,
        "source": source,
        "received_at": now,
    }


#: The index's room for each text a modality sends (its columns); the file keeps every value whole.
_TEXT_LIMITS = {"patient_id": 64, "patient_name": 324, "study_description": 64, "study_date": 8, "accession_number": 16,
                "modality": 16, "series_description": 64}


def _text(value: str, limit: int | None = None) -> str:
    """NUL removed (PostgreSQL text cannot hold it), clipped to ``limit`` characters."""
    value = value.replace("\x00", "")
    return value[:limit] if limit is not None else value


def indexed(header: InstanceHeader) -> InstanceHeader:
    """The header as the queue indexes it, the same on SQLite and PostgreSQL: every text without NUL and
    clipped to its column (a 65-character Study Description, a 400-character Patient Name, a 17-character
    Accession Number are stored, not refused for ever with 0xA700). UIDs were checked at the edge."""
    changes = {name: _text(getattr(header, name), limit) for name, limit in _TEXT_LIMITS.items()}
    if all(changes[name] == getattr(header, name) for name in changes):
        return header
    return replace(header, **changes)
