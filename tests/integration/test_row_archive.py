"""Retention of rows (issue 18 §3, ``[retention] keep_rows_days``): instance and transfer rows of units delivered
long ago (their spool files purged) move to the archive tables in batches; nothing else moves; `dicomgw queue
show`, the study page, `stats` and the running totals still answer for an archived study; a downgrade puts the
rows back. On SQLite and PostgreSQL; the CLI in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from alembic import command
from sqlalchemy import func, select, text, update

from gateway import dashboard
from gateway.model import InstanceHeader
from gateway.retention import RowArchiver
from gateway.rows import (
    InstanceArchiveRow,
    InstanceRow,
    StudyUnitRow,
    TransferArchiveRow,
    TransferRow,
)
from gateway.settings import SettingsError, load_settings
from gateway.stats import attempts
from gateway.store import (
    QueueStore,
    alembic_config,
    make_engine,
    upgrade_schema,
    utcnow,
)
from tests.helpers import REPO

PEER = "radiology.hospital-b@helsenett.test"


def fill(store: QueueStore, studies: int, instances: int = 3) -> list[int]:
    rows = [(InstanceHeader(f"1.7.{k}.{n}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", f"1.7.{k}", f"1.7.{k}.0",
                            patient_name="ARCHIVE^TEST", study_description="CT OLD", modality="CT", instance_number=n),
             f"studies/{k}/{n}.dcm", 100, f"{k:032x}{n:032x}", False) for k in range(studies) for n in range(instances)]
    units = sorted(set(store.record_instances(rows, source="test")))
    for unit in units:
        store.record_transfer(unit, f"sid-{unit}", f"{PEER}/gw1", "out", "s5b", 0, 300, utcnow(), "received", None)
    return units


def age(store: QueueStore, units: list[int], days: float, state: str = "delivered", purged: bool = True) -> None:
    when = utcnow() - timedelta(days=days)
    with store.engine.begin() as conn:
        conn.execute(update(StudyUnitRow).where(StudyUnitRow.id.in_(units)).values(
            state=state, state_changed_at=when, destination=PEER, purged_at=when if purged else None))


def rows_of(store: QueueStore, table: type, unit: int) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(table.unit_id == unit)).scalar() or 0)


def test_old_delivered_purged_units_move_and_still_answer(store: QueueStore, tmp_path: Path) -> None:
    old, young, unpurged, failed, live = fill(store, 5)
    age(store, [old], 40)
    age(store, [young], 10)
    age(store, [unpurged], 40, purged=False)
    age(store, [failed], 40, state="failed", purged=False)
    totals_before = (store.state_counts(), store.transfer_totals())
    show_before = store.study_units("1.7.0")
    archiver = RowArchiver(store, keep_rows_days=30, keep_delivered_s=7 * 86400)
    assert archiver.tick() == 1
    assert archiver.tick() == 0  # nothing left: idempotent
    assert (rows_of(store, InstanceRow, old), rows_of(store, TransferRow, old)) == (0, 0)
    assert (rows_of(store, InstanceArchiveRow, old), rows_of(store, TransferArchiveRow, old)) == (3, 1)
    for unit in (young, unpurged, failed, live):  # not old enough, files still in the spool, not delivered, live
        assert (rows_of(store, InstanceRow, unit), rows_of(store, TransferRow, unit)) == (3, 1)
    assert store.archived_counts() == (3, 1)
    # what an admin reads of the archived study is what it was, and says the rows are archived
    (summary, instances), = store.study_units("1.7.0")
    assert [i.sop_instance_uid for i in instances] == [i.sop_instance_uid for i in show_before[0][1]]
    assert summary.archived_at is not None and summary.modalities == "CT"
    assert [t["sid"] for t in store.transfers(old)] == [f"sid-{old}"]
    assert any(e["event"] == "archived" for e in store.audit_entries(limit=10, unit_id=old))
    page = dashboard.study(store, "1.7.0")
    assert page is not None and page["units"][0]["transfers"][0]["outcome"] == "received"
    assert len(attempts(store.engine, since=utcnow() - timedelta(days=1))) == 5  # stats counts the archived attempt
    assert (store.state_counts(), store.transfer_totals()) == totals_before  # the running totals do not move
    # the CLI, in its own process, on SQLite and PostgreSQL alike
    config = tmp_path / "gateway.toml"
    config.write_text(f'[paths]\nspool_dir = "spool"\nwatch_dir = ""\nquarantine_dir = "q"\n'
                      f'[queue]\ndb_url = "{store.engine.url.render_as_string(hide_password=False)}"\n')
    shown = subprocess.run([sys.executable, "-m", "gateway", "queue", "show", "1.7.0", "--json", "--config", str(config)],
                           cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert [i["sop_instance_uid"] for i in data["instances"]] == ["1.7.0.0", "1.7.0.1", "1.7.0.2"]
    assert data["units"][0]["archived_at"]
    plain = subprocess.run([sys.executable, "-m", "gateway", "queue", "show", "1.7.0", "--config", str(config)],
                           cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert plain.returncode == 0 and "rows archived" in plain.stdout, plain.stdout + plain.stderr


def test_rows_another_destination_still_sends_stay(store: QueueStore) -> None:
    (source,) = fill(store, 1)
    with store.engine.begin() as conn:  # a copy of the study for a second destination, not yet delivered there
        conn.execute(text("INSERT INTO study_units (study_instance_uid, unit_seq, state, patient_name, patient_id, "
                          "study_description, study_date, accession_number, instance_count, size_bytes, flags, "
                          "created_at, last_instance_at, state_changed_at, progress_bytes, bundle_bytes, attempts, "
                          "priority, instances_of) SELECT study_instance_uid, 2, 'queued', patient_name, patient_id, "
                          "study_description, study_date, accession_number, instance_count, size_bytes, flags, "
                          "created_at, last_instance_at, state_changed_at, 0, 0, 0, priority, id FROM study_units "
                          "WHERE id = :id"), {"id": source})
        copy = conn.execute(text("SELECT id FROM study_units WHERE instances_of = :id"), {"id": source}).scalar()
    age(store, [source], 40)
    assert RowArchiver(store, 30, 7 * 86400).tick() == 0
    assert rows_of(store, InstanceRow, source) == 3  # the copy still sends these files
    age(store, [copy], 40)
    assert RowArchiver(store, 30, 7 * 86400).tick() == 2
    assert rows_of(store, InstanceArchiveRow, source) == 3
    assert len(store.study_units("1.7.0")[1][1]) == 3  # the copy's instances read from the archive


def test_batches_take_every_unit_and_a_downgrade_puts_the_rows_back(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade_schema(engine)
    store = QueueStore(engine)
    units = fill(store, 250, instances=2)
    age(store, units, 400)
    assert store.archive_rows(utcnow() - timedelta(days=365), batch=100) == units[:100]  # oldest first, one batch
    assert RowArchiver(store, 365, 7 * 86400, batch=100).tick() == 150
    assert store.archived_counts() == (500, 250) and store.count_instances() == 0
    command.downgrade(alembic_config(db_url), "0015")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM instances")).scalar() == 500
        assert conn.execute(text("SELECT COUNT(*) FROM transfers")).scalar() == 250
    upgrade_schema(engine)
    engine.dispose()


def test_keep_rows_days_is_read_and_checked(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    base = '[paths]\nspool_dir = "spool"\nwatch_dir = ""\nquarantine_dir = "q"\n[retention]\n'
    config.write_text(base + "keep_rows_days = 365\n")
    assert load_settings(config).retention.keep_rows_days == 365
    config.write_text(base)
    assert load_settings(config).retention.keep_rows_days == 0  # off unless asked
    for bad, said in (("-1", "below"), ('"a year"', "not a number"), ("nan", "not a number")):
        config.write_text(base + f"keep_rows_days = {bad}\n")
        try:
            load_settings(config)
        except SettingsError as error:
            assert "retention.keep_rows_days" in str(error) and said in str(error)
        else:
            raise AssertionError(f"keep_rows_days = {bad} was accepted")


def test_a_writer_waiting_for_the_queue_gets_its_turn_between_two_batches(db_url: str) -> None:
    """The SCP's instance writes, one every few milliseconds while the retention archives: each commits after the
    batch it came during, or the next, never after a run of batches (SQLite: its busy handler sleeps up to 100 ms
    between tries, and batches run back to back took the lock again before it woke: 0.8-1.2 s waits in
    bench/queue_scale; the archiver pauses between batches)."""
    import threading
    import time

    engine = make_engine(db_url)
    upgrade_schema(engine)
    store = QueueStore(engine)
    age(store, fill(store, 3000, instances=1), 400)
    batches_begun = [0]
    archiving = threading.Event()
    spans: list[int] = []  # per write: the batches begun while it waited
    archive_rows = store.archive_rows

    def batch(*args: object, **kwargs: object) -> list[int]:
        batches_begun[0] += 1
        return archive_rows(*args, **kwargs)  # type: ignore[arg-type]

    def writes() -> None:
        for n in range(100_000):  # bounded; ends with the tick
            if not archiving.is_set():
                return
            before = batches_begun[0]
            store.record_instance(InstanceHeader(f"1.8.0.{n}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "1.8",
                                                 "1.8.0", modality="CT"), spool_path=f"studies/new/{n}.dcm",
                                  size_bytes=100, sha256=f"{n:064x}", source="scp:CT01", conflict=False)
            spans.append(batches_begun[0] - before)
            time.sleep(0.005)

    store.archive_rows = batch  # type: ignore[method-assign]
    archiving.set()
    writer = threading.Thread(target=writes)
    writer.start()
    try:
        assert RowArchiver(store, 365, 7 * 86400, batch=100, budget_s=600).tick() == 3000
    finally:
        archiving.clear()
        writer.join(60)
    assert batches_begun[0] == 31 and spans  # thirty full batches, and the one that found nothing left
    assert max(spans) <= 3, sorted(spans)[-10:]
    engine.dispose()
