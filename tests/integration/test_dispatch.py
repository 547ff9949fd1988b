"""The dispatcher's operations against a real queue database: routing to several peers, STAT ahead of
routine (order, lanes, the link), transfer windows with an injected clock, directions. The XMPP side is a
fake sender here (the real one is covered with Prosody in test_xmpp_transfer and test_operations)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from gateway.claims import Claims
from gateway.dispatch import Dispatcher
from gateway.model import InstanceHeader
from gateway.retention import SpoolCleaner
from gateway.retry import RetryPolicy
from gateway.routing import Router, Rules, parse_rules
from gateway.store import QueueStore
from gateway.transfer import SendOutcome, StreamSuspended

PEER = "radiology.hospital-b@example.org"
OTHER = "archive.hospital-c@example.org"
UTC1 = timezone(timedelta(hours=1))


def stable_study(store: QueueStore, spool: Path, study: str, description: str = "CT HEAD", count: int = 2,
                 size: int = 4096) -> int:
    unit_id = 0
    for n in range(1, count + 1):
        data = (f"{study}.{n}".encode() * (size // 8 + 1))[:size]
        relative = f"studies/{study}/{n}.dcm"
        (spool / relative).parent.mkdir(parents=True, exist_ok=True)
        (spool / relative).write_bytes(data)
        header = InstanceHeader(f"{study}.{n}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", study, f"{study}.0",
                                study_description=description, modality="CT", series_number=1, instance_number=n)
        unit_id = store.record_instance(header, spool_path=relative, size_bytes=size,
                                        sha256=hashlib.sha256(data).hexdigest(), source="scp:CT01\\DICOMGW@127.0.0.1",
                                        conflict=False)
    assert store.mark_stable(0.0, datetime.now(UTC1).astimezone(timezone.utc).replace(tzinfo=None) + timedelta(seconds=1))
    return unit_id


RULES = [
    {"name": "trauma", "destinations": ["radiology.hospital-b", "archive.hospital-c"], "priority": "stat",
     "tags": {"StudyDescription": "re:(?i)trauma"}},
    {"name": "ct", "destinations": ["radiology.hospital-b"], "modality": "CT"},
]


def router(store: QueueStore, spool: Path) -> Router:
    tags = {}

    def read_tags(path: Path, keys: tuple[str, ...]) -> dict[str, str]:  # the unit's description stands in
        return {key: tags.get(path.parent.name, "") for key in keys}

    r = Router(Rules(parse_rules(RULES)), "example.org", store, spool, read_tags, store.peer_configs)
    r.descriptions = tags  # type: ignore[attr-defined]
    return r


class FakeSender:
    """Records the order of offers; each send pulls its blocks through ``step`` (awaited per block)."""

    def __init__(self) -> None:
        self.online = True
        self.offers: list[tuple[str, str]] = []  # (unit's study, priority)
        self.blocks: dict[str, list[bytes]] = {}
        self.release = asyncio.Event()
        self.release.set()
        self.busy: set[str] = set()

    def peer_availability(self, bare_jid: str, priority: str = "routine") -> tuple[str | None, str]:
        if bare_jid in self.busy and priority != "stat":
            return None, "busy"
        return f"{bare_jid}/gw1", "available"

    async def send_bundle(self, peer_full_jid: str, size: int, manifest_sha256: str,
                          stream_from: Callable[[int, bool], Iterator[bytes]], progress: Callable[..., None],
                          priority: str = "routine") -> SendOutcome:
        self.offers.append((manifest_sha256, priority))
        got = self.blocks.setdefault(manifest_sha256, [])
        offset = sum(len(b) for b in got)  # the receiver's offset: what came before
        moved = 0
        try:
            for block in stream_from(offset, False):
                got.append(block)
                moved += len(block)
                await self.release.wait()
                await asyncio.sleep(0)
        except StreamSuspended as exc:
            return SendOutcome(ok=False, method="s5b", offset=offset, bytes_sent=moved, detail=str(exc), suspended=True,
                               attempts=[{"sid": f"{manifest_sha256[:8]}-{offset}", "method": "s5b", "bytes": moved,
                                          "outcome": "suspended"}])
        return SendOutcome(ok=True, method="s5b", bytes_sent=moved, detail="verified",
                           attempts=[{"sid": manifest_sha256[:8], "method": "s5b", "bytes": moved, "outcome": "received"}])


def dispatcher(store: QueueStore, spool: Path, sender: FakeSender, clock: Callable[[], datetime] | None = None) -> Dispatcher:
    return Dispatcher(store, spool, sender, router(store, spool), claims=Claims(store.engine),
                      peer_configs=store.peer_configs, clock=clock)


def states(store: QueueStore) -> dict[int, str]:
    return {s.unit_id: s.state for s in store.studies()}


async def drain(d: Dispatcher, timeout_s: float = 30.0) -> None:
    """Until no send runs (a deadline sized for a loaded 2-CPU machine: each send ends in DB writes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not d.running:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"sends still running: {d.running}")


def test_a_study_matching_a_two_destination_rule_gets_a_unit_per_peer(store: QueueStore, tmp_path: Path) -> None:
    unit = stable_study(store, tmp_path, "1.2.9")
    r = router(store, tmp_path)
    r.descriptions["1.2.9"] = "CT TRAUMA"  # type: ignore[attr-defined]
    routed = store.route_stable(r)
    assert [peer for _u, peer in routed] == [PEER, OTHER]
    units = {s.destination: s for s in store.studies()}
    assert set(units) == {PEER, OTHER}
    assert all(s.state == "queued" and s.priority == "stat" and s.rule == "trauma" for s in units.values())
    copy = units[OTHER]
    assert copy.instances_of == unit and copy.modalities == "CT"
    assert [i.sop_instance_uid for i in store.unit_instances(copy.unit_id)] == ["1.2.9.1", "1.2.9.2"]
    audit = [e["detail"] for e in store.audit_entries() if e["unit_id"] == copy.unit_id]
    assert audit == [f"routed to {OTHER} (stat, rule 'trauma'): the instances of unit {unit}, a unit of its own"]

    # Retention keeps the shared files until both destinations have the study.
    from gateway.lifecycle import State

    class Spool:
        removed: list[str] = []

        def remove(self, relative_path: str) -> bool:
            self.removed.append(relative_path)
            return True

    spool = Spool()
    for state in (State.OFFERING, State.SENDING, State.SENT, State.DELIVERED):
        store.transition(unit, state, "test")
    assert SpoolCleaner(store, spool, keep_delivered_s=0).tick() == []
    for state in (State.OFFERING, State.SENDING, State.SENT, State.DELIVERED):
        store.transition(copy.unit_id, state, "test")
    assert sorted(SpoolCleaner(store, spool, keep_delivered_s=0).tick()) == sorted([unit, copy.unit_id])


def test_stat_is_offered_first_and_gets_the_link_while_routine_waits(store: QueueStore, tmp_path: Path) -> None:
    async def scenario() -> None:
        sender = FakeSender()
        d = dispatcher(store, tmp_path, sender)
        routine = stable_study(store, tmp_path, "1.2.10", count=40, size=300_000)
        sender.release.clear()  # the routine study will stop after its first block, whatever the machine's speed
        await d.tick()  # the routine study starts streaming ...
        assert d.running == [(routine, PEER, "routine")]
        deadline = time.monotonic() + 30
        while not any(sender.blocks.values()) and time.monotonic() < deadline:  # ... and is now between two blocks
            await asyncio.sleep(0.01)
        r = d.route
        stat = stable_study(store, tmp_path, "1.2.11")
        r.descriptions["1.2.11"] = "TRAUMA"  # type: ignore[attr-defined]
        await d.tick()  # the STAT study starts beside it (a routine lane is full, the STAT lane is free)
        assert sorted(d.running) == sorted([(routine, PEER, "routine"), (stat, PEER, "stat")] + [
            (u, OTHER, "stat") for u, s in states(store).items() if u not in (routine, stat)])
        sender.release.set()
        await drain(d)  # the STAT sends end; the routine one gave way at its next block
        assert d.gate.suspended == 1
        assert states(store)[routine] == "queued"
        assert store.unit(routine).attempts == 0  # a suspension is no failed attempt
        await d.tick()  # ... and it resumes where the receiver is
        await drain(d)
        routine_sha = store.unit(routine).bundle_sha256
        assert sum(len(b) for b in sender.blocks[routine_sha]) == store.unit(routine).bundle_bytes
        assert [o for _sha, o in sender.offers] == ["routine", "stat", "stat", "routine"]
        assert set(states(store).values()) == {"sent"}
        outcomes = [t["outcome"] for t in store.transfers(routine)]
        assert outcomes == ["suspended", "received"]
        moves = [(e["from_state"], e["to_state"], e["detail"]) for e in store.audit_entries() if e["unit_id"] == routine][::-1]
        suspension = next(m for m in moves if m[1] == "queued" and m[0] in ("offering", "sending"))
        assert suspension[2].startswith("suspended for a STAT transfer at byte ")
        assert moves[-1][:2] == ("sending", "sent")

    asyncio.run(scenario())


def test_claims_order_stat_before_older_routine(store: QueueStore, tmp_path: Path) -> None:
    async def scenario() -> None:
        sender = FakeSender()
        d = dispatcher(store, tmp_path, sender)
        store.add_peer(PEER, "B", None, max_concurrent=1)
        sender.busy.add(PEER)  # B busy: nothing routine goes, STAT does
        older = stable_study(store, tmp_path, "1.2.20")
        stat = stable_study(store, tmp_path, "1.2.21")
        d.route.descriptions["1.2.21"] = "trauma"  # type: ignore[attr-defined]
        sender.release.clear()  # the sends wait at their first block: what runs is seen whatever the machine's speed
        await d.tick()
        assert {(peer, p) for _u, peer, p in d.running} == {(PEER, "stat"), (OTHER, "stat")}  # routine waits
        sender.release.set()
        await drain(d)
        assert states(store)[stat] == "sent" and states(store)[older] == "queued"
        await d.tick()
        await drain(d)
        assert states(store)[older] == "waiting-peer"
        assert [p for _sha, p in sender.offers] == ["stat", "stat"]  # B (and C) got STAT; routine was never offered

    asyncio.run(scenario())


def test_routine_waits_for_the_window_and_stat_ignores_it(store: QueueStore, tmp_path: Path) -> None:
    async def scenario() -> None:
        now = [datetime(2026, 11, 25, 12, 0, tzinfo=UTC1)]  # a Wednesday noon
        sender = FakeSender()
        d = dispatcher(store, tmp_path, sender, clock=lambda: now[0])
        store.add_peer(PEER, "B", None, schedule="22:00-06:00")
        routine = stable_study(store, tmp_path, "1.2.30")
        stat = stable_study(store, tmp_path, "1.2.31")
        d.route.descriptions["1.2.31"] = "trauma"  # type: ignore[attr-defined]
        await d.tick()  # STAT goes at noon, outside the window ...
        await drain(d)
        assert states(store)[stat] == "sent"
        await d.tick()  # ... the routine study waits for it
        unit = store.unit(routine)
        assert unit.state == "waiting-window"
        assert unit.error == f"outside {PEER}'s transfer window (22:00-06:00): opens 2026-11-25T22:00+01:00"
        assert unit.next_attempt_at == datetime(2026, 11, 25, 21, 0)  # UTC in the row
        assert states(store)[stat] == "sent"
        # The admin widens the window: the waiting study is looked at again at once (still closed at noon).
        store.edit_peer(PEER, schedule="23:00-06:00")
        assert store.unit(routine).next_attempt_at is None
        await d.tick()
        assert store.unit(routine).error.endswith("opens 2026-11-25T23:00+01:00")
        store.edit_peer(PEER, schedule="22:00-06:00")
        await d.tick()
        # The window opens: the unit is due (its next attempt time) and goes by itself.
        now[0] = datetime(2026, 11, 25, 22, 0, tzinfo=UTC1)
        from sqlalchemy import update

        from gateway.rows import StudyUnitRow
        with store.engine.begin() as conn:  # the row's time is in the past when the clock reaches it
            conn.execute(update(StudyUnitRow).where(StudyUnitRow.id == routine).values(
                next_attempt_at=datetime(2026, 1, 1)))
        await d.tick()
        await drain(d)
        assert store.unit(routine).state == "sent"
        moves = [(e["from_state"], e["to_state"]) for e in store.audit_entries() if e["unit_id"] == routine]
        assert ("queued", "waiting-window") in moves and ("waiting-window", "offering") in moves

    asyncio.run(scenario())


def test_a_receive_only_peer_gets_nothing_sent(store: QueueStore, tmp_path: Path) -> None:
    async def scenario() -> None:
        sender = FakeSender()
        d = dispatcher(store, tmp_path, sender)
        store.add_peer(PEER, "B", None, directions="receive")
        unit = stable_study(store, tmp_path, "1.2.40")
        await d.tick()
        await drain(d)
        summary = store.unit(unit)
        assert summary.state == "failed"
        assert summary.error == f"this gateway only receives from {PEER} (dicomgw peers edit {PEER} --directions both)"
        assert sender.offers == []

    asyncio.run(scenario())


def test_max_concurrent_lanes_per_peer(store: QueueStore, tmp_path: Path) -> None:
    async def scenario() -> None:
        sender = FakeSender()
        sender.release.clear()
        d = dispatcher(store, tmp_path, sender)
        store.add_peer(PEER, "B", None, max_concurrent=2)
        units = [stable_study(store, tmp_path, f"1.2.5{n}") for n in range(3)]
        await d.tick()
        assert sorted(u for u, _p, _q in d.running) == units[:2]  # the third waits for a lane
        assert states(store)[units[2]] == "queued"
        sender.release.set()
        await drain(d)
        await d.tick()
        await drain(d)
        assert set(states(store).values()) == {"sent"}

    asyncio.run(scenario())


def test_already_received_closes_the_interrupted_attempt_as_received(store: QueueStore, tmp_path: Path) -> None:
    """A killed after the last byte of a stream B verified: its row is `interrupted` at recovery. The next offer
    is answered "already received": that attempt is closed as `received` with its whole stream, no `held` row
    is added, and the figures count one successful transfer, no failure."""
    from gateway import stats

    class AlreadyThere(FakeSender):
        async def send_bundle(self, peer_full_jid: str, size: int, manifest_sha256: str, stream_from: Callable[..., Iterator[bytes]],
                              progress: Callable[..., None], priority: str = "routine") -> SendOutcome:
            text = "conflict (already received here (unit 7, received); the receipt follows)"
            return SendOutcome(ok=False, detail=f"peer refused the offer: {text}",
                               attempts=[{"sid": "second", "outcome": "held", "error": text}])

    async def scenario() -> None:
        from gateway.lifecycle import State

        unit = stable_study(store, tmp_path, "1.2.60")
        assert [u for u, _peer in store.route_stable(router(store, tmp_path))] == [unit]
        store.transition(unit, State.OFFERING, "offering", None, bundle_bytes=8192)
        row = store.open_transfer(unit, "first", f"{PEER}/gw1", "out", "s5b", 0)
        store.transfer_progress(row, 6000)  # its last progress write before the kill (at most one a second)
        store.recover_in_flight()  # what a restart does: the unit queued again, the row `interrupted`
        assert [t["outcome"] for t in store.transfers(unit)] == ["interrupted"]
        d = dispatcher(store, tmp_path, AlreadyThere())
        await d.tick()
        await drain(d)
        assert store.unit(unit).state == "sent"
        (attempt,) = store.transfers(unit)
        assert (attempt["outcome"], attempt["bytes"]) == ("received", store.unit(unit).bundle_bytes)
        assert "already received" in attempt["error"]
        figures = stats.summary(stats.attempts(store.engine))
        assert (figures["N"], figures["S"], figures["F"]) == (1, 1, 0)

    asyncio.run(scenario())


def test_a_send_that_ends_keeps_its_claim_until_released_so_the_next_send_of_the_unit_is_never_unowned(
        store: QueueStore, tmp_path: Path) -> None:
    """A send ends (here: suspended, due again at once) and its task releases the unit's claim on a worker
    thread. A dispatch tick that runs meanwhile must not start the unit's next send before that release, or the
    release would clear the new send's claim and any process's recovery would take the unit back to `queued`
    mid-stream (CI, three processes on one queue: 'illegal study state move queued -> sending')."""
    from gateway.lifecycle import State
    from tests.integration.test_claims import HeldRelease, owner_of

    class SuspendOnce(FakeSender):
        def __init__(self) -> None:
            super().__init__()
            self.owners: list[str | None] = []

        async def send_bundle(self, peer_full_jid: str, size: int, manifest_sha256: str, stream_from: Callable[..., Iterator[bytes]],
                              progress: Callable[..., None], priority: str = "routine") -> SendOutcome:
            if self.owners:  # the next send reads its claim once the first send's release has run
                await asyncio.to_thread(claims.released.wait, 30)
            self.owners.append(await asyncio.to_thread(lambda: owner_of(store, unit)))
            if len(self.owners) == 1:
                return SendOutcome(ok=False, method="s5b", detail="suspended for a STAT transfer", suspended=True,
                                   attempts=[{"sid": "first", "method": "s5b", "bytes": 0, "outcome": "suspended"}])
            return await super().send_bundle(peer_full_jid, size, manifest_sha256, stream_from, progress, priority)

    unit = stable_study(store, tmp_path, "1.2.61")
    claims = HeldRelease(store.engine)

    async def scenario() -> None:
        sender = SuspendOnce()
        d = Dispatcher(store, tmp_path, sender, router(store, tmp_path), claims=claims, peer_configs=store.peer_configs)
        await d.tick()
        deadline = time.monotonic() + 30
        while not claims.releasing.is_set() and time.monotonic() < deadline:  # the first send ended; its release waits
            await asyncio.sleep(0.01)
        assert claims.releasing.is_set() and store.unit(unit).state == State.QUEUED.value
        await d.tick()  # a tick while the first release is pending
        claims.gate.set()
        await drain(d)
        await d.tick()  # the next send, once the first has let go
        await drain(d)
        assert store.unit(unit).state == State.SENT.value
        assert sender.owners == [claims.owner, claims.owner]  # each send ran holding the unit's claim
        assert owner_of(store, unit) is None  # and let it go at its end

    asyncio.run(scenario())


def test_a_receipt_that_comes_while_the_receipts_are_chased_ends_the_chase_for_that_unit(store: QueueStore, tmp_path: Path) -> None:
    """The unit was listed as `sent` without a receipt for too long; its receipt came before it was queued
    again: it stays `delivered` and the tick goes on (no IllegalTransition out of the tick)."""
    from gateway.lifecycle import State

    unit = stable_study(store, tmp_path, "1.2.62")
    assert [u for u, _peer in store.route_stable(router(store, tmp_path))] == [unit]
    store.transition(unit, State.OFFERING, "offering", None, bundle_bytes=8192)
    store.mark_sent(unit, "verified")
    d = dispatcher(store, tmp_path, FakeSender())
    listed = store.overdue_sent(0.0)
    assert [u.unit_id for u in listed] == [unit]
    store.transition(unit, State.DELIVERED, "receipt")  # it came meanwhile
    d.store.overdue_sent = lambda _timeout: listed  # type: ignore[method-assign]  # the list as read before
    asyncio.run(d.tick())
    assert store.unit(unit).state == State.DELIVERED.value


async def offered_five_times(store: QueueStore, tmp_path: Path, sender: FakeSender, study: str) -> tuple[Dispatcher, int]:
    """A dispatcher that gives up after 2 counted attempts (2 ms backoffs), ticked until ``sender`` saw five
    offers of a stable study (a bounded loop: each tick offers when the peer's backoff is over)."""
    d = Dispatcher(store, tmp_path, sender, router(store, tmp_path), claims=Claims(store.engine),
                   peer_configs=store.peer_configs, policy=RetryPolicy(base_s=0.001, cap_s=0.002, max_attempts=2))
    unit = stable_study(store, tmp_path, study)
    store.route_stable(d.route)
    for _ in range(400):
        await d.tick()
        await drain(d)
        if len(sender.offers) >= 5:
            return d, unit
        await asyncio.sleep(0.003)
    raise AssertionError(f"{len(sender.offers)} offers, not 5: {store.unit(unit)}")


def test_a_peer_whose_disk_fills_during_streams_is_waited_for_not_counted_to_dead(store: QueueStore, tmp_path: Path) -> None:
    """A receiver whose disk filled during the stream (its PACS on the same disk, after the offer was admitted)
    keeps what came and says so in its verdict: that is the peer's condition, as a busy refusal is. The study
    waits ``queued`` with that reason and the peer's backoff, its attempts still 0 (with ``max_attempts`` 2, the
    second such stream made it ``dead`` before); each attempt was a real stream (moved to ``sending``)."""
    full = "S5B failed: the receiver's spool is full (verdict from radiology.hospital-b@example.org/gw1)"

    class FillingPeer(FakeSender):
        async def send_bundle(self, peer_full_jid: str, size: int, manifest_sha256: str,
                              stream_from: Callable[[int, bool], Iterator[bytes]], progress: Callable[..., None],
                              priority: str = "routine") -> SendOutcome:
            self.offers.append((manifest_sha256, priority))
            block = next(iter(stream_from(0, False)))
            progress(len(block), "s5b", f"sid-{len(self.offers)}", 0)
            return SendOutcome(ok=False, method="s5b", bytes_sent=len(block), detail=full,
                               attempts=[{"sid": f"sid-{len(self.offers)}", "method": "s5b", "bytes": len(block),
                                          "outcome": "failed", "error": full}])

    async def scenario() -> None:
        sender = FillingPeer()
        d, unit = await offered_five_times(store, tmp_path, sender, "1.2.41")
        summary = store.unit(unit)
        assert (summary.state, summary.attempts) == ("queued", 0), (summary.state, summary.attempts)
        assert summary.error == full
        said = [e["detail"] for e in store.audit_entries() if e["unit_id"] == unit and e["to_state"] == "queued"]
        assert said and said[0] == f"{PEER}'s spool filled during the stream (kept, resumed later): {full}"

    asyncio.run(scenario())


def test_offers_refused_busy_are_waited_out_by_age_not_counted_to_dead(store: QueueStore, tmp_path: Path) -> None:
    """A peer that refuses offers busy (at its inbound limit, or without spool room for the study) is waited for as
    one whose presence says busy: the study stays ``waiting-peer`` with the reason, its attempts not counted (with
    ``max_attempts`` 2, five refusals made it ``dead`` before); a real failure still counts."""
    refusal = "peer refused the offer: resource-constraint (busy: not enough spool space here: 10 MB free, ...)"

    class BusyPeer(FakeSender):
        async def send_bundle(self, *args: Any, **kwargs: Any) -> SendOutcome:
            self.offers.append((args[2], kwargs.get("priority", "routine")))
            return SendOutcome(ok=False, detail=self.answer)

    async def scenario() -> None:
        sender = BusyPeer()
        sender.answer = refusal  # type: ignore[attr-defined]
        d, unit = await offered_five_times(store, tmp_path, sender, "1.2.40")
        summary = store.unit(unit)
        assert (summary.state, summary.attempts) == ("waiting-peer", 0), (summary.state, summary.attempts)
        assert summary.error == refusal
        sender.answer = "S5B failed: SOCKS5 stream cut: [Errno 104] Connection reset by peer"  # type: ignore[attr-defined]
        for _ in range(400):
            await d.tick()
            await drain(d)
            if store.unit(unit).state == "dead":
                break
            await asyncio.sleep(0.003)
        assert (store.unit(unit).state, store.unit(unit).attempts) == ("dead", 2)

    asyncio.run(scenario())
