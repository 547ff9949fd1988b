"""The import use case and the retention policy against a real queue DB, with a fake PACS (pure logic of
retries and outcomes; the real PACS edge is tested in test_pacs.py and test_delivery.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.importing import ImportService, PacsOutcome, PacsUnavailable, Verdict
from gateway.lifecycle import State
from gateway.model import InstanceRecord
from gateway.retention import SpoolCleaner
from gateway.settings import PacsSettings
from gateway.store import QueueStore, utcnow
from tests.integration.test_queue import header

PEER = "radiology.hospital-a@helsenett.test"


class FakePacs:
    """Answers from a script: a list of per-call behaviours (an exception, or a status per SOP Instance UID)."""

    def __init__(self, *script: object) -> None:
        self.script = list(script)
        self.calls: list[list[str]] = []
        self.commitments: list[str] = []

    def store(self, instances: list[InstanceRecord], on_result: Callable[[InstanceRecord, PacsOutcome], None]) -> None:
        self.calls.append([i.sop_instance_uid for i in instances])
        step = self.script.pop(0) if self.script else {}
        if isinstance(step, Exception):
            raise step
        for i in instances:
            status = step.get(i.sop_instance_uid, 0x0000)  # type: ignore[union-attr]
            verdict = Verdict.PERMANENT if status >= 0xA900 else Verdict.TRANSIENT if status >= 0xA700 else Verdict.STORED
            on_result(i, PacsOutcome(verdict, status, f"0x{status:04X} test"))

    def request_commitment(self, transaction_uid: str, instances: list[InstanceRecord]) -> None:
        self.commitments.append(transaction_uid)


def received_unit(store: QueueStore, count: int = 3) -> int:  # noqa: F811
    unit_id = store.begin_receiving("1.2.3", PEER, 3000, 0, "s5b", "a" * 64)
    store.transition(unit_id, State.RECEIVED, "verified")
    for n in range(1, count + 1):
        store.record_instance(header(f"1.2.3.1.{n}"), spool_path=f"studies/1.2.3/{n}.dcm", size_bytes=1000,
                              sha256=str(n) * 64, source="test", conflict=False, origin_peer=PEER)
    store.ready_for_import(unit_id)
    return unit_id


def service(store: QueueStore, pacs: FakePacs, **options: object) -> ImportService:  # noqa: F811
    settings = PacsSettings(host="127.0.0.1", retry_base_s=0.0, retry_max_s=0.0, **options)  # type: ignore[arg-type]
    return ImportService(store, pacs, settings)


def run_due(svc: ImportService) -> None:
    for thread in svc.tick():
        thread.join(10)


def test_transient_failures_are_retried_and_stored_instances_are_not_sent_again(store: QueueStore, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    unit_id = received_unit(store)
    pacs = FakePacs(PacsUnavailable("connection refused"), {"1.2.3.1.2": 0xA700}, {})
    svc = service(store, pacs)
    caplog.set_level(logging.WARNING, logger="gateway.importing")
    run_due(svc)
    assert store.unit(unit_id).state == "received" and "PACS unavailable: connection refused" in (store.unit(unit_id).error or "")
    # ... and in the log, where an admin looks when a study does not reach the PACS
    assert f"import of unit {unit_id}: attempt 1 failed, retry in 0 s: PACS unavailable: connection refused" in caplog.messages
    run_due(svc)
    assert store.unit(unit_id).state == "received" and store.unit(unit_id).attempts == 2
    run_due(svc)
    assert store.unit(unit_id).state == "delivered"
    assert pacs.calls == [["1.2.3.1.1", "1.2.3.1.2", "1.2.3.1.3"]] * 2 + [["1.2.3.1.2"]]
    assert {i.pacs_status for i in store.unit_instances(unit_id)} == {0x0000}


def test_a_permanent_refusal_fails_the_unit_with_the_pacs_text_and_keeps_the_rest(store: QueueStore) -> None:  # noqa: F811
    unit_id = received_unit(store)
    svc = service(store, FakePacs({"1.2.3.1.3": 0xA900}))
    run_due(svc)
    unit = store.unit(unit_id)
    assert unit.state == "failed" and "pacs-refused" in unit.flags
    assert "PACS refused 1 of 3 instance(s); first 1.2.3.1.3: 0xA900 test" == unit.error
    assert [i.pacs_status for i in store.unit_instances(unit_id)] == [0, 0, 0xA900]
    assert [u.unit_id for u in store.receipts_due()] == [unit_id]  # the sender will hear of it


def test_gives_up_after_max_attempts(store: QueueStore, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    unit_id = received_unit(store)
    svc = service(store, FakePacs(*[PacsUnavailable("down")] * 3), max_attempts=3)
    for _ in range(3):
        run_due(svc)
    unit = store.unit(unit_id)
    assert unit.state == "failed" and unit.error == "gave up after 3 attempts: PACS unavailable: down"
    assert f"import of unit {unit_id} failed: gave up after 3 attempts: PACS unavailable: down" in caplog.messages


def test_a_pacs_error_text_reaches_the_log_on_one_line_without_escapes(store: QueueStore, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """The PACS's words (an error comment, an exception's text) in the gateway's log: a line break in them would
    forge a log line of its own, an escape sequence would reach the admin's terminal."""
    unit_id = received_unit(store)
    hostile = "refused\n2026-12-02 10:00:00 ERROR gateway: forged\x1b[2J\u202e" + "x" * 1000
    svc = service(store, FakePacs(*[PacsUnavailable(hostile)] * 2), max_attempts=2)
    caplog.set_level(logging.WARNING, logger="gateway.importing")
    run_due(svc)
    run_due(svc)
    said = "PACS unavailable: refused 2026-12-02 10:00:00 ERROR gateway: forged[2J" + "x" * 1000
    assert caplog.messages == [f"import of unit {unit_id}: attempt 1 failed, retry in 0 s: {said}",
                               f"import of unit {unit_id} failed: gave up after 2 attempts: {said}"]
    assert store.unit(unit_id).state == "failed"


def test_storage_commitment_waits_for_the_report(store: QueueStore) -> None:  # noqa: F811
    unit_id = received_unit(store)
    pacs = FakePacs({})
    svc = service(store, pacs, storage_commitment=True)
    run_due(svc)
    assert store.unit(unit_id).state == "importing" and len(pacs.commitments) == 1
    assert not svc.commitment_result("2.25.1", {"1.2.3.1.1"}, {})  # not our transaction
    assert svc.commitment_result(pacs.commitments[0], {"1.2.3.1.1", "1.2.3.1.2"}, {"1.2.3.1.3": 0x0110})
    assert store.unit(unit_id).state == "received"  # retried: the failed instance goes again
    run_due(svc)
    assert pacs.calls[-1] == ["1.2.3.1.3"]
    assert svc.commitment_result(pacs.commitments[1], {"1.2.3.1.1", "1.2.3.1.2", "1.2.3.1.3"}, {})
    assert store.unit(unit_id).state == "delivered"


class FakeSpool:
    def __init__(self) -> None:
        self.removed: list[str] = []

    def remove(self, relative_path: str) -> bool:
        self.removed.append(relative_path)
        return True


def test_retention_removes_only_delivered_units_after_the_keep_time(store: QueueStore) -> None:  # noqa: F811
    delivered = received_unit(store)
    run_due(service(store, FakePacs({})))
    other = store.record_instance(header("1.2.4.1.1", study="1.2.4"), spool_path="studies/1.2.4/1.dcm", size_bytes=1,
                                  sha256="f" * 64, source="test", conflict=False)
    spool = FakeSpool()
    assert SpoolCleaner(store, spool, keep_delivered_s=3600).tick() == []  # too recent
    assert SpoolCleaner(store, spool, keep_delivered_s=-1).tick() == []  # keep for ever
    assert store.purgeable(3600, now=utcnow() + timedelta(hours=2))[0].unit_id == delivered
    assert SpoolCleaner(store, spool, keep_delivered_s=0).tick() == [delivered]
    assert spool.removed == ["studies/1.2.3/1.dcm", "studies/1.2.3/2.dcm", "studies/1.2.3/3.dcm"]
    assert store.unit(delivered).purged_at is not None and store.unit(other).purged_at is None
    assert SpoolCleaner(store, spool, keep_delivered_s=0).tick() == []  # once
    assert any(e["event"] == "purged" for e in store.audit_entries(unit_id=delivered))


def test_spool_remove_refuses_paths_outside_the_instance_tree(tmp_path: Path) -> None:
    import pytest

    from adapters.spool import Spool

    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    spool.start()
    for bad in ("../queue.db", "inbox/abc.part"):
        with pytest.raises(ValueError, match="refusing to remove"):
            spool.remove(bad)
    assert spool.remove("studies/none.dcm") is False


def test_start_up_recovers_units_left_in_flight(store: QueueStore) -> None:  # noqa: F811
    importing = received_unit(store)
    store.transition(importing, State.IMPORTING, "import attempt")
    committing = store.begin_receiving("1.2.9", PEER, 10, 0, "s5b", "b" * 64)
    store.transition(committing, State.RECEIVED, "verified")
    store.transition(committing, State.IMPORTING, "import attempt")
    store.set_commitment(committing, "2.25.7")
    sending = store.record_instance(header("1.2.8.1.1", study="1.2.8"), spool_path="x", size_bytes=1, sha256="e" * 64,
                                    source="test", conflict=False)
    for state in (State.STABLE, State.QUEUED, State.OFFERING, State.SENDING):
        store.transition(sending, state, "test")
    moved = store.recover_in_flight()
    assert sorted(moved) == sorted([(importing, "importing", "received"), (sending, "sending", "queued")])
    assert store.unit(committing).state == "importing"  # its commitment report may still come
    assert [u.unit_id for u in store.due_for_import()] == [importing]
    assert [u.unit_id for u in store.due_for_sending()] == [sending]


def test_admin_retry_of_a_refused_import_sends_only_the_refused_instances_again(store: QueueStore) -> None:  # noqa: F811
    unit_id = received_unit(store)
    pacs = FakePacs({"1.2.3.1.3": 0xA900}, {})
    svc = service(store, pacs)
    run_due(svc)
    assert store.unit(unit_id).state == "failed"
    assert store.retry_unit(unit_id) == "received" and "pacs-refused" not in store.unit(unit_id).flags
    run_due(svc)
    assert store.unit(unit_id).state == "delivered" and pacs.calls[-1] == ["1.2.3.1.3"]


def test_outcomes_of_the_early_import_are_kept_refusals_not_retried_conversions_audited(store: QueueStore) -> None:  # noqa: F811
    unit_id = received_unit(store)
    store.record_imports_by_uid(unit_id, {
        "1.2.3.1.1": (0x0000, "stored", "0x0000 (converted 1.2.840.10008.1.2.1.99 -> 1.2.840.10008.1.2.1: PACS refused the original syntax)"),
        "1.2.3.1.2": (0x0000, "stored", "0x0000"),
    })
    pacs = FakePacs({})
    run_due(service(store, pacs))
    assert pacs.calls == [["1.2.3.1.3"]] and store.unit(unit_id).state == "delivered"
    assert any(e["event"] == "converted" and "1.2.3.1.1" in e["detail"] for e in store.audit_entries(unit_id=unit_id))

    refused = store.begin_receiving("1.2.7", PEER, 10, 0, "s5b", "c" * 64)
    store.transition(refused, State.RECEIVED, "verified")
    store.record_instance(header("1.2.7.1.1", study="1.2.7"), spool_path="s/7.dcm", size_bytes=1, sha256="7" * 64,
                          source="test", conflict=False, origin_peer=PEER)
    store.record_imports_by_uid(refused, {"1.2.7.1.1": (0xA900, "permanent", "0xA900 data set does not match")})
    store.ready_for_import(refused)
    run_due(service(store, pacs))
    assert pacs.calls[-1] == ["1.2.3.1.3"]  # nothing sent for the refused unit: never retried
    assert store.unit(refused).state == "failed" and "0xA900 data set does not match" in (store.unit(refused).error or "")


def test_an_import_that_ends_keeps_its_claim_until_released_so_the_next_import_is_never_unowned(store: QueueStore) -> None:  # noqa: F811
    """An import fails for a moment (due again at once) and its thread releases the unit's claim. A tick that
    runs meanwhile must not start the unit's next import before that release, which would clear the new
    import's claim and leave an `importing` unit to any process's recovery."""
    from tests.integration.test_claims import HeldRelease, owner_of

    owners: list[str | None] = []
    claims = HeldRelease(store.engine)

    class Pacs(FakePacs):
        def store(self, instances: list[InstanceRecord], on_result: Callable[[InstanceRecord, PacsOutcome], None]) -> None:
            if owners:  # the next import reads its claim once the first import's release has run
                claims.released.wait(30)
            owners.append(owner_of(store, unit_id))
            super().store(instances, on_result)

    unit_id = received_unit(store)
    settings = PacsSettings(host="127.0.0.1", retry_base_s=0.0, retry_max_s=0.0)
    svc = ImportService(store, Pacs(PacsUnavailable("connection refused"), {}), settings, claims=claims)
    (first,) = svc.tick()
    assert claims.releasing.wait(30) and store.unit(unit_id).state == "received"  # it failed; its release waits
    started = svc.tick()  # a tick while the first release is pending
    claims.gate.set()
    first.join(30)
    for thread in started + svc.tick():
        thread.join(30)
    assert store.unit(unit_id).state == "delivered"
    assert owners == [claims.owner, claims.owner]  # each import ran holding the unit's claim
    assert owner_of(store, unit_id) is None
