"""The queue database's tables as SQLAlchemy 2 models (mirroring the newest Alembic revision), the
statements of the ingest hot path, and the repository's exceptions. The repository is ``gateway.store``."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from gateway.lifecycle import State


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
    state_changed_at: Mapped[datetime] = mapped_column(DateTime, index=True)
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
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)  # the process working on it (gateway.claims)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    priority: Mapped[str] = mapped_column(String(8), default="routine", server_default="routine")  # stat | routine
    rule: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the routing rule that queued it
    instances_of: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)  # a copy for a further destination
    archived_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # its rows moved (gateway.retention)
    __table_args__ = (*__table_args__, Index("ix_study_units_archived_changed", "archived_at", "state_changed_at"))


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
    source: Mapped[str] = mapped_column(Text)  # "folder:<path>" may be long (migration 0009)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    pacs_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pacs_verdict: Mapped[str | None] = mapped_column(String(16), nullable=True)
    pacs_detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    imported_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class InstanceArchiveRow(Base):
    """An instance row of a unit delivered longer ago than ``[retention] keep_rows_days`` (migration 0016)."""

    __tablename__ = "instances_archive"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    unit_id: Mapped[int] = mapped_column(Integer, index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16))
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    spool_path: Mapped[str] = mapped_column(Text)
    conflict: Mapped[bool] = mapped_column(Boolean)
    source: Mapped[str] = mapped_column(Text)
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
    # pinned certificate SHA-256; two, comma-separated, while the peer rotates its key (gateway.pins.pin_set)
    fingerprint: Mapped[str | None] = mapped_column(String(200), nullable=True)
    destinations: Mapped[str] = mapped_column(Text, default="", server_default="")  # comma-separated
    max_concurrent: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    directions: Mapped[str] = mapped_column(String(8), default="both", server_default="both")  # both|send|receive
    schedule: Mapped[str] = mapped_column(Text, default="", server_default="")  # gateway.windows spec


class PeerSigningRow(Base):
    """Our identity a peer pins, as its last completed exchange showed (migration 0017): its receipts are signed
    with that key while a rotation's overlap lasts, also after a restart or from another process."""

    __tablename__ = "peer_signing"

    peer_jid: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class TransferRow(Base):
    __tablename__ = "transfers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    unit_id: Mapped[int | None] = mapped_column(ForeignKey("study_units.id"), nullable=True, index=True)
    sid: Mapped[str] = mapped_column(String(128), index=True)
    peer_jid: Mapped[str] = mapped_column(String(255))
    direction: Mapped[str] = mapped_column(String(8))
    method: Mapped[str] = mapped_column(String(16), default="")
    offset_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_moved: Mapped[int] = mapped_column(BigInteger, default=0)  # study bytes: the bundle's own, at both ends
    wire_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # on the stream (compressed); None: = bytes_moved
    started_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    outcome: Mapped[str] = mapped_column(String(16), default="running", index=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    stream_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class TransferArchiveRow(Base):
    """A transfer row of a unit delivered longer ago than ``[retention] keep_rows_days`` (migration 0016)."""

    __tablename__ = "transfers_archive"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    unit_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    sid: Mapped[str] = mapped_column(String(128))
    peer_jid: Mapped[str] = mapped_column(String(255))
    direction: Mapped[str] = mapped_column(String(8))
    method: Mapped[str] = mapped_column(String(16))
    offset_bytes: Mapped[int] = mapped_column(BigInteger)
    bytes_moved: Mapped[int] = mapped_column(BigInteger)
    wire_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    outcome: Mapped[str] = mapped_column(String(16))
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


class CommitmentRequestRow(Base):
    """A modality's Storage Commitment request (N-ACTION, PS3.4 J.3.2) until its report has been sent."""

    __tablename__ = "commitment_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(String(64), index=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    address: Mapped[str] = mapped_column(String(64), default="")
    requested_at: Mapped[datetime] = mapped_column(DateTime)
    refs: Mapped[str] = mapped_column(Text)  # JSON: [[SOP class UID, SOP instance UID], ...]
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending | reported | failed
    event_type: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1 all committed, 2 failures exist
    result: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON {"committed": [...], "failed": [[uid, reason]]}
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    reported_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class MppsStepRow(Base):
    """A Modality Performed Procedure Step (N-CREATE / N-SET, PS3.4 F.7) and what it did to the queue."""

    __tablename__ = "mpps_steps"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))  # IN PROGRESS | COMPLETED | DISCONTINUED
    study_uids: Mapped[str] = mapped_column(Text, default="[]")  # JSON list
    refs: Mapped[str] = mapped_column(Text, default="[]")  # JSON [[SOP class, SOP instance], ...] of its series
    reason: Mapped[str] = mapped_column(Text, default="")  # the discontinuation reason
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    settled: Mapped[bool] = mapped_column(Boolean, default=False, index=True)  # its units made stable (or held)


class TallyRow(Base):
    """A delta of a running total, appended by the database's triggers (migration 0015, which says the kinds and
    keys); ``ReportsRepo`` sums them per key and folds them."""

    __tablename__ = "tallies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    key: Mapped[str] = mapped_column(String(120))
    n: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    b: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    w: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    f: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


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


class ConcurrentMove(RuntimeError):
    """Another writer (process or thread) moved the unit between our read and our update."""


class DuplicateInstance(Exception):
    """Raised inside a record attempt when another writer stored the same bytes first."""
