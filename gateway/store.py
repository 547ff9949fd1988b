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

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from gateway.group_commit import GroupCommit
from gateway.rows import (  # noqa: F401 (the models and exceptions are part of this module's interface)
    AuditRow,
    Base,
    ConcurrentMove,
    DuplicateInstance,
    InstanceRow,
    PeerRow,
    RuntimeStatusRow,
    StreamClaimRow,
    StudyUnitRow,
    TransferRow,
    utcnow,
)
from gateway.store_archive import ArchiveRepo
from gateway.store_audit import AuditRepo
from gateway.store_commitments import CommitmentsRepo
from gateway.store_imports import ImportsRepo
from gateway.store_ingest import IngestRepo
from gateway.store_mpps import MppsRepo
from gateway.store_reports import ReportsRepo
from gateway.store_transfers import TransfersRepo
from gateway.store_units import UnitsRepo

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any, synchronous: str = "FULL") -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


_LEASE_ENGINES: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


def lease_engine(engine: Engine) -> Engine:
    """An engine on the same database whose commits do not wait for the disk, for lease bookkeeping only
    (``gateway.claims``): a claim or lease lost in a power cut belonged to a process that is gone with it, and
    other processes see a commit at once either way. SQLite: synchronous=NORMAL (WAL stays consistent; the next
    full commit of any connection syncs it too); PostgreSQL: synchronous_commit off. Every instance, unit move
    and receipt still commits through ``engine`` (synchronous=FULL / on). One per engine; an in-memory SQLite
    database (one per connection) keeps ``engine``."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and (not url.database or url.database == ":memory:"):
        return engine
    lax = _LEASE_ENGINES.get(engine)
    if lax is None:
        if url.get_backend_name() == "sqlite":
            lax = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=2)
            event.listen(lax, "connect", lambda conn, record: _sqlite_pragmas(conn, record, "NORMAL"))
        else:
            lax = create_engine(url, pool_pre_ping=True, pool_size=2,
                                connect_args={"options": "-c synchronous_commit=off"})
        _LEASE_ENGINES[engine] = lax
    return lax


def alembic_config(db_url: str) -> Any:
    """The Alembic config for ``migrations/`` pointing at ``db_url`` (no alembic.ini needed)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    return config


# The newest revision under migrations/versions (tests/integration/test_queue.py holds it to Alembic's head): a
# database already there needs no Alembic at all, which saves every CLI command ~0.2 s of loading it.
SCHEMA_HEAD = "0017"


def upgrade_schema(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision`` (the gateway and the CLI call this on start)."""
    if revision == "head" and schema_revision(engine) == SCHEMA_HEAD:
        return
    from alembic import command

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def schema_revision(engine: Engine) -> str | None:
    """The revision Alembic last brought the database to; None for a database it never touched."""
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except ProgrammingError:
        return None  # PostgreSQL: no such table
    except OperationalError as exc:
        if "no such table" in str(exc.orig):
            return None  # SQLite
        raise  # the database cannot be reached: said once, not again by Alembic


def open_store(db_url: str) -> QueueStore:
    """Engine + schema at head + repository: what the CLI's commands need."""
    engine = make_engine(db_url)
    upgrade_schema(engine)
    return QueueStore(engine)


class QueueStore(IngestRepo, UnitsRepo, ImportsRepo, TransfersRepo, AuditRepo, ReportsRepo, CommitmentsRepo, MppsRepo,
                 ArchiveRepo):
    """Repository over the queue DB; each public method is one unit of work (one transaction). The methods
    live by aggregate: ``store_ingest`` (instances), ``store_units`` (state moves, reading), ``store_imports``
    (the receiving side), ``store_transfers`` (attempts, peers), ``store_audit`` (audit log, status)."""


    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # study_instance_uid -> id of the unit last seen open for it: lets the hot path skip the lookup.
        # Only a hint: the fast path re-checks the unit's state in its UPDATE.
        self._open_unit_hint: dict[tuple[str, str | None], int] = {}
        # The associations' instance rows committed together (gateway.group_commit): one transaction, one fsync.
        # A constraint (another process's row for a UID) is one row's: the others then go again one by one.
        self.grow_commits: GroupCommit[dict[str, Any], bool] = GroupCommit(
            self._grow_units, per_item=lambda exc: isinstance(exc, IntegrityError))

    @contextmanager
    def _unit_of_work(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session
