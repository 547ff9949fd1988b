"""The queue repository and the Alembic migrations against a real database (SQLite file; PostgreSQL too
when GATEWAY_TEST_PG_URL is set, which .ci/run does)."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from alembic import command
from sqlalchemy import event, inspect, text

from gateway.lifecycle import IllegalTransition, State
from gateway.model import InstanceHeader
from gateway.store import (
    SCHEMA_HEAD,
    QueueStore,
    alembic_config,
    make_engine,
    schema_revision,
    upgrade_schema,
    utcnow,
)


def header(sop: str, study: str = "1.2.3", series: str = "1.2.3.1", modality: str = "CT") -> InstanceHeader:
    return InstanceHeader(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        study_instance_uid=study,
        series_instance_uid=series,
        patient_name="DOE^JANE",
        study_description="CT HEAD",
        modality=modality,
        series_number=1,
        instance_number=int(sop.rsplit(".", 1)[-1]),
    )


def record(store: QueueStore, sop: str, sha: str = "", study: str = "1.2.3", conflict: bool = False) -> int:
    return store.record_instance(
        header(sop, study), spool_path=f"studies/{study}/{sop}.dcm", size_bytes=1000, sha256=sha or sop.ljust(64, "0"),
        source="test", conflict=conflict,
    )


def test_instances_of_one_study_share_a_unit_with_counts(store: QueueStore) -> None:
    unit_ids = {record(store, f"1.2.3.1.{i}") for i in range(1, 6)}
    assert len(unit_ids) == 1
    (summary,) = store.studies()
    assert (summary.instances, summary.size_bytes, summary.state, summary.modalities) == (5, 5000, "received", "CT")
    assert summary.patient_name == "DOE^JANE"
    assert [e["event"] for e in store.audit_entries()] == ["created"]


def test_stable_after_quiet_period_with_audit(store: QueueStore) -> None:
    unit_id = record(store, "1.2.3.1.1")
    assert store.mark_stable(stable_age_s=60) == []
    assert store.mark_stable(stable_age_s=60, now=utcnow() + timedelta(seconds=61)) == [unit_id]
    assert store.studies()[0].state == "stable"
    move = store.audit_entries(limit=1)[0]
    assert (move["event"], move["from_state"], move["to_state"]) == ("transition", "received", "stable")


def test_late_instance_after_stable_opens_a_follow_up_unit(store: QueueStore) -> None:
    first = record(store, "1.2.3.1.1")
    store.mark_stable(0, now=utcnow() + timedelta(seconds=1))
    second = record(store, "1.2.3.1.2")
    assert second != first
    units = store.study_units("1.2.3")
    assert [(s.unit_seq, s.state, s.instances) for s, _ in units] == [(1, "stable", 1), (2, "received", 1)]
    assert "follow-up unit 2" in store.audit_entries(limit=1, unit_id=second)[0]["detail"]


def test_illegal_move_raises_and_changes_nothing(store: QueueStore) -> None:
    unit_id = record(store, "1.2.3.1.1")
    with pytest.raises(IllegalTransition):
        store.transition(unit_id, State.DELIVERED)
    assert store.studies()[0].state == "received"
    store.transition(unit_id, State.STABLE, "test")
    store.transition(unit_id, State.QUEUED, "test")
    assert store.studies()[0].state == "queued"


def test_conflicting_copy_flags_the_unit(store: QueueStore) -> None:
    record(store, "1.2.3.1.1", sha="a" * 64)
    record(store, "1.2.3.1.1", sha="b" * 64, conflict=True)
    assert sorted(sha for sha, _ in store.instance_hashes("1.2.3.1.1")) == ["a" * 64, "b" * 64]
    (summary,) = store.studies()
    assert summary.flags == "conflict" and summary.instances == 2


def test_same_bytes_twice_is_refused_by_the_schema(store: QueueStore) -> None:
    from gateway.store import DuplicateInstance

    record(store, "1.2.3.1.1", sha="a" * 64)
    with pytest.raises(DuplicateInstance):
        record(store, "1.2.3.1.1", sha="a" * 64)
    assert store.count_instances() == 1


def test_state_filter(store: QueueStore) -> None:
    record(store, "1.2.3.1.1", study="1.2.3")
    record(store, "1.2.4.1.1", study="1.2.4")
    store.mark_stable(0, now=utcnow() + timedelta(seconds=1))
    record(store, "1.2.5.1.1", study="1.2.5")
    assert [s.study_instance_uid for s in store.studies(state="stable")] == ["1.2.3", "1.2.4"]
    assert [s.study_instance_uid for s in store.studies(state="received")] == ["1.2.5"]


def test_migrations_upgrade_empty_db_and_reverse_one_step(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade_schema(engine)
        tables = set(inspect(engine).get_table_names())
        assert {"study_units", "instances", "audit_log", "peers", "transfers", "alembic_version"} <= tables
        QueueStore(engine).record_instance(
            header("1.2.3.1.1"), spool_path="x", size_bytes=1, sha256="c" * 64, source="test", conflict=False
        )
        config = alembic_config(db_url)
        units = {c["name"] for c in inspect(engine).get_columns("study_units")}
        assert {"priority", "rule", "instances_of"} <= units
        assert {"destinations", "max_concurrent", "directions", "schedule"} <= {c["name"] for c in inspect(engine).get_columns("peers")}
        long_source = "folder:" + "x" * 300
        QueueStore(engine).record_instance(
            header("1.2.3.1.2"), spool_path="y", size_bytes=1, sha256="d" * 64, source=long_source, conflict=False
        )
        assert "peer_signing" in tables
        QueueStore(engine).note_signing("radiology.hospital-a@helsenett.test", "e" * 64)
        QueueStore(engine).note_signing("radiology.hospital-a@helsenett.test", "f" * 64)  # the peer's next offer
        assert QueueStore(engine).signing_pins() == {"radiology.hospital-a@helsenett.test": "f" * 64}
        command.downgrade(config, "-1")  # 0017 -> 0016: which of our keys each peer pins goes
        assert "peer_signing" not in set(inspect(engine).get_table_names())
        command.downgrade(config, "-1")  # 0016 -> 0015: the archive tables and archived_at go
        assert not {"instances_archive", "transfers_archive"} & set(inspect(engine).get_table_names())
        assert "archived_at" not in {c["name"] for c in inspect(engine).get_columns("study_units")}
        command.downgrade(config, "-1")  # 0015 -> 0014: the running totals and their triggers go, writes go on
        assert "tallies" not in set(inspect(engine).get_table_names())
        with engine.begin() as conn:  # no trigger is left behind to write into the dropped table
            conn.execute(text("UPDATE study_units SET state = 'stable'"))
        command.downgrade(config, "-1")  # 0014 -> 0013: the owner index goes
        assert "ix_study_units_owner" not in {i["name"] for i in inspect(engine).get_indexes("study_units")}
        command.downgrade(config, "-1")  # 0013 -> 0012: the MPPS steps table goes
        assert "mpps_steps" not in set(inspect(engine).get_table_names())
        command.downgrade(config, "-1")  # 0012 -> 0011: the commitment requests table goes
        assert "commitment_requests" not in set(inspect(engine).get_table_names())
        command.downgrade(config, "-1")  # 0011 -> 0010: a pin holds one fingerprint again
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0010"
        command.downgrade(config, "-1")  # 0010 -> 0009: the wire bytes column goes
        assert "wire_bytes" not in {c["name"] for c in inspect(engine).get_columns("transfers")}
        command.downgrade(config, "-1")  # 0009 -> 0008: the source column is 80 characters again (clipped)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0008"
        command.downgrade(config, "-1")  # 0008 -> 0007: routing, priority and per-peer settings go, the rows stay
        assert not {"priority", "rule", "instances_of"} & {c["name"] for c in inspect(engine).get_columns("study_units")}
        assert "schedule" not in {c["name"] for c in inspect(engine).get_columns("peers")}
        assert "stream_claims" in tables and "owner" in {c["name"] for c in inspect(engine).get_columns("study_units")}
        command.downgrade(config, "-1")  # 0007 -> 0006: claims and leases go
        assert "stream_claims" not in set(inspect(engine).get_table_names())
        assert "lease_until" not in {c["name"] for c in inspect(engine).get_columns("study_units")}
        assert "runtime_status" in tables and "fingerprint" in {c["name"] for c in inspect(engine).get_columns("peers")}
        command.downgrade(config, "-1")  # 0006 -> 0005: pins, the status table and the audit repeat count go
        assert "runtime_status" not in set(inspect(engine).get_table_names())
        assert "fingerprint" not in {c["name"] for c in inspect(engine).get_columns("peers")}
        assert "repeat_count" not in {c["name"] for c in inspect(engine).get_columns("audit_log")}
        command.downgrade(config, "-1")  # 0005 -> 0004: the PACS import and receipt columns go
        assert "pacs_status" not in {c["name"] for c in inspect(engine).get_columns("instances")}
        assert "bundle_sha256" not in {c["name"] for c in inspect(engine).get_columns("study_units")}
        command.downgrade(config, "-1")  # 0004 -> 0003
        assert "stream_s" not in {c["name"] for c in inspect(engine).get_columns("transfers")}
        command.downgrade(config, "-1")  # 0003 -> 0002: the transfer columns go, the rows stay
        columns = {c["name"] for c in inspect(engine).get_columns("study_units")}
        assert "origin_peer" not in columns and "state" in columns
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"
        command.downgrade(config, "-1")  # 0002 -> 0001: peers and transfers go
        tables = set(inspect(engine).get_table_names())
        assert "peers" not in tables and "transfers" not in tables and "instances" in tables
        command.upgrade(config, "head")
        assert {"peers", "transfers"} <= set(inspect(engine).get_table_names())
        assert {"origin_peer", "receipt_at", "purged_at"} <= {c["name"] for c in inspect(engine).get_columns("study_units")}
        assert QueueStore(engine).count_instances() == 2  # data survived the round trip
    finally:
        engine.dispose()


def test_the_schema_head_is_alembics_and_an_older_database_is_still_brought_to_it(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database at SCHEMA_HEAD opens without Alembic (the CLI's start); one a revision behind, or new, is
    upgraded as before."""
    from alembic.script import ScriptDirectory

    import gateway.store as store_module

    config = alembic_config(db_url)
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_HEAD
    engine = make_engine(db_url)
    try:
        assert schema_revision(engine) is None
        upgrade_schema(engine)
        assert schema_revision(engine) == SCHEMA_HEAD
        command.downgrade(config, "-1")
        assert schema_revision(engine) != SCHEMA_HEAD
        upgrade_schema(engine)  # a gateway started on a database of the release before
        assert schema_revision(engine) == SCHEMA_HEAD
        assert "peer_signing" in set(inspect(engine).get_table_names())

        def no_alembic(*_args: object) -> None:
            raise AssertionError("Alembic loaded for a database at head")

        monkeypatch.setattr(store_module, "alembic_config", no_alembic)
        store_module.open_store(db_url).engine.dispose()
    finally:
        engine.dispose()


def test_the_last_transfers_are_the_newest_read_as_such_and_shown_oldest_first(store: QueueStore) -> None:
    """``dicomgw audit --transfers --limit N``: the newest N attempts, oldest of them first, by one limited query."""
    start = utcnow() - timedelta(hours=1)
    for n in (3, 1, 4, 0, 2):  # written out of time order
        store.record_transfer(None, f"sid-{n}", "radiology.hospital-b@net.test", "out", "s5b", 0, n,
                              start + timedelta(minutes=n), "received", None)
    assert [t["sid"] for t in store.transfers(last=3)] == ["sid-2", "sid-3", "sid-4"]
    assert [t["sid"] for t in store.transfers()] == [f"sid-{n}" for n in range(5)]
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    store.transfers(last=2)
    (query,) = [q for q in statements if "FROM transfers" in q]
    assert "LIMIT" in query.upper(), query


def test_two_bundles_of_one_study_received_at_once_get_a_unit_each(store: QueueStore) -> None:
    """Two units of one study (a late series, sent by another process) arriving at once: one receiving unit per
    bundle, distinct unit_seq, never an IntegrityError; a cut bundle offered again resumes its own unit."""
    import threading

    peer = "radiology.hospital-a@net.test"
    bundles = [f"{n:02x}" * 32 for n in range(8)]
    got: dict[str, int] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(bundles))

    def receive(bundle: str) -> None:
        start.wait()
        try:
            got[bundle] = store.begin_receiving("1.2.3", peer, 1000, 0, "s5b", bundle)
        except BaseException as exc:  # noqa: BLE001 - any error is the failure this test looks for
            errors.append(exc)

    threads = [threading.Thread(target=receive, args=(b,)) for b in bundles]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(set(got.values())) == len(bundles)
    seqs = sorted(u.unit_seq for u, _rows in store.study_units("1.2.3"))
    assert seqs == list(range(1, len(bundles) + 1))
    assert store.begin_receiving("1.2.3", peer, 1000, 500, "ibb", bundles[3]) == got[bundles[3]]  # resumed, same unit


def test_a_verified_bundle_is_received_with_its_rows_or_not_at_all(store: QueueStore) -> None:
    """The receiving unit moves to ``received`` in the transaction that records its instance rows: when the rows
    cannot be written the unit is still ``receiving`` (never ``received`` without its instances), and when they
    are, both are there, audited once."""
    peer = "radiology.hospital-a@net.test"
    unit = store.begin_receiving("1.2.9", peer, 2000, 0, "s5b", "ab" * 32)
    rows = [(header("1.2.9.1", study="1.2.9"), "s/1.dcm", 1000, "c" * 64, False),
            (header("1.2.9.1", study="1.2.9"), "s/1b.dcm", 1000, "c" * 64, False)]  # the same UID and bytes twice
    with pytest.raises(Exception):  # noqa: B017 - the database's unique (UID, SHA-256), whatever the driver calls it
        store.record_instances(rows, "xmpp:a", peer, received=(unit, "bundle verified (2000 bytes over s5b)", 2000))
    assert store.unit(unit).state == State.RECEIVING.value
    assert store.unit_instances(unit) == []
    store.record_instances(rows[:1], "xmpp:a", peer, received=(unit, "bundle verified (2000 bytes over s5b)", 2000))
    assert store.unit(unit).state == State.RECEIVED.value and store.unit(unit).progress_bytes == 2000
    assert [i.sop_instance_uid for i in store.unit_instances(unit)] == ["1.2.9.1"]
    moves = [(e["from_state"], e["to_state"]) for e in store.audit_entries(unit_id=unit)]
    assert moves == [("receiving", "received"), (None, "receiving")]  # newest first: the failed write left none


@pytest.mark.parametrize("field", ["study_description", "patient_name", "accession_number", "patient_id", "nul"])
def test_what_a_modality_sends_is_indexed_the_same_on_both_databases(store: QueueStore, field: str) -> None:
    """Values SQLite would store and PostgreSQL refused for ever (varchar, NUL): stored, clipped, NUL gone."""
    from dataclasses import replace

    values = {"study_description": "D" * 65, "patient_name": "P^" * 200, "accession_number": "A" * 17,
              "patient_id": "I" * 80, "nul": "DOE\x00^JANE"}
    target = "patient_name" if field == "nul" else field
    unit_id = store.record_instance(
        replace(header("1.2.3.5.1"), **{target: values[field]}), spool_path="s", size_bytes=1, sha256="e" * 64,
        source="folder:" + "deep/" * 40 + "x.dcm", conflict=False)
    with store._engine.connect() as conn:
        shown = conn.execute(text(f"SELECT {target} FROM study_units WHERE id = :id"), {"id": unit_id}).scalar()
    limits = {"study_description": 64, "patient_name": 324, "accession_number": 16, "patient_id": 64}
    if field == "nul":
        assert shown == "DOE^JANE"
    else:
        assert shown == values[field][:limits[field]]


def test_a_backlog_turns_stable_in_batches_each_unit_audited_once(store: QueueStore) -> None:
    """1,200 received units past their stable age (more than two batches): every one stable, one audit row each;
    a unit that got an instance after the cutoff stays received."""
    from bench.stable import fill

    fill(store, 1200, "2.25.77")
    moved = store.mark_stable(0.0, now=utcnow() + timedelta(seconds=1), batch=500)
    assert len(moved) == len(set(moved)) == 1200
    assert {s.state for s in store.studies()} == {"stable"}
    with store._engine.connect() as conn:
        rows = conn.execute(text("SELECT count(*) FROM audit_log WHERE event = 'transition' AND to_state = 'stable'")).scalar()
    assert rows == 1200
    record(store, "1.2.3.9.1", study="1.2.3.9")
    assert store.mark_stable(3600.0) == []  # too young: stays received


def test_which_of_our_keys_a_peer_pins_is_known_to_every_process_of_the_site(store: QueueStore) -> None:
    """An offer to one process names the identity of ours the peer pins; another process (PostgreSQL) sends the
    receipt of that study, or this one after a restart: both read it from the queue."""
    from gateway.directory import PeerDirectory

    peer, pinned = "radiology.hospital-a@helsenett.test", "ab" * 32
    one, other = (PeerDirectory(store.peer_configs, read_signing=store.signing_pins) for _ in range(2))
    one.refresh()
    other.refresh()
    assert one.note_signing(peer, pinned)  # news: the caller writes it
    assert one.signing(peer) == pinned and other.signing(peer) is None  # before the write is read back
    store.note_signing(peer, pinned)
    other.refresh()
    restarted = PeerDirectory(store.peer_configs, read_signing=store.signing_pins)
    restarted.refresh()
    assert other.signing(peer) == pinned and restarted.signing(peer) == pinned
    one.refresh()
    assert not one.note_signing(peer, pinned)  # the table says so already: no write


def _hold_first_grow(store: QueueStore, queued: int) -> threading.Event:
    """The first batch of instance rows waits in its first statement until ``queued`` more rows wait behind it
    (a commit still on its way to the disk while other associations' instances come); returns when it runs."""
    running = threading.Event()

    def before(conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE STUDY_UNITS") and not running.is_set():
            running.set()
            for _ in range(6000):  # bounded: 30 s
                if store.grow_commits.waiting >= queued:
                    return
                threading.Event().wait(0.005)

    event.listen(store.engine, "before_cursor_execute", before)
    return running


def _record_in_threads(store: QueueStore, sops: list[str], sha: dict[str, str] | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def run(sop: str) -> None:
        try:
            results[sop] = record(store, sop, sha=(sha or {}).get(sop, ""))
        except Exception as exc:  # the thread's own answer, read by the test
            results[sop] = exc

    threads = [threading.Thread(target=run, args=(sop,)) for sop in sops]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_instances_of_several_associations_at_once_commit_together_each_counted_once(store: QueueStore) -> None:
    """Four associations' instances that come while one commit runs go in one transaction behind it (one
    commit, one fsync), each answered with its unit, every row there and counted once."""
    unit_id = record(store, "1.2.3.1.1")  # the study's unit is open: the next instances take the fast path
    batches = store.grow_commits.batches
    running = _hold_first_grow(store, queued=3)
    sops = [f"1.2.3.1.{i}" for i in range(2, 6)]
    first = threading.Thread(target=record, args=(store, sops[0]))
    first.start()
    assert running.wait(30)
    results = _record_in_threads(store, sops[1:])
    first.join(60)
    assert results == {sop: unit_id for sop in sops[1:]}
    assert store.grow_commits.batches - batches == 2  # the held one, then the three together
    (summary,) = store.studies()
    assert (summary.instances, summary.size_bytes) == (5, 5000)
    assert store.count_instances() == 5


def test_a_duplicate_among_instances_committed_together_is_refused_alone(store: QueueStore, db_url: str) -> None:
    """Another process recorded one UID's bytes first: the batch that meets its constraint is rolled back and its
    rows go again one by one, so only that instance is a duplicate; the others are stored and counted once."""
    from gateway.store import DuplicateInstance

    unit_id = record(store, "1.2.3.1.1")
    other = QueueStore(make_engine(db_url))  # a second process of the site on the same queue
    try:
        record(other, "1.2.3.1.3", sha="c" * 64)
    finally:
        other.engine.dispose()
    running = _hold_first_grow(store, queued=3)
    first = threading.Thread(target=record, args=(store, "1.2.3.1.2"))
    first.start()
    assert running.wait(30)
    results = _record_in_threads(store, ["1.2.3.1.3", "1.2.3.1.4", "1.2.3.1.5"], sha={"1.2.3.1.3": "c" * 64})
    first.join(60)
    assert isinstance(results.pop("1.2.3.1.3"), DuplicateInstance)
    assert results == {"1.2.3.1.4": unit_id, "1.2.3.1.5": unit_id}
    (summary,) = store.studies()  # 1.1, 1.2, 1.4 and 1.5 of this process, 1.3 of the other: each once
    assert (summary.instances, summary.size_bytes) == (5, 5000) and store.count_instances() == 5
