"""Import received studies into the local PACS: status mapping, retries, the delivered state.

Receiver side of a study's life (``gateway.lifecycle``)::

    received --(import starts)--> importing --(PACS holds every instance)--> delivered
    importing --(transient failure)--> received (retried with backoff, at most ``max_attempts``)
    importing --(permanent refusal)--> failed (with the PACS's own status and error text)

C-STORE statuses (PS3.4 B.2.3, PS3.7 Annex C) are classified by :func:`classify_store_status`:
success and warnings (0x0001, 0xB000-0xB007) count as stored; 0xA7xx (out of resources), association
trouble and timeouts are transient; 0xA9xx (data set does not match SOP class), 0xCxxx (cannot understand),
0x0122 (SOP class not supported) and 0x0124 (not authorized) are permanent and never retried. Instances
already stored are never sent again on a retry; each instance's status is kept (``instances.pacs_status``).

When ``storage_commitment`` is on, the gateway asks the PACS to commit (N-ACTION, PS3.4 Annex J) and the
unit stays ``importing`` until the N-EVENT-REPORT arrives (:meth:`ImportService.commitment_result`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Protocol

from gateway.claims import Claims
from gateway.coercion import Coercer, Coercion, Hold
from gateway.lifecycle import State
from gateway.logs import bind
from gateway.model import InstanceRecord, StudySummary
from gateway.outage import reason, said, unreachable
from gateway.retry import ErrorKind
from gateway.retry import classify_store_status as store_status_kind
from gateway.settings import PacsSettings
from gateway.store import QueueStore, utcnow
from gateway.terminal import plain

log = logging.getLogger(__name__)


class Verdict(StrEnum):
    STORED = "stored"
    WARNING = "warning"  # stored, with a warning status
    TRANSIENT = "transient"
    PERMANENT = "permanent"


def classify_store_status(status: int) -> Verdict:
    """Map a C-STORE response status to what the gateway does with the instance (the table is
    :func:`gateway.retry.classify_store_status`, shared with every other transient/permanent decision)."""
    kind = store_status_kind(status)
    if kind is None:
        return Verdict.STORED if status == 0x0000 else Verdict.WARNING
    return Verdict.TRANSIENT if kind is ErrorKind.TRANSIENT else Verdict.PERMANENT


@dataclass(frozen=True)
class PacsOutcome:
    """What the PACS said about one instance: its status (None when no response came), the verdict, text."""

    verdict: Verdict
    status: int | None
    detail: str


class PacsUnavailable(ConnectionError):
    """No association (refused, rejected transiently, timed out, aborted): the whole attempt is retried."""


class PacsRefused(ConnectionError):
    """The PACS rejected the association permanently (e.g. our AE title is not known to it)."""


class PacsPort(Protocol):
    def store(self, instances: list[InstanceRecord], on_result: Callable[[InstanceRecord, PacsOutcome], None]) -> None:
        """C-STORE the instances (associations reused for the study); ``on_result`` once per instance that got
        an answer, never concurrently.
        Raises :class:`PacsUnavailable` / :class:`PacsRefused` when no association can be had."""

    def request_commitment(self, transaction_uid: str, instances: list[InstanceRecord]) -> None:
        """N-ACTION Request Storage Commitment; raises :class:`PacsUnavailable` on failure."""


class ImportService:
    """Runs imports of received units on worker threads, at most ``parallel_studies`` at once."""

    def __init__(self, store: QueueStore, pacs: PacsPort, settings: PacsSettings,
                 on_outcome: Callable[[int], None] | None = None, claims: Claims | None = None,
                 coercer: Coercer | None = None,
                 make_transform: Callable[[Coercion, str], Callable[[InstanceRecord], bytes]] | None = None) -> None:
        self.coercer = coercer if coercer is not None and coercer.rules else None  # gateway.coercion
        self.make_transform = make_transform
        self.store = store
        self.claims = claims or Claims(store.engine)
        self.pacs = pacs
        self.settings = settings
        self.on_outcome = on_outcome
        self._running: set[int] = set()
        self._lock = threading.Lock()
        # Units whose import a queue database outage cut (left importing, claimed by this live process, which
        # no recovery took back): back to received at the first tick that can write.
        self._cut: set[int] = set()

    def tick(self) -> list[threading.Thread]:
        """Start imports for due units (and re-request overdue commitments); returns the started threads."""
        if self._cut:
            self._resume_cut()
        self._expire_commitments()
        started = []
        for unit in self.store.due_for_import():
            with self._lock:
                if unit.unit_id in self._running or len(self._running) >= self.settings.parallel_studies:
                    continue
                if not self.claims.claim(unit.unit_id):
                    continue  # another gateway process on this queue imports it
                self._running.add(unit.unit_id)
            thread = threading.Thread(target=self._run, args=(unit,), name=f"import-{unit.unit_id}", daemon=True)
            thread.start()
            started.append(thread)
        return started

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._running)

    def _run(self, unit: StudySummary) -> None:
        try:
            with bind(study_uid=unit.study_instance_uid, unit_id=unit.unit_id, peer=unit.origin_peer):
                self.import_unit(unit)
        except Exception as exc:  # a bug in one import must not stop the others: the unit is retried
            if unreachable(exc):  # one line, no traceback: the outage itself is said once (gateway.outage)
                self._cut_by(unit, exc)
            else:
                log.exception("import of unit %s failed unexpectedly", unit.unit_id)
                try:
                    self._retry(unit, "internal error during import (see the gateway log)")
                except Exception as again:
                    if not unreachable(again):
                        raise
                    self._cut_by(unit, again)
        finally:
            try:  # released while still listed as running: a tick meanwhile must not start its next import
                self.claims.release(unit.unit_id)
            except Exception as exc:
                if not unreachable(exc):
                    raise
                with self._lock:
                    self._cut.add(unit.unit_id)  # still ours in the database: released with its move back
            finally:
                with self._lock:
                    self._running.discard(unit.unit_id)

    def _cut_by(self, unit: StudySummary, exc: BaseException) -> None:
        with self._lock:
            self._cut.add(unit.unit_id)
        log.error("import of unit %s was cut: %s (%s); it is imported again once the database takes writes",
                  unit.unit_id, said(exc), reason(exc))

    def _resume_cut(self) -> None:
        """Units whose import an outage cut go back from importing to received, due now (what the PACS took
        is taken again as a duplicate); raises while the database still takes no writes, keeping them."""
        with self._lock:
            cut = sorted(self._cut - self._running)
        if not cut:
            return
        moved = self.store.recover_in_flight(self.claims.free(), units=cut, why="its import was cut by a queue database outage")
        for unit_id in cut:
            self.claims.release(unit_id)
        with self._lock:
            self._cut.difference_update(cut)
        for unit_id, before, after in moved:
            log.warning("unit %s: %s -> %s: its import was cut by a queue database outage; imported again", unit_id, before, after)

    def import_unit(self, unit: StudySummary) -> None:
        transform = None
        if self.coercer is not None and unit.origin_peer:
            plan = self.coercer.plan(unit.origin_peer, unit.patient_id)
            if isinstance(plan, Hold):  # waits for the mapping and an admin's release
                self.store.hold_units([unit.unit_id], plan.reason)
                return
            if plan is not None and self.make_transform is not None:
                transform = self.make_transform(plan, unit.origin_peer)
                self.store.audit("coerced", plan.describe(), unit.unit_id, unit.study_instance_uid)
        instances = self.store.unit_instances(unit.unit_id)
        # Stored ones are never sent again; refused ones (by the early import) are never retried.
        pending = [i for i in instances if i.pacs_verdict not in (Verdict.STORED, Verdict.WARNING, Verdict.PERMANENT)]
        self.store.transition(
            unit.unit_id, State.IMPORTING, f"C-STORE of {len(pending)} of {len(instances)} instance(s) into the PACS", None
        )
        outcomes: dict[str, PacsOutcome] = {
            i.sop_instance_uid: PacsOutcome(Verdict.PERMANENT, i.pacs_status, i.pacs_detail or "")
            for i in instances if i.pacs_verdict == Verdict.PERMANENT
        }
        unsaved: list[tuple[int, int | None, str, str]] = []
        last_save = time.monotonic()

        def save() -> None:
            nonlocal last_save
            if unsaved:
                self.store.record_imports(unsaved)
                unsaved.clear()
            last_save = time.monotonic()

        def record(instance: InstanceRecord, outcome: PacsOutcome) -> None:
            # Statuses are committed in batches (a commit per instance cost as much as the C-STORE itself);
            # a crash loses at most a second of them, and re-sending an instance the PACS holds duplicates nothing.
            outcomes[instance.sop_instance_uid] = outcome
            unsaved.append((instance.instance_id, outcome.status, outcome.verdict.value, outcome.detail))
            if time.monotonic() - last_save >= 1.0:
                save()

        try:
            if pending:
                if transform is not None:
                    self.pacs.store(pending, record, transform=transform)  # type: ignore[call-arg]
                else:
                    self.pacs.store(pending, record)
        except PacsRefused as exc:
            save()
            self._fail(unit, f"PACS refused the association: {exc}")
            return
        except PacsUnavailable as exc:
            save()
            self._retry(unit, f"PACS unavailable: {exc}")
            return
        save()
        refused = [(uid, o) for uid, o in outcomes.items() if o.verdict == Verdict.PERMANENT]
        unanswered = [i for i in pending if i.sop_instance_uid not in outcomes or outcomes[i.sop_instance_uid].verdict == Verdict.TRANSIENT]
        if refused:
            first_uid, first = refused[0]
            self._fail(unit, f"PACS refused {len(refused)} of {len(instances)} instance(s); first {first_uid}: {first.detail}")
            return
        if unanswered:
            reasons = {outcomes[i.sop_instance_uid].detail for i in unanswered if i.sop_instance_uid in outcomes}
            self._retry(unit, f"{len(unanswered)} instance(s) not stored yet: {'; '.join(sorted(reasons)) or 'no response'}")
            return
        if self.settings.storage_commitment:
            transaction_uid = "2.25." + str(uuid.uuid4().int)
            try:
                self.store.set_commitment(unit.unit_id, transaction_uid)
                self.pacs.request_commitment(transaction_uid, instances)
            except PacsUnavailable as exc:
                self._retry(unit, f"storage commitment request failed: {exc}")
                return
            self.store.audit("commitment_requested", f"N-ACTION transaction {transaction_uid} for {len(instances)} instance(s)",
                             unit.unit_id, unit.study_instance_uid)
            return
        self._delivered(unit.unit_id, f"PACS holds all {len(instances)} instance(s)")

    def commitment_result(self, transaction_uid: str, committed: set[str], failed: dict[str, int]) -> bool:
        """The PACS's N-EVENT-REPORT (PS3.4 J.3.3): delivered when every instance is committed. False if the
        transaction UID is not ours."""
        unit_id = self.store.unit_for_commitment(transaction_uid)
        if unit_id is None:
            return False
        unit = self.store.unit(unit_id)
        expected = {i.sop_instance_uid for i in self.store.unit_instances(unit_id)}
        if failed or not expected <= committed:
            missing = sorted(expected - committed)
            detail = f"storage commitment failed for {len(failed) or len(missing)} instance(s)"
            if failed:
                uid, reason = next(iter(failed.items()))
                detail += f"; first {uid}: failure reason 0x{reason:04X}"
            self.store.clear_imports(unit_id, set(failed) | set(missing))
            self._retry(unit, detail)
            return True
        self._delivered(unit_id, f"PACS committed to all {len(expected)} instance(s) (transaction {transaction_uid})")
        return True

    def _expire_commitments(self) -> None:
        cutoff = utcnow() - timedelta(seconds=self.settings.commitment_timeout_s)
        for unit in self.store.studies(state=State.IMPORTING.value):
            if unit.origin_peer and unit.state_changed_at < cutoff and unit.unit_id not in self._running:
                self._retry(unit, f"no storage commitment report after {self.settings.commitment_timeout_s:g} s")

    def _delivered(self, unit_id: int, detail: str) -> None:
        converted = [i for i in self.store.unit_instances(unit_id) if "converted" in (i.pacs_detail or "")]
        if converted:
            self.store.audit("converted", f"{len(converted)} instance(s) converted for the PACS; first "
                             f"{converted[0].sop_instance_uid}: {converted[0].pacs_detail}", unit_id)
        self.store.transition(unit_id, State.DELIVERED, detail, None)
        if self.on_outcome is not None:
            self.on_outcome(unit_id)

    def _retry(self, unit: StudySummary, detail: str) -> None:
        current = self.store.unit(unit.unit_id)
        attempts = current.attempts + 1
        if attempts >= self.settings.max_attempts:
            self._fail(unit, f"gave up after {attempts} attempts: {detail}")
            return
        delay = min(self.settings.retry_max_s, self.settings.retry_base_s * 2 ** (attempts - 1))
        when = utcnow() + timedelta(seconds=delay)
        # In the log too, not only in the unit's row: a PACS that stays unreachable must show where an admin looks.
        log.warning("import of unit %s: attempt %d failed, retry in %g s: %s", unit.unit_id, attempts, delay, plain(detail))
        if current.state == State.RECEIVED.value:  # failed before the move to importing
            self.store.reschedule(unit.unit_id, when, attempts)
            return
        self.store.transition(
            unit.unit_id, State.RECEIVED, f"import attempt {attempts} failed, retry in {delay:g} s: {detail}", detail,
            attempts=attempts, next_attempt_at=when,
        )

    def _fail(self, unit: StudySummary, detail: str) -> None:
        log.error("import of unit %s failed: %s", unit.unit_id, plain(detail))  # the PACS's words: one line, no escapes
        self.store.transition(unit.unit_id, State.FAILED, detail, detail)
        self.store.add_flag(unit.unit_id, "pacs-refused")
        if self.on_outcome is not None:
            self.on_outcome(unit.unit_id)
