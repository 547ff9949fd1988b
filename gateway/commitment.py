"""Storage Commitment for modalities (the gateway as SCP of the Push Model, PS3.4 Annex J; IHE RAD-10).

A modality asks "do you take responsibility for these instances?" with an N-ACTION (``adapters.dicom_store``
records the request durably, then answers Success). The answer, an N-EVENT-REPORT, follows when
:func:`decide` can give it:

- ``[dicom] commit_when = "stored"``: at once. An instance is committed when it is in the queue (durably in
  the spool: a C-STORE is answered Success only then) with the SOP Class the request names; else it is
  failed with reason 0x0112 (no such object instance) or 0x0119 (class / instance conflict).
- ``"delivered"``: only once the remote PACS's receipt covers every unit that sends the instance (then the
  modality may delete it knowing it reached its destination); after ``commit_timeout_s`` what is not
  delivered yet is reported failed (0x0110, processing failure), as the standard allows.

Event type 1 when all are committed, 2 when some failed. The report goes on the request's own association
when the modality negotiated the SCP role for it and still holds it, else on a new association to the
address ``[[dicom.modalities]]`` gives for its AE title (:class:`CommitmentService`, retried with backoff;
pending requests survive a restart: they are rows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.rows import utcnow

log = logging.getLogger(__name__)

NO_SUCH_INSTANCE, CLASS_INSTANCE_CONFLICT, PROCESSING_FAILURE = 0x0112, 0x0119, 0x0110
RETRY_BASE_S, RETRY_MAX_S, GIVE_UP_S = 5.0, 300.0, 86400.0


@dataclass(frozen=True)
class Decision:
    committed: list[tuple[str, str]]  # (SOP class, SOP instance)
    failed: list[tuple[str, str, int]]  # (SOP class, SOP instance, failure reason)

    @property
    def event_type(self) -> int:
        return 2 if self.failed else 1


def decide(refs: list[tuple[str, str]], found: dict[str, tuple[str, bool]], mode: str, age_s: float,
           timeout_s: float) -> Decision | None:
    """The report for ``refs`` given what the queue holds (``found``: uid -> (class, delivered)); None: wait."""
    committed: list[tuple[str, str]] = []
    failed: list[tuple[str, str, int]] = []
    waiting = False
    for sop_class, uid in refs:
        stored = found.get(uid)
        if stored is not None and stored[0] != sop_class:
            failed.append((sop_class, uid, CLASS_INSTANCE_CONFLICT))
        elif mode == "stored":
            if stored is None:
                failed.append((sop_class, uid, NO_SUCH_INSTANCE))
            else:
                committed.append((sop_class, uid))
        elif stored is not None and stored[1]:
            committed.append((sop_class, uid))
        elif age_s < timeout_s:
            waiting = True
        else:
            failed.append((sop_class, uid, NO_SUCH_INSTANCE if stored is None else PROCESSING_FAILURE))
    return None if waiting else Decision(committed, failed)


class CommitmentService:
    """Each tick (off the event loop): pending requests whose report can be given are decided and reported;
    a report that cannot be sent is tried again with backoff, for a day."""

    def __init__(self, store: object, mode: str, timeout_s: float,
                 send: Callable[[dict, Decision], str], clock: Callable[[], datetime] = utcnow) -> None:
        self.store, self.mode, self.timeout_s, self.send, self.clock = store, mode, timeout_s, send, clock

    def tick(self) -> int:
        reported = 0
        for request in self.store.due_commitments(self.clock()):  # type: ignore[attr-defined]
            decision = self.decision(request)
            if decision is None:
                continue
            try:
                how = self.send(request, decision)
            except Exception as exc:  # the modality away, refusing, not configured: try again later
                self._retry(request, str(exc) or type(exc).__name__)
                continue
            self.store.commitment_reported(request["id"], how)  # type: ignore[attr-defined]
            reported += 1
        return reported

    def decision(self, request: dict) -> Decision | None:
        """Decided once (recorded with the request), so that a retried report says the same."""
        if request["result"] is not None:
            result = request["result"]
            by_uid = {uid: cls for cls, uid in request["refs"]}
            return Decision([(by_uid.get(uid, ""), uid) for uid in result["committed"]],
                            [(by_uid.get(uid, ""), uid, reason) for uid, reason in result["failed"]])
        found = self.store.instance_states([uid for _cls, uid in request["refs"]])  # type: ignore[attr-defined]
        age_s = (self.clock() - request["requested_at"]).total_seconds()
        decision = decide(request["refs"], found, self.mode, age_s, self.timeout_s)
        if decision is not None:
            self.store.commitment_decided(request["id"], decision.event_type,  # type: ignore[attr-defined]
                                          [uid for _cls, uid in decision.committed],
                                          [(uid, reason) for _cls, uid, reason in decision.failed])
        return decision

    def _retry(self, request: dict, error: str) -> None:
        attempts = request["attempts"] + 1
        age_s = (self.clock() - request["requested_at"]).total_seconds()
        if age_s > GIVE_UP_S:
            next_at = None
        else:
            next_at = self.clock() + timedelta(seconds=min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (attempts - 1)))
        log.warning("Storage Commitment report to %s (transaction %s) not sent: %s%s", request["calling_ae"],
                    request["transaction_uid"], error, "; giving up" if next_at is None else "; trying again")
        self.store.commitment_retry(request["id"], error, next_at)  # type: ignore[attr-defined]
