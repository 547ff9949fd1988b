"""Queue repository, study units: state moves (checked and audited), scheduling, recovery, reading."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway.lifecycle import IllegalTransition, State, check_move
from gateway.model import InstanceRecord, StudySummary
from gateway.rows import (
    AuditRow,
    ConcurrentMove,
    InstanceArchiveRow,
    InstanceRow,
    StudyUnitRow,
    TransferRow,
    utcnow,
)


class UnitsRepo:
    """State moves, scheduling, recovery and reading of study units (mixed into ``QueueStore``)."""

    def transition(
        self, unit_id: int, target: State, detail: str = "", error: str | None = None, **values: Any
    ) -> None:
        """Move one unit to ``target`` (checked against the lifecycle table) and audit it; ``values`` sets
        other columns of the unit in the same transaction (destination, next_attempt_at, ...)."""
        with self._unit_of_work() as session:
            unit = session.get(StudyUnitRow, unit_id, with_for_update=True)
            if unit is None:
                raise KeyError(f"no study unit {unit_id}")
            self._move(session, unit, target, detail, error)
            if values:
                session.execute(update(StudyUnitRow).where(StudyUnitRow.id == unit_id).values(**values))

    def set_progress(self, unit_id: int, progress_bytes: int, method: str | None = None) -> None:
        values: dict[str, Any] = {"progress_bytes": progress_bytes}
        if method:
            values["method"] = method
        in_flight = (State.OFFERING.value, State.SENDING.value, State.RECEIVING.value)
        with self._unit_of_work() as session:
            session.execute(
                update(StudyUnitRow).where(StudyUnitRow.id == unit_id, StudyUnitRow.state.in_(in_flight)).values(**values)
            )

    def begin_receiving(self, study_instance_uid: str, origin_peer: str, bundle_bytes: int, offset: int, method: str,
                        bundle_sha256: str | None = None) -> int:
        """The ``receiving`` unit of this bundle: the one a cut transfer of it left, or a new one. One unit per
        bundle: two bundles of one study in flight at once (a late series sent by another process) never
        share a unit, and two new units never share a ``unit_seq`` (a clash is retried with the next)."""
        for attempt in range(20):
            try:
                return self._begin_receiving(study_instance_uid, origin_peer, bundle_bytes, offset, method, bundle_sha256)
            except IntegrityError:  # another bundle of the study took the same unit_seq first: take the next
                if attempt == 19:
                    raise
        raise AssertionError("unreachable")

    def _begin_receiving(self, study_instance_uid: str, origin_peer: str, bundle_bytes: int, offset: int, method: str,
                         bundle_sha256: str | None) -> int:
        with self._unit_of_work() as session:
            unit = session.scalar(
                select(StudyUnitRow).where(
                    StudyUnitRow.study_instance_uid == study_instance_uid,
                    StudyUnitRow.origin_peer == origin_peer,
                    StudyUnitRow.state == State.RECEIVING.value,
                    StudyUnitRow.bundle_sha256.is_(None) if bundle_sha256 is None else StudyUnitRow.bundle_sha256 == bundle_sha256,
                ).order_by(StudyUnitRow.id.desc()).limit(1)
            )
            now = utcnow()
            if unit is None:
                last = session.scalar(
                    select(func.max(StudyUnitRow.unit_seq)).where(StudyUnitRow.study_instance_uid == study_instance_uid)
                )
                unit = StudyUnitRow(
                    study_instance_uid=study_instance_uid, unit_seq=(last or 0) + 1, state=State.RECEIVING.value,
                    origin_peer=origin_peer, created_at=now, last_instance_at=now, state_changed_at=now,
                )
                session.add(unit)
                session.flush()
                session.add(AuditRow(at=now, unit_id=unit.id, study_instance_uid=study_instance_uid, event="created",
                                     to_state=State.RECEIVING.value, detail=f"offer from {origin_peer} accepted"))
            unit.bundle_bytes, unit.progress_bytes, unit.method = bundle_bytes, offset, method
            unit.error = None  # a pause (see receive_paused) ends with the new stream
            unit.bundle_sha256 = bundle_sha256
            return unit.id

    def receive_paused(self, unit_id: int, progress_bytes: int, detail: str) -> None:
        """An inbound stream ended before its bundle did: the unit stays ``receiving`` (what arrived is kept for
        the resume) with the reason and its progress shown, and an audit row."""
        with self._unit_of_work() as session:
            unit = session.get(StudyUnitRow, unit_id)
            if unit is not None and unit.state == State.RECEIVING.value:
                unit.error, unit.progress_bytes = detail, progress_bytes
                session.add(AuditRow(at=utcnow(), unit_id=unit_id, study_instance_uid=unit.study_instance_uid,
                                     event="receive_paused", detail=detail))

    def reschedule(self, unit_id: int, next_attempt_at: datetime, attempts: int, error: str | None = None) -> None:
        """A later try without a state move (``error``: the reason now shown, when it changed)."""
        values: dict[str, Any] = {"next_attempt_at": next_attempt_at, "attempts": attempts}
        if error is not None:
            values["error"] = error
        with self._unit_of_work() as session:
            session.execute(update(StudyUnitRow).where(StudyUnitRow.id == unit_id).values(**values))

    def route_stable(self, route: Any) -> list[tuple[int, str]]:
        """Queue every local ``stable`` unit that ``route(summary)`` gives destinations, as (peer JIDs,
        priority, rule name). The unit goes to the first destination; each further one gets a unit of its own
        that sends the same instances (``instances_of``) and has its own state. Returns (unit, peer) pairs."""
        routed: list[tuple[int, str]] = []
        for summary in self.studies(state=State.STABLE.value, where=(StudyUnitRow.origin_peer.is_(None),)):
            decision = route(summary)
            if not decision or not decision[0]:
                continue
            try:
                routed.extend(self._route_unit(summary.unit_id, *decision))
            except (ConcurrentMove, IllegalTransition):
                continue  # another process on this queue routed it first
        return routed

    def _route_unit(self, unit_id: int, peers: Sequence[str], priority: str, rule: str) -> list[tuple[int, str]]:
        with self._unit_of_work() as session:
            unit = session.get(StudyUnitRow, unit_id, with_for_update=True)
            if unit is None:
                raise KeyError(f"no study unit {unit_id}")
            if unit.state != State.STABLE.value:  # another process routed it since the list was read (and may send it)
                raise ConcurrentMove(f"study unit {unit_id} is {unit.state} now, no longer stable")
            why = f"{priority}, {'rule ' + repr(rule) if rule != 'default_destination' else 'default_destination'}"
            self._move(session, unit, State.QUEUED, f"routed to {peers[0]} ({why})")
            session.execute(update(StudyUnitRow).where(StudyUnitRow.id == unit_id)
                            .values(destination=peers[0], priority=priority, rule=rule[:64]))
            routed = [(unit_id, peers[0])]
            seq = session.scalar(select(func.max(StudyUnitRow.unit_seq))
                                 .where(StudyUnitRow.study_instance_uid == unit.study_instance_uid)) or unit.unit_seq
            now = utcnow()
            for peer in peers[1:]:
                seq += 1
                copy = StudyUnitRow(
                    study_instance_uid=unit.study_instance_uid, unit_seq=seq, state=State.QUEUED.value,
                    patient_name=unit.patient_name, patient_id=unit.patient_id, study_description=unit.study_description,
                    study_date=unit.study_date, accession_number=unit.accession_number, destination=peer,
                    instance_count=unit.instance_count, size_bytes=unit.size_bytes, flags=unit.flags,
                    created_at=now, last_instance_at=unit.last_instance_at, state_changed_at=now,
                    priority=priority, rule=rule[:64], instances_of=unit_id,
                )
                session.add(copy)
                session.flush()
                session.add(AuditRow(at=now, unit_id=copy.id, study_instance_uid=unit.study_instance_uid,
                                     event="transition", from_state=State.STABLE.value, to_state=State.QUEUED.value,
                                     detail=f"routed to {peer} ({why}): the instances of unit {unit_id}, a unit of its own"))
                routed.append((copy.id, peer))
            return routed

    def due_for_sending_where(self, now: datetime | None = None) -> tuple[Any, ...]:
        """SQL conditions of a local unit due for an offer (for ``gateway.claims.Claims.claim_due``)."""
        moment = now or utcnow()
        return (
            StudyUnitRow.state.in_((State.QUEUED.value, State.WAITING_PEER.value, State.WAITING_WINDOW.value)),
            StudyUnitRow.origin_peer.is_(None),
            (StudyUnitRow.next_attempt_at.is_(None)) | (StudyUnitRow.next_attempt_at <= moment),
        )

    def due_for_sending(self, now: datetime | None = None) -> list[StudySummary]:
        return self.studies(where=self.due_for_sending_where(now))

    def unit_instances(self, unit_id: int) -> list[InstanceRecord]:
        """The instances a unit sends: its own, or for a copy made for a further destination, those of the
        unit it copies."""
        with self._sessions() as session:
            rows = session.scalars(
                select(InstanceRow)
                .where(InstanceRow.unit_id == instance_source(session, unit_id))
                .order_by(InstanceRow.series_number, InstanceRow.series_instance_uid, InstanceRow.instance_number, InstanceRow.sop_instance_uid, InstanceRow.id)
            ).all()
        return [_instance(r) for r in rows]

    def unit(self, unit_id: int) -> StudySummary:
        with self._sessions() as session:
            row = session.get(StudyUnitRow, unit_id)
            if row is None:
                raise KeyError(f"no study unit {unit_id}")
            return _summary(row, self._modalities(session, [unit_id]).get(unit_id, ""))

    def retry_unit(self, unit_id: int, who: str = "admin") -> str:
        """The admin's retry of a ``failed`` unit: a local one is queued again; one from a peer is imported
        again (instances the PACS refused are sent again, those it stored are not). Returns the new state."""
        with self._unit_of_work() as session:
            unit = session.get(StudyUnitRow, unit_id, with_for_update=True)
            if unit is None:
                raise KeyError(f"no study unit {unit_id}")
            target = State.RECEIVED if unit.origin_peer else State.QUEUED
            self._move(session, unit, target, f"retry requested by {who}")
            session.execute(update(StudyUnitRow).where(StudyUnitRow.id == unit_id).values(
                attempts=0, next_attempt_at=utcnow(), receipt_at=None,
                flags=",".join(f for f in unit.flags.split(",") if f and f != "pacs-refused"),
            ))
            session.execute(
                update(InstanceRow).where(InstanceRow.unit_id == unit_id, InstanceRow.pacs_verdict == "permanent")
                .values(pacs_status=None, pacs_verdict=None, pacs_detail=None, imported_at=None)
            )
            return target.value

    def recover_in_flight(self, free: Any = None, units: Sequence[int] | None = None,
                          why: str = "") -> list[tuple[int, str, str]]:
        """Units no process works on any more: a local unit left ``offering``/``sending`` goes back to
        ``queued`` (the resend resumes at the receiver's offset); a received unit left ``importing`` without a
        pending Storage Commitment goes back to ``received``, due now; their ``running`` transfer rows are
        closed as ``interrupted``. ``free`` (SQL, ``gateway.claims.Claims.free``) limits it to units whose
        claim has lapsed; ``units`` to those units (a live process's own, whose task a database outage cut);
        None: all of them (one process). ``why`` goes into the history and the rows. Returns (unit, from, to)."""
        moved = []
        with self._unit_of_work() as session:
            query = select(StudyUnitRow).where(
                StudyUnitRow.state.in_((State.OFFERING.value, State.SENDING.value, State.IMPORTING.value)))
            if free is not None:
                query = query.where(free)
            if units is not None:
                query = query.where(StudyUnitRow.id.in_(list(units)))
            for unit in session.scalars(query.with_for_update(skip_locked=True)).all():
                if unit.state == State.IMPORTING.value and unit.commit_uid:
                    continue  # the PACS's commitment report may still come; commitment_timeout_s covers it
                target = State.RECEIVED if unit.state == State.IMPORTING.value else State.QUEUED
                before = unit.state
                self._move(session, unit, target, f"{why or 'gateway process stopped'} while {before}: resuming")
                session.execute(update(StudyUnitRow).where(StudyUnitRow.id == unit.id).values(
                    next_attempt_at=utcnow(), owner=None, lease_until=None))
                session.execute(update(TransferRow).where(TransferRow.unit_id == unit.id, TransferRow.outcome == "running")
                                .values(outcome="interrupted", ended_at=utcnow(),
                                        error=f"{why or 'the gateway process stopped'} during the stream"))
                moved.append((unit.id, before, target.value))
        return moved

    def _lock_fresh(self, session: Session, unit: StudyUnitRow) -> None:
        """Hold the unit's row for this transaction, then re-read it. PostgreSQL: ``FOR UPDATE`` (the row
        lock). SQLite: a no-op write takes the database's write lock (pysqlite begins the transaction only
        at the first write, so a plain read before it may be stale by the time we write)."""
        if session.get_bind().dialect.name == "sqlite":
            session.execute(update(StudyUnitRow).where(StudyUnitRow.id == unit.id).values(state=StudyUnitRow.state))
        session.refresh(unit, with_for_update=session.get_bind().dialect.name != "sqlite")

    def _move(
        self, session: Session, unit: StudyUnitRow, target: State, detail: str, error: str | None = None
    ) -> None:
        current = unit.state
        check_move(current, target)
        now = utcnow()
        result = session.execute(
            update(StudyUnitRow)
            .where(StudyUnitRow.id == unit.id, StudyUnitRow.state == current)
            .values(state=target.value, state_changed_at=now, error=error)
        )
        if result.rowcount != 1:
            raise ConcurrentMove(f"study unit {unit.id} moved concurrently from {current}")
        session.add(
            AuditRow(
                at=now,
                unit_id=unit.id,
                study_instance_uid=unit.study_instance_uid,
                event="transition",
                from_state=current,
                to_state=target.value,
                detail=detail,
            )
        )

    def mark_stable(self, stable_age_s: float, now: datetime | None = None, batch: int = 500,
                    exclude: Sequence[int] = ()) -> list[int]:
        """Move every ``received`` unit with no new instance for ``stable_age_s`` to ``stable``: in batches of
        ``batch`` units, each one transaction of one UPDATE and one INSERT of its audit rows, so the time is
        linear in the units and the write lock is given up between batches (ingest goes on answering).
        ``exclude``: units still being fed (``gateway.service.CompletenessService.held``)."""
        moved: list[int] = []
        for _round in range(1_000_000 // batch + 1):  # bounded: a million units a tick at most
            found, done = self._mark_stable_batch(stable_age_s, now, batch, exclude)
            moved += done
            if found < batch:
                break
        return moved

    def keep_open(self, unit_ids: Sequence[int]) -> None:
        """Units an association of this process still feeds: their last instance counts as now, so that no
        other process on this queue marks them stable meanwhile (``gateway.service.CompletenessService``)."""
        if not unit_ids:
            return
        with self._unit_of_work() as session:
            session.execute(update(StudyUnitRow).where(StudyUnitRow.id.in_(list(unit_ids)),
                                                       StudyUnitRow.state == State.RECEIVED.value)
                            .values(last_instance_at=utcnow()).execution_options(synchronize_session=False))

    def _mark_stable_batch(self, stable_age_s: float, now: datetime | None, batch: int,
                           exclude: Sequence[int] = ()) -> tuple[int, list[int]]:
        """(units found, units moved) of one batch."""
        check_move(State.RECEIVED.value, State.STABLE)
        cutoff = (now or utcnow()) - timedelta(seconds=stable_age_s)
        detail = f"no new instance for {stable_age_s:g} s"
        with self._unit_of_work() as session:
            found = session.execute(
                select(StudyUnitRow.id, StudyUnitRow.study_instance_uid).where(
                    StudyUnitRow.state == State.RECEIVED.value,
                    StudyUnitRow.origin_peer.is_(None),
                    StudyUnitRow.last_instance_at <= cutoff,
                    StudyUnitRow.instance_count > 0,
                    ~StudyUnitRow.flags.contains("held"),  # a discontinued MPPS holds it for an admin
                    *([StudyUnitRow.id.not_in(list(exclude))] if exclude else []),
                ).order_by(StudyUnitRow.id).limit(batch).with_for_update(skip_locked=True)  # other processes too
            ).all()
            if not found:
                return 0, []
            stamp = utcnow()
            moved = set(session.scalars(  # re-checked: an instance that came meanwhile keeps its unit open
                update(StudyUnitRow).where(StudyUnitRow.id.in_([row.id for row in found]),
                                           StudyUnitRow.state == State.RECEIVED.value, StudyUnitRow.last_instance_at <= cutoff)
                .values(state=State.STABLE.value, state_changed_at=stamp, error=None)
                .returning(StudyUnitRow.id).execution_options(synchronize_session=False)
            ).all())
            if moved:
                session.execute(insert(AuditRow), [
                    {"at": stamp, "unit_id": row.id, "study_instance_uid": row.study_instance_uid, "event": "transition",
                     "from_state": State.RECEIVED.value, "to_state": State.STABLE.value, "detail": detail}
                    for row in found if row.id in moved
                ])
        return len(found), [row.id for row in found if row.id in moved]

    def studies(self, state: str | None = None, where: Sequence[Any] = ()) -> list[StudySummary]:
        """Units in creation order, optionally in one ``state`` and matching ``where`` (SQL conditions: the
        periodic queries select in the database, not by loading every unit ever kept)."""
        query = select(StudyUnitRow).order_by(StudyUnitRow.created_at, StudyUnitRow.id).where(*where)
        if state:
            query = query.where(StudyUnitRow.state == state)
        with self._sessions() as session:
            units = session.scalars(query).all()
            modalities = self._modalities(session, [u.id for u in units])
        return [_summary(u, modalities.get(u.id, "")) for u in units]

    def queue_page(self, limit: int = 50, page: int = 1, state: str | None = None,
                   include_history: bool = True) -> tuple[list[StudySummary], int, int]:
        """One page of the queue view: live units first (in flight, then the rest in queue order), then
        history (``delivered``, newest first). Returns (units, live count, history count); the cost follows
        the page, not the history (two counts on the state index, then at most ``limit`` rows)."""
        history_states = (State.DELIVERED.value,)
        in_flight = (State.OFFERING.value, State.SENDING.value, State.RECEIVING.value, State.IMPORTING.value)
        live_where: list[Any] = [StudyUnitRow.state.not_in(history_states)]
        history_where: list[Any] = [StudyUnitRow.state.in_(history_states)]
        if state:
            live_where.append(StudyUnitRow.state == state)
            history_where.append(StudyUnitRow.state == state)
        offset = max(0, (max(1, page) - 1) * max(1, limit))
        with self._sessions() as session:
            live_total = int(session.scalar(select(func.count(StudyUnitRow.id)).where(*live_where)) or 0)
            history_total = int(session.scalar(select(func.count(StudyUnitRow.id)).where(*history_where)) or 0) \
                if include_history else 0
            units: list[StudyUnitRow] = []
            if offset < live_total:
                flight_first = case((StudyUnitRow.state.in_(in_flight), 0), else_=1)
                units += session.scalars(select(StudyUnitRow).where(*live_where)
                                         .order_by(flight_first, StudyUnitRow.created_at, StudyUnitRow.id)
                                         .offset(offset).limit(limit)).all()
            room = limit - len(units)
            if room > 0 and include_history:
                units += session.scalars(select(StudyUnitRow).where(*history_where)
                                         .order_by(StudyUnitRow.state_changed_at.desc(), StudyUnitRow.id.desc())
                                         .offset(max(0, offset - live_total)).limit(room)).all()
            modalities = self._modalities(session, [u.id for u in units])
        return [_summary(u, modalities.get(u.id, "")) for u in units], live_total, history_total

    def study_units(self, study_instance_uid: str) -> list[tuple[StudySummary, list[InstanceRecord]]]:
        """Every unit of one study with its instances, ordered by series and instance number."""
        with self._sessions() as session:
            units = session.scalars(
                select(StudyUnitRow)
                .where(StudyUnitRow.study_instance_uid == study_instance_uid)
                .order_by(StudyUnitRow.unit_seq)
            ).all()
            modalities = self._modalities(session, [u.id for u in units])
            result = []
            for unit in units:
                source = unit.instances_of or unit.id
                rows = [*session.scalars(select(InstanceRow).where(InstanceRow.unit_id == source)).all(),
                        *session.scalars(select(InstanceArchiveRow).where(InstanceArchiveRow.unit_id == source)).all()]
                rows.sort(key=lambda r: (r.series_number is not None, r.series_number or 0, r.series_instance_uid,
                                         r.instance_number is not None, r.instance_number or 0, r.id))
                result.append((_summary(unit, modalities.get(unit.id, "")), [_instance(r) for r in rows]))
        return result

    def _modalities(self, session: Session, unit_ids: Sequence[int]) -> dict[int, str]:
        if not unit_ids:
            return {}
        source_of = {unit_id: source or unit_id for unit_id, source in session.execute(
            select(StudyUnitRow.id, StudyUnitRow.instances_of).where(StudyUnitRow.id.in_(unit_ids))).all()}
        sources = set(source_of.values())
        rows = [row for table in (InstanceRow, InstanceArchiveRow) for row in session.execute(
            select(table.unit_id, table.modality).where(table.unit_id.in_(sources)).group_by(table.unit_id, table.modality)
        ).all()]
        found: dict[int, list[str]] = {}
        for unit_id, modality in rows:
            if modality and modality not in found.get(unit_id, []):
                found.setdefault(unit_id, []).append(modality)
        return {unit_id: "/".join(sorted(found.get(source, []))) for unit_id, source in source_of.items()}

    def first_instance(self, unit_id: int) -> InstanceRecord | None:
        """The unit's first recorded instance (what routing reads: its source and attributes)."""
        with self._sessions() as session:
            row = session.scalars(select(InstanceRow).where(InstanceRow.unit_id == instance_source(session, unit_id))
                                  .order_by(InstanceRow.id).limit(1)).first()
        return _instance(row) if row is not None else None

    def count_instances(self) -> int:
        with self._sessions() as session:
            return int(session.scalar(select(func.count(InstanceRow.id))) or 0)



def instance_source(session: Session, unit_id: int) -> int:
    """The unit whose instance rows a unit sends: itself, or for a copy made for a further destination the
    unit it copies (``instances_of``)."""
    return session.scalar(select(StudyUnitRow.instances_of).where(StudyUnitRow.id == unit_id)) or unit_id


def _summary(unit: StudyUnitRow, modalities: str) -> StudySummary:
    return StudySummary(
        unit_id=unit.id,
        study_instance_uid=unit.study_instance_uid,
        unit_seq=unit.unit_seq,
        state=unit.state,
        patient_name=unit.patient_name,
        patient_id=unit.patient_id,
        study_description=unit.study_description,
        modalities=modalities,
        instances=unit.instance_count,
        size_bytes=unit.size_bytes,
        destination=unit.destination,
        created_at=unit.created_at,
        last_instance_at=unit.last_instance_at,
        state_changed_at=unit.state_changed_at,
        flags=unit.flags,
        error=unit.error,
        origin_peer=unit.origin_peer,
        method=unit.method,
        progress_bytes=unit.progress_bytes or 0,
        bundle_bytes=unit.bundle_bytes or 0,
        attempts=unit.attempts or 0,
        next_attempt_at=unit.next_attempt_at,
        bundle_sha256=unit.bundle_sha256,
        receipt_at=unit.receipt_at,
        purged_at=unit.purged_at,
        archived_at=unit.archived_at,
        priority=unit.priority or "routine",
        rule=unit.rule,
        instances_of=unit.instances_of,
    )


def _instance(row: InstanceRow) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=row.sop_instance_uid,
        sop_class_uid=row.sop_class_uid,
        transfer_syntax_uid=row.transfer_syntax_uid,
        series_instance_uid=row.series_instance_uid,
        series_number=row.series_number,
        series_description=row.series_description,
        modality=row.modality,
        instance_number=row.instance_number,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        spool_path=row.spool_path,
        conflict=row.conflict,
        source=row.source,
        received_at=row.received_at,
        instance_id=row.id,
        pacs_status=row.pacs_status,
        pacs_verdict=row.pacs_verdict,
        pacs_detail=row.pacs_detail,
    )
