"""The running totals behind the web page and /metrics (migration 0015's triggers and ``ReportsRepo``) equal what the
rows say, on SQLite and PostgreSQL: after every kind of move, after folding, with writers and folders at once, and
across the upgrade of a queue that already holds history."""

from __future__ import annotations

import threading
from datetime import timedelta

from alembic import command
from sqlalchemy import text

from gateway.lifecycle import State
from gateway.store import (
    QueueStore,
    alembic_config,
    make_engine,
    upgrade_schema,
    utcnow,
)
from tests.integration.test_queue import record

PEER = "radiology.hospital-a@helsenett.test"


def truth(store: QueueStore) -> tuple[dict[tuple[str, str], int], list[tuple[str, str, str, int, int, int]]]:
    """What the old scans over every row said: units per direction and state, ended and running attempts."""
    with store.engine.connect() as conn:
        units = {(d, s): int(c) for d, s, c in conn.execute(text(
            "SELECT CASE WHEN origin_peer IS NULL THEN 'out' ELSE 'in' END, state, COUNT(*) FROM study_units GROUP BY 1, 2"))}
        transfers = sorted((d, m or "none", o, int(c), int(b), int(w)) for d, m, o, c, b, w in conn.execute(text(
            "SELECT direction, method, outcome, COUNT(*), SUM(bytes_moved), SUM(COALESCE(wire_bytes, bytes_moved)) "
            "FROM transfers GROUP BY 1, 2, 3")))
    return units, transfers


def totals(store: QueueStore) -> tuple[dict[tuple[str, str], int], list[tuple[str, str, str, int, int, int]]]:
    rows = sorted((r["direction"], r["method"], r["outcome"], r["count"], r["bytes"], r["wire_bytes"])
                  for r in store.transfer_totals())
    return store.state_counts(), rows


def history(store: QueueStore, n: int = 3) -> None:
    """Every kind of move the queue makes: ingest, stable, routing, attempts (running, ended, re-closed), an inbound
    study verified and imported, a dropped unit."""
    for k in range(n):
        for i in range(1, 4):
            record(store, f"1.2.{k}.1.{i}", study=f"1.2.{k}")
    stable = store.mark_stable(0, now=utcnow() + timedelta(seconds=1))
    first, second = stable[0], stable[1]
    store.transition(first, State.QUEUED, "test")
    store.transition(first, State.OFFERING, "test")
    store.transition(first, State.SENDING, "test")
    store.record_transfer(first, "sid-2", PEER, "out", "ibb", 0, 0, utcnow(), "refused", "busy")
    running = store.open_transfer(first, "sid-1", PEER, "out", "s5b", 0)
    store.transfer_progress(running, 500)
    assert totals(store) == truth(store)  # a running attempt read live
    store.close_transfer(running, first, "sid-1", PEER, "out", "s5b", 0, 700, utcnow(), "interrupted", "stopped",
                         wire_bytes=300)
    store.record_transfer(first, "sid-3", PEER, "out", "", 0, 0, utcnow(), "held", "maintenance")
    assert store.close_as_received(first, "already received")  # the interrupted attempt becomes received
    store.transition(first, State.SENT, "test")
    store.transition(first, State.DELIVERED, "test")
    store.transition(second, State.QUEUED, "test")
    inbound = store.begin_receiving("9.8.7", PEER, 4000, 0, "s5b", "e" * 64)
    store.record_transfer(inbound, "sid-4", PEER, "in", "s5b", 0, 4000, utcnow(), "received", None)
    store.transition(inbound, State.RECEIVED, "verified")
    store.transition(inbound, State.IMPORTING, "test")
    store.transition(inbound, State.DELIVERED, "in the PACS")
    with store.engine.begin() as conn:  # an admin's drop of a unit (and its rows)
        conn.execute(text("DELETE FROM audit_log WHERE unit_id = :u"), {"u": second})
        conn.execute(text("DELETE FROM instances WHERE unit_id = :u"), {"u": second})
        conn.execute(text("DELETE FROM study_units WHERE id = :u"), {"u": second})


def test_totals_equal_the_rows_after_every_kind_of_move(store: QueueStore) -> None:
    history(store)
    assert totals(store) == truth(store)
    units, transfers = totals(store)
    assert units == {("out", "delivered"): 1, ("out", "stable"): 1, ("in", "delivered"): 1}  # the dropped unit is gone
    assert ("out", "s5b", "received", 1, 700, 300) in transfers  # re-closed: counted once, as received
    assert not [t for t in transfers if t[2] == "interrupted"]
    buckets, seconds = store.import_latency_histogram()
    assert sum(buckets.values()) == 1 and 0 <= seconds < 60  # the inbound study, from verified to delivered


def test_folding_keeps_the_totals_and_leaves_one_row_per_key(store: QueueStore) -> None:
    history(store)
    expected = totals(store)
    for kind in ("units", "transfers", "latency"):
        store.fold_tallies(kind)
    assert totals(store) == expected == truth(store)
    with store.engine.connect() as conn:
        keys = conn.execute(text("SELECT kind, key, COUNT(*) FROM tallies GROUP BY kind, key")).all()
    assert keys and all(count == 1 for _kind, _key, count in keys)


def test_writers_and_folders_at_once_count_every_move_once(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade_schema(engine)
    store = QueueStore(engine)
    store.FOLD_AT = 5  # every read folds
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            for i in range(1, 16):
                record(store, f"1.3.{k}.{i}.1", study=f"1.3.{k}.{i}")
                store.record_transfer(None, f"w{k}-{i}", PEER, "out", "s5b", 0, i, utcnow(), "refused", "busy")
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    def read() -> None:
        try:
            for _ in range(30):
                totals(store)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(3)] + [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert totals(store) == truth(store)
    assert store.state_counts()[("out", "received")] == 45
    engine.dispose()


def test_upgrading_a_queue_with_history_carries_its_totals(db_url: str) -> None:
    """The history is written at the newest schema, then the totals are taken away (down to 0014, the rows stay) and
    the upgrade must find them again from the rows."""
    engine = make_engine(db_url)
    config = alembic_config(db_url)
    upgrade_schema(engine)
    store = QueueStore(engine)
    for i in range(1, 4):
        record(store, f"1.4.{i}.1", study=f"1.4.{i}")
    (unit, *_rest) = store.mark_stable(0, now=utcnow() + timedelta(seconds=1))
    store.record_transfer(unit, "old-1", PEER, "out", "s5b", 0, 1234, utcnow(), "cut", "gone", wire_bytes=1000)
    inbound = store.begin_receiving("9.8.6", PEER, 10, 0, "ibb", "f" * 64)
    store.transition(inbound, State.RECEIVED, "verified")
    store.transition(inbound, State.IMPORTING, "test")
    store.transition(inbound, State.DELIVERED, "in the PACS")
    command.downgrade(config, "0014")
    upgrade_schema(engine)
    assert totals(store) == truth(store)
    assert store.state_counts() == {("out", "stable"): 3, ("in", "delivered"): 1}
    assert sum(store.import_latency_histogram()[0].values()) == 1
    record(store, "1.4.9.1", study="1.4.9")  # and the triggers go on from there
    assert store.state_counts()[("out", "received")] == 1
    engine.dispose()


def test_ingest_of_an_instance_adds_no_tally_per_instance(store: QueueStore) -> None:
    """The SCP's hot path: a unit's counters grow without a tally row (only a new unit or a state change adds one)."""
    record(store, "1.5.1.1", study="1.5")
    with store.engine.connect() as conn:
        before = conn.execute(text("SELECT COUNT(*) FROM tallies")).scalar()
    for i in range(2, 12):
        record(store, f"1.5.1.{i}", study="1.5")
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM tallies")).scalar() == before
