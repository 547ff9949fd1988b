"""gateway.outage: a database outage said once when it begins and once when it ends, from any loop."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from gateway.outage import DatabaseOutage, comment, kind, said, unreachable


def test_an_outage_is_said_once_at_its_start_and_once_at_its_end_other_errors_each_time(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    outage = DatabaseOutage(clock=lambda: now[0])
    down = OperationalError("SELECT 1", {}, Exception("connection refused"))
    caplog.set_level(logging.WARNING, logger="gateway.outage")
    outage.answered()  # nothing to end
    for where in ("tick", "lease heartbeat", "tick", "dispatch tick"):
        outage.failed(where, down)
    assert outage.down and outage.failures == 4
    now[0] = 112.0
    outage.answered()
    outage.answered()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("queue database unreachable (tick: connection refused)") and "A700" in lines[0]
    assert lines[1] == "queue database answers again after 12 s (4 failed attempts); the gateway goes on"
    assert not outage.down and unreachable(down) and not unreachable(ValueError("a bug"))
    caplog.clear()
    outage.failed("tick", ValueError("a bug"))
    outage.failed("tick", ValueError("a bug"))
    assert [r.exc_info is not None for r in caplog.records] == [True, True] and not outage.down


def _sqlite_error(tmp_path: Path, read_only: bool) -> Exception:
    """What SQLite itself raises through SQLAlchemy for a write when its disk is full (``max_page_count``
    reached: SQLITE_FULL, as a full file system gives) or when the database is opened read-only."""
    from sqlalchemy import create_engine, text

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "queue.db"
    with create_engine(f"sqlite:///{path}").begin() as conn:
        conn.execute(text("CREATE TABLE t (b BLOB)"))
    url = f"sqlite:///file:{path}?mode=ro&uri=true" if read_only else f"sqlite:///{path}"
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            if not read_only:
                pages = conn.execute(text("PRAGMA page_count")).scalar()
                conn.execute(text(f"PRAGMA max_page_count = {pages}"))
            conn.execute(text("INSERT INTO t VALUES (zeroblob(100000))"))
    except Exception as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("SQLite took the write")


def test_a_database_that_answers_but_takes_no_writes_is_said_as_such_and_over_only_at_a_write(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A full disk or a read-only database (SQLite's own errors; PostgreSQL's disk_full and a standby's
    read_only_sql_transaction, which psycopg raises as an InternalError) is 'cannot be written', not
    'unreachable'; the reads that still succeed do not end it (they did: 'answers again after 0 s' every
    heartbeat), a write does, said once; a change of kind within it is said once."""
    import psycopg.errors
    from sqlalchemy.exc import InternalError

    full, read_only = _sqlite_error(tmp_path / "a", False), _sqlite_error(tmp_path / "b", True)
    standby = InternalError("UPDATE x", {}, psycopg.errors.ReadOnlySqlTransaction("cannot execute UPDATE in a read-only transaction"))
    pg_full = OperationalError("INSERT", {}, psycopg.errors.DiskFull("could not extend file"))
    assert [kind(e) for e in (full, read_only, standby, pg_full)] == ["full", "read-only", "read-only", "full"]
    assert kind(OperationalError("SELECT 1", {}, Exception("connection refused"))) == "unreachable"
    assert kind(InternalError("x", {}, Exception("a bug"))) is None and kind(ValueError("a bug")) is None
    assert said(full) == "the queue database cannot be written: its disk is full" and comment(standby) == "gateway queue database read-only"
    assert all(len(comment(e)) <= 64 for e in (full, read_only, standby))  # a DICOM Error Comment (LO)

    now = [100.0]
    outage = DatabaseOutage(clock=lambda: now[0], wall=lambda: 1_790_000_000.0)
    caplog.set_level(logging.WARNING, logger="gateway.outage")
    outage.failed("process heartbeat", full)
    for _ in range(5):  # the main tick's reads go on succeeding; the heartbeat's writes fail
        outage.answered(wrote=False)
        outage.failed("process heartbeat", full)
    outage.failed("the gateway's tick", OperationalError("SELECT 1", {}, Exception("disk I/O error")))
    outage.failed("process heartbeat", full)
    outage.answered(wrote=False)
    assert outage.down and outage.state() == {"kind": "full", "said": "the queue database cannot be written: its disk is full",
                                              "reason": "database or disk is full", "since": 1_790_000_000.0}
    now[0] = 125.0
    outage.answered()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("queue database cannot be written: its disk is full (process heartbeat: database or "
                               "disk is full): instances are refused with Out of Resources (A700)"), lines[0]
    assert lines[1].startswith("queue database unreachable (the gateway's tick: disk I/O error)"), lines[1]
    assert lines[2] == "queue database takes writes again after 25 s (8 failed attempts); the gateway goes on"
    assert not outage.down and outage.state() is None
