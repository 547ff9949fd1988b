"""When to try again: one table of transient and permanent errors, and the backoff that spaces the retries.

Every failure the gateway meets is either *transient* (the network, a busy or offline peer, a restarted
server: the queue tries again later by itself) or *permanent* (the peer or the local PACS refused for a reason
that a retry cannot change: the study stops in ``failed`` with the reason, for the admin). :data:`ERROR_TABLE`
is that decision for the transfer between gateways, matched against the text an attempt ended with; the
C-STORE statuses of the local PACS are decided by :func:`classify_store_status` (PS3.4 Annex B.2.3, PS3.7
Annex C). Unknown errors count as transient: a retry that fails again costs a little time, a study stopped by
mistake costs a patient's images.

:class:`RetryPolicy` spaces retries by exponential backoff with full jitter and a cap (AWS Architecture Blog,
"Exponential Backoff And Jitter"): ``delay = uniform(base/2, min(cap, base * 2**n))``; ``n`` counts the
consecutive failures of *one peer*, so a peer that went away is probed once per backoff step, not once per
study. A study whose transient failures go on for ``max_attempts`` attempts or ``max_age_s`` seconds goes to
``dead`` with its last error (``dicomgw queue retry`` brings it back).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from enum import StrEnum


class ErrorKind(StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"


T, P = ErrorKind.TRANSIENT, ErrorKind.PERMANENT

#: What a receiving gateway says when its spool's disk filled during a stream (its verdict, or its refusal of an
#: IBB block): the peer's condition, not the study's (``gateway.dispatch`` waits for it as for a busy peer).
PEER_SPOOL_FULL = "the receiver's spool is full"

#: (text the failure contains, kind, what it means). First match wins; the texts are those of
#: ``adapters.xmpp`` (XMPP stanza error conditions, RFC 6120 8.3.3) and of the dispatcher itself.
ERROR_TABLE: tuple[tuple[str, ErrorKind, str], ...] = (
    ("spool file", P, "a spool file changed or vanished since ingest: sending it would send bad data"),
    ("end-to-end channel refused", P, "the peer's certificate is not the one pinned for it"),
    ("no certificate pinned", P, "no pin for the peer (at the peer): an admin must verify and pin it"),
    ("no pinned certificate", P, "no pin for the peer (here): an admin must verify and pin its certificate"),
    ("not-authorized", P, "the peer refused our certificate (its pin for us differs or is missing)"),
    ("forbidden", P, "the peer does not list this gateway as an allowed peer"),
    ("not-acceptable", P, "the peer refuses a study of this size"),
    ("bad-request", P, "the peer cannot parse our offer"),
    ("feature-not-implemented", P, "the peer has no common stream method"),
    ("resource-constraint", T, "the peer is at its inbound transfer limit, or its spool has no room for the study"),
    ("spool is full", T, "the peer's spool filled during the stream: what it received is kept, offered again with the peer's backoff (not counted to dead)"),
    ("service-unavailable", T, "the peer's gateway is not answering file transfer offers"),
    ("recipient-unavailable", T, "the peer went offline"),
    ("remote-server-not-found", T, "the peer's XMPP server is unreachable"),
    ("remote-server-timeout", T, "the peer's XMPP server is unreachable"),
    ("connection lost", T, "our XMPP connection dropped"),
    ("timed out", T, "no answer in time"),
    ("timeout", T, "no answer in time"),
    ("cut", T, "the stream was cut"),
    ("reset", T, "the stream was reset"),
    ("sha-256 mismatch", T, "bytes changed on the way: sent again"),
    ("tls", T, "the end-to-end channel failed (a changed byte, a cut): resumed"),
)


def classify(detail: str) -> ErrorKind:
    """Transient or permanent, by :data:`ERROR_TABLE`; anything not listed is transient."""
    text = detail.lower()
    for needle, kind, _meaning in ERROR_TABLE:
        if needle in text:
            return kind
    return ErrorKind.TRANSIENT


def classify_store_status(status: int) -> ErrorKind | None:
    """A C-STORE response status (PS3.4 B.2.3, PS3.7 C): None when the PACS stored the instance (success or
    warning), else whether another try may succeed (A7xx out of resources, 0110 processing failure, ...)."""
    if status == 0x0000 or status == 0x0001 or 0xB000 <= status <= 0xB007:
        return None
    if 0xA700 <= status <= 0xA7FF:
        return ErrorKind.TRANSIENT
    if 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF or status in (0x0122, 0x0124):
        return ErrorKind.PERMANENT
    return ErrorKind.TRANSIENT


@dataclass
class RetryPolicy:
    """Backoff per peer with full jitter and a cap; when a study's transient failures make it ``dead``."""

    base_s: float = 2.0
    cap_s: float = 60.0
    max_attempts: int = 20
    max_age_s: float = 7 * 86400.0
    rng: random.Random = field(default_factory=random.Random)
    _failures: dict[str, int] = field(default_factory=dict)
    _next_try: dict[str, float] = field(default_factory=dict)  # peer -> monotonic time of its next try

    def delay_s(self, failures: int) -> float:
        """Seconds before the next try after ``failures`` consecutive failures (>= 1)."""
        ceiling = min(self.cap_s, self.base_s * (2 ** min(max(failures, 1) - 1, 30)))
        return self.rng.uniform(min(self.base_s / 2, ceiling), ceiling)

    def peer_failed(self, peer: str, now_s: float | None = None) -> float:
        """Count one more failure of ``peer``; returns the delay before it is tried again (kept: see
        :meth:`peer_wait_s`)."""
        self._failures[peer] = self._failures.get(peer, 0) + 1
        delay = self.delay_s(self._failures[peer])
        self._next_try[peer] = (time.monotonic() if now_s is None else now_s) + delay
        return delay

    def peer_wait_s(self, peer: str, now_s: float | None = None) -> float:
        """Seconds until ``peer`` may be tried again (0: now)."""
        return max(0.0, self._next_try.get(peer, 0.0) - (time.monotonic() if now_s is None else now_s))

    def peer_ok(self, peer: str) -> None:
        self._failures.pop(peer, None)
        self._next_try.pop(peer, None)

    def peer_failures(self, peer: str) -> int:
        return self._failures.get(peer, 0)

    def gives_up(self, attempts: int, age_s: float) -> bool:
        """True when a study has failed transiently ``attempts`` times or for ``age_s`` seconds: ``dead``."""
        return attempts >= self.max_attempts or age_s >= self.max_age_s
