"""The queue database: SQLAlchemy 2 models and the repository the use cases call.

Contract
- One engine per process (:func:`make_engine`); SQLite runs in WAL mode with ``synchronous=FULL`` (a commit
  is on disk when it returns) and a busy timeout; PostgreSQL works with the same code (URL only).
- The schema is owned by Alembic (``migrations/``); :func:`upgrade_schema` brings any DB to head and the
  gateway calls it on start. The ORM classes here mirror the newest revision.
- :class:`QueueStore` is the only code that writes rows. Every state move goes through
  ``gateway.lifecycle.check_move`` and writes an ``audit_log`` row in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from gateway.lifecycle import OPEN_FOR_INSTANCES, IllegalTransition, State, check_move
from gateway.model import InstanceHeader, InstanceRecord, StudySummary

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def utcnow() -> datetime:
    """Naive UTC: what every timestamp column holds (SQLite keeps no zone)."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class StudyUnitRow(Base):
    __tablename__ = "study_units"
    __table_args__ = (UniqueConstraint("study_instance_uid", "unit_seq", name="uq_study_unit_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    unit_seq: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), index=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    destination: Mapped[str | None] = mapped_column(String(255), nullable=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    flags: Mapped[str] = mapped_column(String(64), default="")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    last_instance_at: Mapped[datetime] = mapped_column(DateTime)
    state_changed_at: Mapped[datetime] = mapped_column(DateTime)
    origin_peer: Mapped[str | None] = mapped_column(String(255), nullable=True)  # None: from local modalities
    method: Mapped[str | None] = mapped_column(String(16), nullable=True)
    progress_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    bundle_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    bundle_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    receipt_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    commit_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    purged_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the process working on it (gateway.claims)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class InstanceRow(Base):
    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "sha256", name="uq_instance_uid_sha256"),
        Index("ix_instances_sop_instance_uid", "sop_instance_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    unit_id: Mapped[int] = mapped_column(ForeignKey("study_units.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    spool_path: Mapped[str] = mapped_column(Text)
    conflict: Mapped[bool] = mapped_column(Boolean, default=False)
    source: Mapped[str] = mapped_column(String(80))
    received_at: Mapped[datetime] = mapped_column(DateTime)
    pacs_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pacs_verdict: Mapped[str | None] = mapped_column(String(16), nullable=True)
    pacs_detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    imported_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class PeerRow(Base):
    __tablename__ = "peers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    jid: Mapped[str] = mapped_column(String(255), unique=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    allowed: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)  # pinned certificate SHA-256


class TransferRow(Base):
    __tablename__ = "transfers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    unit_id: Mapped[int | None] = mapped_column(ForeignKey("study_units.id"), nullable=True, index=True)
    sid: Mapped[str] = mapped_column(String(128), index=True)
    peer_jid: Mapped[str] = mapped_column(String(255))
    direction: Mapped[str] = mapped_column(String(8))
    method: Mapped[str] = mapped_column(String(16), default="")
    offset_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_moved: Mapped[int] = mapped_column(BigInteger, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    outcome: Mapped[str] = mapped_column(String(16), default="running")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    stream_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class AuditRow(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    unit_id: Mapped[int | None] = mapped_column(ForeignKey("study_units.id"), nullable=True, index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    event: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    repeat_count: Mapped[int] = mapped_column(Integer, default=1)  # aggregated refusals (see audit_repeated)


class StreamClaimRow(Base):
    """One inbound stream per bundle at a time, across every process on this queue (gateway.claims)."""

    __tablename__ = "stream_claims"

    bundle_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    peer_jid: Mapped[str] = mapped_column(String(255))
    owner: Mapped[str] = mapped_column(String(128))
    lease_until: Mapped[datetime] = mapped_column(DateTime)


class RuntimeStatusRow(Base):
    """What a running gateway reports about itself (the XMPP connection), read by `dicomgw status`."""

    __tablename__ = "runtime_status"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


# Hot-path statements, built once (expression construction costs more than SQLite's own work here).
_SELECT_COPIES = select(InstanceRow.sha256, InstanceRow.spool_path).where(InstanceRow.sop_instance_uid == bindparam("uid"))
_GROW_OPEN_UNIT = (
    update(StudyUnitRow.__table__)
    .where(StudyUnitRow.__table__.c.id == bindparam("unit"), StudyUnitRow.__table__.c.state == State.RECEIVED.value)
    .values(
        instance_count=StudyUnitRow.__table__.c.instance_count + 1,
        size_bytes=StudyUnitRow.__table__.c.size_bytes + bindparam("bytes"),
        last_instance_at=bindparam("now"),
    )
)
_INSERT_INSTANCE = InstanceRow.__table__.insert()


def make_engine(db_url: str) -> Engine:
    """The process's one engine. SQLite: WAL, synchronous=FULL, 30 s busy timeout, foreign keys on."""
    if db_url.startswith("sqlite"):
        path = db_url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(db_url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(db_url, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def alembic_config(db_url: str) -> Any:
    """The Alembic config for ``migrations/`` pointing at ``db_url`` (no alembic.ini needed)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    return config


def upgrade_schema(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision`` (the gateway calls this on start)."""
    from alembic import command

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


class ConcurrentMove(RuntimeError):
    """Another writer (process or thread) moved the unit between our read and our update."""


class DuplicateInstance(Exception):
    """Raised inside a record attempt when another writer stored the same bytes first."""


class QueueStore:
    """Repository over the queue DB; each public method is one unit of work (one transaction)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # study_instance_uid -> id of the unit last seen open for it: lets the hot path skip the lookup.
        # Only a hint: the fast path re-checks the unit's state in its UPDATE.
        self._open_unit_hint: dict[tuple[str, str | None], int] = {}

    @contextmanager
    def _unit_of_work(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # -- ingest -----------------------------------------------------------------------------------
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
        by another writer.
        """
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
                         origin_peer: str | None = None) -> list[int]:
        """Record (header, spool_path, size, sha256, conflict) rows in one transaction; returns unit ids."""
        with self._unit_of_work() as session:
            return [
                self._record(session, header, path, size, sha256, source, conflict, origin_peer)
                for header, path, size, sha256, conflict in rows
            ]

    def _record_fast(
        self, header: InstanceHeader, spool_path: str, size_bytes: int, sha256: str, source: str, origin_peer: str | None
    ) -> int | None:
        """One UPDATE + one INSERT on the unit this process saw open last; None if it is no longer open."""
        key = (header.study_instance_uid, origin_peer)
        unit_id = self._open_unit_hint.get(key)
        if unit_id is None:
            return None
        now = utcnow()
        with self._engine.begin() as conn:
            moved = conn.execute(_GROW_OPEN_UNIT, {"unit": unit_id, "bytes": size_bytes, "now": now})
            if moved.rowcount != 1:
                self._open_unit_hint.pop(key, None)
                return None
            conn.execute(_INSERT_INSTANCE, _instance_values(header, unit_id, spool_path, size_bytes, sha256, source, False, now))
        return unit_id

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
        session.add(InstanceRow(**_instance_values(header, unit.id, spool_path, size_bytes, sha256, source, conflict, now)))
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
        session.flush()
        return unit.id

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

    # -- state moves ------------------------------------------------------------------------------
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
        """The ``receiving`` unit for an accepted offer: the one a cut transfer left, or a new one."""
        with self._unit_of_work() as session:
            unit = session.scalar(
                select(StudyUnitRow).where(
                    StudyUnitRow.study_instance_uid == study_instance_uid,
                    StudyUnitRow.origin_peer == origin_peer,
                    StudyUnitRow.state == State.RECEIVING.value,
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

    def route_stable(self, destination_for: Any) -> list[tuple[int, str]]:
        """Queue every local ``stable`` unit that ``destination_for(summary)`` gives a destination."""
        routed = []
        for summary in self.studies(state=State.STABLE.value):
            if summary.origin_peer:
                continue
            destination = destination_for(summary)
            if destination:
                try:
                    self.transition(summary.unit_id, State.QUEUED, f"routed to {destination}", destination=destination)
                except (ConcurrentMove, IllegalTransition):
                    continue  # another process on this queue routed it first
                routed.append((summary.unit_id, destination))
        return routed

    def due_for_sending_where(self, now: datetime | None = None) -> tuple[Any, ...]:
        """SQL conditions of a local unit due for an offer (for ``gateway.claims.Claims.claim_due``)."""
        moment = now or utcnow()
        return (
            StudyUnitRow.state.in_((State.QUEUED.value, State.WAITING_PEER.value)),
            StudyUnitRow.origin_peer.is_(None),
            (StudyUnitRow.next_attempt_at.is_(None)) | (StudyUnitRow.next_attempt_at <= moment),
        )

    def due_for_sending(self, now: datetime | None = None) -> list[StudySummary]:
        return self.studies(where=self.due_for_sending_where(now))

    def unit_instances(self, unit_id: int) -> list[InstanceRecord]:
        with self._sessions() as session:
            rows = session.scalars(
                select(InstanceRow)
                .where(InstanceRow.unit_id == unit_id)
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

    def recover_in_flight(self, free: Any = None) -> list[tuple[int, str, str]]:
        """Units no process works on any more: a local unit left ``offering``/``sending`` goes back to
        ``queued`` (the resend resumes at the receiver's offset); a received unit left ``importing`` without a
        pending Storage Commitment goes back to ``received``, due now; their ``running`` transfer rows are
        closed as ``interrupted``. ``free`` (SQL, ``gateway.claims.Claims.free``) limits it to units whose
        claim has lapsed; None: all of them (one process). Returns (unit, from, to)."""
        moved = []
        with self._unit_of_work() as session:
            query = select(StudyUnitRow).where(
                StudyUnitRow.state.in_((State.OFFERING.value, State.SENDING.value, State.IMPORTING.value)))
            if free is not None:
                query = query.where(free)
            for unit in session.scalars(query.with_for_update(skip_locked=True)).all():
                if unit.state == State.IMPORTING.value and unit.commit_uid:
                    continue  # the PACS's commitment report may still come; commitment_timeout_s covers it
                target = State.RECEIVED if unit.state == State.IMPORTING.value else State.QUEUED
                before = unit.state
                self._move(session, unit, target, f"gateway process stopped while {before}: resuming")
                session.execute(update(StudyUnitRow).where(StudyUnitRow.id == unit.id).values(
                    next_attempt_at=utcnow(), owner=None, lease_until=None))
                session.execute(update(TransferRow).where(TransferRow.unit_id == unit.id, TransferRow.outcome == "running")
                                .values(outcome="interrupted", ended_at=utcnow(),
                                        error="the gateway process stopped during the stream"))
                moved.append((unit.id, before, target.value))
        return moved

    # -- import into the local PACS, receipts, retention ------------------------------------------
    def due_for_import(self, now: datetime | None = None) -> list[StudySummary]:
        """Received units from peers whose bundle is fully in the spool (``next_attempt_at`` set) and due."""
        moment = now or utcnow()
        return self.studies(state=State.RECEIVED.value, where=(
            StudyUnitRow.origin_peer.is_not(None), StudyUnitRow.next_attempt_at <= moment,
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
            if unit.state == State.DELIVERED.value:
                return "delivered"
            if not delivered:
                if unit.state == State.SENT.value:
                    self._move(session, unit, State.FAILED, f"{peer_bare}: {detail}", f"receiver's PACS refused: {detail}")
                    return "failed"
                return "noted"
            unit.receipt_at = utcnow()
            if unit.state in (State.SENT.value, State.QUEUED.value, State.WAITING_PEER.value, State.FAILED.value):
                self._move(session, unit, State.DELIVERED, f"receipt from {peer_bare}: {detail}")
                return "delivered"
            return "noted"

    def mark_sent(self, unit_id: int, detail: str, **values: Any) -> str:
        """``sent``; straight on to ``delivered`` when the receipt already came (it may overtake the verdict)."""
        with self._unit_of_work() as session:
            unit = session.get(StudyUnitRow, unit_id, with_for_update=True)
            if unit is None:
                raise KeyError(f"no study unit {unit_id}")
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

    def mark_purged(self, unit_id: int, detail: str) -> None:
        with self._unit_of_work() as session:
            unit = session.get(StudyUnitRow, unit_id)
            if unit is not None:
                unit.purged_at = utcnow()
                session.add(AuditRow(at=utcnow(), unit_id=unit_id, study_instance_uid=unit.study_instance_uid,
                                     event="purged", detail=detail))

    # -- transfers (one row per attempt) ------------------------------------------------------------
    def record_transfer(self, unit_id: int | None, sid: str, peer_jid: str, direction: str, method: str,
                        offset_bytes: int, bytes_moved: int, started_at: datetime, outcome: str, error: str | None,
                        stream_s: float | None = None) -> None:
        self.close_transfer(None, unit_id, sid, peer_jid, direction, method, offset_bytes, bytes_moved, started_at,
                            outcome, error, stream_s)

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
                       error: str | None, stream_s: float | None = None) -> None:
        """End an attempt's row (the one :meth:`open_transfer` made, or a new one for an attempt that moved
        no byte)."""
        with self._unit_of_work() as session:
            row = session.get(TransferRow, row_id) if row_id is not None else None
            if row is None:
                row = TransferRow(unit_id=unit_id, sid=sid, peer_jid=peer_jid, direction=direction, started_at=started_at)
                session.add(row)
            row.method, row.offset_bytes, row.bytes_moved = method, offset_bytes, bytes_moved
            row.ended_at, row.outcome, row.error, row.stream_s = utcnow(), outcome, error, stream_s

    def transfers(self, unit_id: int | None = None) -> list[dict[str, Any]]:
        query = select(TransferRow).order_by(TransferRow.started_at, TransferRow.id)
        if unit_id is not None:
            query = query.where(TransferRow.unit_id == unit_id)
        with self._sessions() as session:
            rows = session.scalars(query).all()
        return [
            {"unit_id": r.unit_id, "sid": r.sid, "peer_jid": r.peer_jid, "direction": r.direction, "method": r.method,
             "offset_bytes": r.offset_bytes, "bytes": r.bytes_moved, "started_at": r.started_at.isoformat(),
             "ended_at": r.ended_at.isoformat() if r.ended_at else None, "outcome": r.outcome, "error": r.error,
             "stream_s": r.stream_s}
            for r in rows
        ]

    # -- peers --------------------------------------------------------------------------------------
    def add_peer(self, jid: str, name: str = "", fingerprint: str | None = None) -> None:
        with self._unit_of_work() as session:
            existing = session.scalar(select(PeerRow).where(PeerRow.jid == jid))
            if existing is None:
                existing = PeerRow(jid=jid, name=name, allowed=True, created_at=utcnow())
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
            session.add(AuditRow(at=utcnow(), event="peer_added", detail=f"{jid} may exchange studies{pinned}"))

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
                 "created_at": r.created_at.isoformat()} for r in rows]

    def peer_fingerprint(self, jid: str) -> str | None:
        with self._sessions() as session:
            return session.scalar(select(PeerRow.fingerprint).where(PeerRow.jid == jid, PeerRow.allowed.is_(True)))

    def peer_allowed(self, jid: str) -> bool:
        with self._sessions() as session:
            return bool(session.scalar(select(PeerRow.allowed).where(PeerRow.jid == jid)))

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

    def mark_stable(self, stable_age_s: float, now: datetime | None = None) -> list[int]:
        """Move every ``received`` unit with no new instance for ``stable_age_s`` to ``stable``."""
        cutoff = (now or utcnow()) - timedelta(seconds=stable_age_s)
        moved: list[int] = []
        with self._unit_of_work() as session:
            units = session.scalars(
                select(StudyUnitRow).where(
                    StudyUnitRow.state == State.RECEIVED.value,
                    StudyUnitRow.origin_peer.is_(None),
                    StudyUnitRow.last_instance_at <= cutoff,
                    StudyUnitRow.instance_count > 0,
                ).with_for_update(skip_locked=True)  # another process on this queue may be moving them
            ).all()
            for unit in units:
                self._move(session, unit, State.STABLE, f"no new instance for {stable_age_s:g} s")
                moved.append(unit.id)
        return moved

    # -- audit ------------------------------------------------------------------------------------
    def audit(self, event_name: str, detail: str, unit_id: int | None = None, study_instance_uid: str | None = None) -> None:
        with self._unit_of_work() as session:
            session.add(
                AuditRow(at=utcnow(), unit_id=unit_id, study_instance_uid=study_instance_uid, event=event_name, detail=detail)
            )

    def audit_repeated(self, event_name: str, key: str, detail: str, window_s: float = 60.0) -> None:
        """One row per ``key`` (e.g. a refused sender) and ``window_s``: a repeat within the window only
        counts (``repeat_count``), so a flood of refusals cannot flood the audit log."""
        since = utcnow() - timedelta(seconds=window_s)
        marker = f"[{key}] "
        with self._unit_of_work() as session:
            row = session.scalar(
                select(AuditRow).where(AuditRow.event == event_name, AuditRow.at >= since, AuditRow.detail.startswith(marker, autoescape=True))
                .order_by(AuditRow.id.desc()).limit(1).with_for_update()
            )
            if row is None:
                session.add(AuditRow(at=utcnow(), event=event_name, detail=marker + detail))
            else:
                row.repeat_count += 1

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

    # -- reading ----------------------------------------------------------------------------------
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
                rows = session.scalars(
                    select(InstanceRow)
                    .where(InstanceRow.unit_id == unit.id)
                    .order_by(InstanceRow.series_number, InstanceRow.series_instance_uid, InstanceRow.instance_number, InstanceRow.id)
                ).all()
                result.append((_summary(unit, modalities.get(unit.id, "")), [_instance(r) for r in rows]))
        return result

    def _modalities(self, session: Session, unit_ids: Sequence[int]) -> dict[int, str]:
        if not unit_ids:
            return {}
        rows = session.execute(
            select(InstanceRow.unit_id, InstanceRow.modality)
            .where(InstanceRow.unit_id.in_(unit_ids))
            .group_by(InstanceRow.unit_id, InstanceRow.modality)
        ).all()
        found: dict[int, list[str]] = {}
        for unit_id, modality in rows:
            if modality:
                found.setdefault(unit_id, []).append(modality)
        return {k: "/".join(sorted(v)) for k, v in found.items()}

    def count_instances(self) -> int:
        with self._sessions() as session:
            return int(session.scalar(select(func.count(InstanceRow.id))) or 0)


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
