"""Claims and leases on a real database (SQLite file and PostgreSQL): several processes on one queue never
offer, import or receive the same thing at once, and the claims of a process that died are taken over."""

from __future__ import annotations

import threading
import time

from gateway.claims import Claims
from gateway.lifecycle import State
from gateway.store import QueueStore
from tests.helpers import wait_for
from tests.integration.test_queue import record


class HeldRelease(Claims):
    """Claims whose release waits for the test's go (``gate``): ``releasing`` when one began, ``released``
    when it ended."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.releasing, self.gate, self.released = threading.Event(), threading.Event(), threading.Event()

    def release(self, unit_id: int) -> None:
        self.releasing.set()
        self.gate.wait(30)
        super().release(unit_id)
        self.released.set()


def owner_of(store: QueueStore, unit_id: int) -> str | None:
    from sqlalchemy import select

    from gateway.rows import StudyUnitRow
    with store.engine.connect() as conn:
        return conn.execute(select(StudyUnitRow.owner).where(StudyUnitRow.id == unit_id)).scalar_one()


def queued_units(store: QueueStore, count: int) -> list[int]:
    ids = []
    for n in range(count):
        unit = record(store, f"1.2.{n + 1}.1", study=f"1.2.{n + 1}")
        store.transition(unit, State.STABLE)
        store.transition(unit, State.QUEUED, destination="b@x")
        ids.append(unit)
    return ids


def test_concurrent_claimers_never_take_the_same_unit(store: QueueStore) -> None:
    ids = queued_units(store, 30)
    owners = [Claims(store.engine, owner=f"proc-{n}", lease_s=60) for n in range(3)]
    taken: dict[str, list[int]] = {c.owner: [] for c in owners}

    def work(claims: Claims) -> None:  # what each process's dispatcher does: claim one, offer it
        for _ in range(100):
            got = claims.claim_due(store.due_for_sending_where(), 1)
            if not got:
                return
            taken[claims.owner].extend(got)
            store.transition(got[0], State.OFFERING)
            time.sleep(0.01)  # the offer itself: the other claimers run meanwhile

    threads = [threading.Thread(target=work, args=(c,)) for c in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = sorted(i for got in taken.values() for i in got)
    assert every == ids  # each unit claimed exactly once, none left
    if store.engine.dialect.name == "postgresql":  # (SQLite's one writer may let one thread win every round)
        assert sum(1 for got in taken.values() if got) >= 2  # the claimers really competed


def test_a_held_claim_is_skipped_until_its_lease_lapses(store: QueueStore) -> None:
    (unit,) = queued_units(store, 1)
    first = Claims(store.engine, owner="host-a:1:x", lease_s=1.0, owner_gone=lambda _o: False)
    second = Claims(store.engine, owner="host-b:2:y", lease_s=1.0, owner_gone=lambda _o: False)
    assert first.claim_due(store.due_for_sending_where()) == [unit]
    assert second.claim_due(store.due_for_sending_where()) == []
    assert not second.claim(unit)
    first.heartbeat()  # the owner renews: still held
    assert not second.claim(unit)
    # The owner stops renewing (it was killed): the claim is free once its 1 s lease has run out.
    wait_for(lambda: second.claim(unit), 10, 0.05, what="the lapsed claim to be taken over")
    assert not first.claim(unit)


def test_a_dead_owner_on_this_host_frees_its_claims_at_once(store: QueueStore) -> None:
    (unit,) = queued_units(store, 1)
    dead = Claims(store.engine, owner="thishost:999999:dead", lease_s=600)
    assert dead.claim(unit)
    alive = Claims(store.engine, owner="thishost:1:new", lease_s=600, owner_gone=lambda o: o == dead.owner)
    assert alive.claim(unit)


def test_recovery_takes_only_units_whose_claim_lapsed(store: QueueStore) -> None:
    mine, theirs = queued_units(store, 2)
    other = Claims(store.engine, owner="host-b:2:y", lease_s=600, owner_gone=lambda _o: False)
    gone = Claims(store.engine, owner="host-c:3:z", lease_s=600, owner_gone=lambda _o: False)
    for claims, unit in ((other, theirs), (gone, mine)):
        assert claims.claim(unit)
        store.transition(unit, State.OFFERING)
        store.transition(unit, State.SENDING)
    row = store.open_transfer(mine, "sid-1", "b@x/gw", "out", "s5b", 0)
    store.transfer_progress(row, 150_000_000)
    me = Claims(store.engine, owner="host-a:1:x", lease_s=600, owner_gone=lambda o: o == gone.owner)
    assert me.claim(theirs) is False
    moved = store.recover_in_flight(me.lapsed())
    assert moved == [(mine, "sending", "queued")]
    assert store.recover_in_flight(other.lapsed()) == []  # a process never recovers what it works on itself
    assert store.unit(theirs).state == "sending"  # its owner is alive and renews: not touched
    (attempt,) = store.transfers(mine)
    assert (attempt["outcome"], attempt["bytes"]) == ("interrupted", 150_000_000)  # what moved before the crash


def test_one_stream_per_bundle_across_processes(store: QueueStore) -> None:
    bundle = "ab" * 32
    a = Claims(store.engine, owner="host-a:1:x", lease_s=600, owner_gone=lambda _o: False)
    b = Claims(store.engine, owner="host-b:2:y", lease_s=600, owner_gone=lambda _o: False)
    assert a.claim_stream(bundle, "s@x") is None
    assert a.claim_stream(bundle, "s@x") is None  # the same process: a fallback offer supersedes its first
    assert b.claim_stream(bundle, "s@x") == a.owner
    a.release_stream(bundle)
    assert b.claim_stream(bundle, "s@x") == a.owner  # one of a's two streams still runs
    a.release_stream(bundle)
    assert b.claim_stream(bundle, "s@x") is None


def test_a_stream_claimed_while_this_process_releases_its_last_one_is_claimed(store: QueueStore) -> None:
    """A sender's fallback offer (S5B failed, IBB next) may reach the receiver while the failed stream's claim is
    being released. CI saw it refused as "being received on another stream": the claim came between the
    release's last reference and its row's delete, and found this process's own row."""
    from sqlalchemy import select

    from gateway.rows import StreamClaimRow

    bundle = "cd" * 32
    claims = Claims(store.engine, owner="host-a:1:x", lease_s=600, owner_gone=lambda _o: False)
    assert claims.claim_stream(bundle, "s@x") is None
    deleting, go = threading.Event(), threading.Event()
    drop = claims._drop_stream_row

    def slow_drop(bundle_sha256: str) -> None:  # the release between its last reference and its row's delete
        deleting.set()
        go.wait(10)
        drop(bundle_sha256)

    claims._drop_stream_row = slow_drop  # type: ignore[method-assign]
    releasing = threading.Thread(target=claims.release_stream, args=(bundle,))
    releasing.start()
    try:
        assert deleting.wait(10)
        threading.Timer(0.3, go.set).start()
        assert claims.claim_stream(bundle, "s@x") is None  # the fallback's claim: this process holds no stream of it
    finally:
        go.set()
        releasing.join(10)
    with store._sessions() as session:
        owners = session.scalars(select(StreamClaimRow.owner).where(StreamClaimRow.bundle_sha256 == bundle)).all()
    assert owners == [claims.owner]  # the new stream's row, not deleted by the release before it
    other = Claims(store.engine, owner="host-b:2:y", lease_s=600, owner_gone=lambda _o: False)
    assert other.claim_stream(bundle, "s@x") == claims.owner


def test_a_receipt_racing_the_verdict_always_ends_delivered(store: QueueStore) -> None:
    """The receiver's receipt may arrive while the sender records the verdict (`sent`): in either order,
    on SQLite and PostgreSQL, the unit must end `delivered` (seen once in a soak: it stayed `sent`)."""
    units = queued_units(store, 60)
    bundle = {}
    for n, unit in enumerate(units):
        bundle[unit] = f"{n:064x}"
        store.transition(unit, State.OFFERING, bundle_sha256=bundle[unit])
        store.transition(unit, State.SENDING)
    study = {u.unit_id: u.study_instance_uid for u in store.studies()}
    for unit in units:
        start = threading.Barrier(2)

        def verdict(unit: int = unit, start: threading.Barrier = start) -> None:
            start.wait()
            store.mark_sent(unit, "verified")

        def receipt(unit: int = unit, start: threading.Barrier = start) -> None:
            start.wait()
            store.confirm_delivery("b@x", study[unit], bundle[unit], True, "stored")

        threads = [threading.Thread(target=verdict), threading.Thread(target=receipt)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert [store.unit(u).state for u in units] == ["delivered"] * len(units)


def test_a_verdict_after_the_lease_lapsed_and_the_unit_was_queued_again_still_marks_it_sent(store: QueueStore) -> None:
    """A process too busy to renew its lease in time (seen in CI: three gateway processes and a test run on two
    cores) has its sending unit queued again by another's recovery; the receiver's verdict for the stream that
    was running still counts: the unit goes to `sent` (through `offering`, each move audited), never an
    IllegalTransition; a receipt that came first leaves it `delivered`."""
    requeued, delivered = queued_units(store, 2)
    for unit in (requeued, delivered):
        store.transition(unit, State.OFFERING, bundle_sha256=f"{unit:064x}")
        store.transition(unit, State.SENDING)
        store.transition(unit, State.QUEUED, "lease lapsed: recovered")
    assert store.mark_sent(requeued, "b@x/gw1 verified it") == State.SENT.value
    moves = [(e["from_state"], e["to_state"]) for e in store.audit_entries(unit_id=requeued)][:2]
    assert moves == [("offering", "sent"), ("queued", "offering")]
    store.transition(delivered, State.DELIVERED, "receipt")
    assert store.mark_sent(delivered, "b@x/gw1 verified it") == State.DELIVERED.value


def test_routing_leaves_a_unit_another_process_routed_and_is_offering_since_the_list_was_read(store: QueueStore) -> None:
    """Two processes route the stable units they listed; the other one routed this unit and began offering it
    between our list and our move: ours leaves it alone (CI, two processes: 'offering -> queued: routed to ...'
    mid-stream, then 'illegal study state move queued -> sending')."""
    unit = record(store, "1.2.70.1", study="1.2.70")
    store.transition(unit, State.STABLE)

    def route(summary: object) -> tuple[list[str], str, str]:
        store.transition(unit, State.QUEUED, "routed by the other process", destination="b@x")  # meanwhile
        store.transition(unit, State.OFFERING, "the other process offers it")
        return ["b@x"], "routine", "default_destination"

    assert store.route_stable(route) == []
    assert store.unit(unit).state == State.OFFERING.value
    moves = [(e["from_state"], e["to_state"]) for e in store.audit_entries(unit_id=unit)]
    assert ("offering", "queued") not in moves and moves[0] == ("queued", "offering")


def test_leases_commit_without_waiting_for_the_disk_and_everything_else_still_waits(store: QueueStore) -> None:
    """A claim lost in a power cut belonged to a process gone with it: lease writes commit without an fsync
    (SQLite synchronous=NORMAL, PostgreSQL synchronous_commit off), on an engine of their own; the queue's own
    writes (instances, moves, receipts) keep synchronous=FULL / on. A claim is seen by the queue at once."""
    from sqlalchemy import text

    from gateway.store import lease_engine

    (unit,) = queued_units(store, 1)
    claims = Claims(store.engine, owner="host-a:1:x", lease_s=60)
    assert claims.claim(unit) and owner_of(store, unit) == "host-a:1:x"
    sqlite = store.engine.dialect.name == "sqlite"
    setting = "PRAGMA synchronous" if sqlite else "SHOW synchronous_commit"
    with lease_engine(store.engine).connect() as conn:
        lax = conn.exec_driver_sql(setting).scalar()
    with store.engine.connect() as conn:
        full = conn.exec_driver_sql(setting).scalar()
        if sqlite:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    assert (lax, full) == ((1, 2) if sqlite else ("off", "on"))
    assert lease_engine(store.engine) is lease_engine(store.engine)  # one per engine
    claims.release(unit)
    assert owner_of(store, unit) is None
