"""The transfer between gateways, shared parts and the receiver's side: what a send returns, the ports of the
sender, the receiver's admission policy and its delivery receipts. The sender's dispatcher is
``gateway.dispatch``.

Receiver side (:class:`InboundPolicy`): offers only from allowed peers (refused ``forbidden`` from memory,
counted in memory and audited once per sender and minute with a count, ``gateway.refusals``) that the admin has not set to "send only", whose certificate is
the one pinned for them (``not-authorized``, audited; without a pin only when ``require_e2e`` is off), up
to ``max_study_bytes`` (``not-acceptable``), and at most ``max_inbound`` at once (``resource-constraint``,
and the agent shows ``dnd`` while full), plus ``stat_reserve`` more for STAT offers; and only while the spool
can take the study and keep ``[paths] spool_reserve_mb`` free for the site's own modalities, counting what the
streams under way still bring (``resource-constraint``: the sender waits and offers it again).
Nothing said to the peer over the XMPP server names a study: receipts and verdicts refer to the bundle by
the SHA-256 of its manifest, and their texts are redacted (``gateway.pins.redact``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.claims import Claims
from gateway.directory import PeerDirectory
from gateway.lifecycle import State
from gateway.pins import pin_set, redact
from gateway.refusals import RefusalLog
from gateway.store import QueueStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Receipt:
    """The receiving gateway's word that its PACS holds a study (or refused it for good)."""

    study_instance_uid: str
    bundle_sha256: str  # SHA-256 of the bundle manifest: names exactly which instances and bytes
    instances: int
    delivered: bool
    detail: str = ""


class ReceiptPort(Protocol):
    def peer_online(self, bare_jid: str) -> str | None: ...
    def send_receipt(self, peer_full_jid: str, receipt: Receipt) -> Awaitable[tuple[bool, str]]: ...


@dataclass
class SendOutcome:
    ok: bool
    method: str = ""
    offset: int = 0
    bytes_sent: int = 0
    detail: str = ""
    attempts: list[dict[str, Any]] = field(default_factory=list)
    suspended: bool = False  # the stream gave way to a STAT transfer (:class:`StreamSuspended`): not a failure


class StreamSuspended(Exception):
    """Raised by a routine stream's block source when a STAT transfer needs the link: the transport aborts
    the stream (a TCP reset, so that none of its bytes stay queued in buffers along the path ahead of the
    STAT study's), the attempt ends ``suspended`` (not a failure) and the unit is offered again once STAT
    is done, resuming at the receiver's offset."""


class SenderPort(Protocol):
    online: bool

    def peer_availability(self, bare_jid: str, priority: str = "routine") -> tuple[str | None, str]: ...

    def send_bundle(
        self,
        peer_full_jid: str,
        size: int,
        manifest_sha256: str,
        stream_from: Callable[[int, bool], Iterator[bytes]],
        progress: Callable[[int, str], None],
        priority: str = "routine",
    ) -> Awaitable[SendOutcome]: ...


class InboundPolicy:
    """Which offers the receiving gateway accepts (thread-safe counter of active inbound transfers).

    :meth:`screen` decides from memory alone (the peer directory, the pins, maintenance) and notes its
    refusals in the :class:`RefusalLog`: it is what the event loop runs for every offer, so a flood from a
    stranger costs no I/O. :meth:`authorize` adds what needs the database (a bundle already here, the
    stream claim, the audit of an admission) and runs on a worker thread."""

    def __init__(self, store: QueueStore, directory: PeerDirectory, max_study_bytes: int, max_inbound: int,
                 on_capacity: Callable[[bool], None] | None = None, require_e2e: bool = True,
                 claims: Claims | None = None, stat_reserve: int = 1, refusals: RefusalLog | None = None,
                 free_bytes: Callable[[], int] | None = None, reserve_bytes: int = 0) -> None:
        self.store = store
        self.directory = directory
        self.refusals = refusals or RefusalLog()
        self.claims = claims
        self.stat_reserve = stat_reserve  # admissions kept for STAT offers beyond max_inbound
        self.require_e2e = require_e2e
        self.max_study_bytes = max_study_bytes
        self.max_inbound = max_inbound
        self.on_capacity = on_capacity
        self.active = 0
        self.free_bytes = free_bytes  # the spool's free space now (None: not checked)
        self.reserve_bytes = reserve_bytes
        self._incoming: dict[str, list[int]] = {}  # per bundle admitted: the bytes each admission may still bring
        self.maintenance: str | None = None  # the admin's maintenance text while it is on (gateway.maintenance)
        self._lock = threading.Lock()

    def screen(self, peer_bare: str, bundle_sha256: str = "", cert_sha256: str | None = None) -> tuple[str, str] | None:
        """From memory only (no I/O): None to go on to :meth:`authorize`, else (stanza condition, text)."""
        bundle = bundle_sha256[:12] or "?"
        if not self.directory.allowed(peer_bare):
            if self.directory.stale():
                self.directory.refresh_soon()  # a peer just added by another process is known within a second
            self.refusals.note("offer_refused", peer_bare, f"offer from {peer_bare}: not an allowed peer")
            return "forbidden", f"{peer_bare} is not an allowed peer of this gateway"
        config = self.directory.config(peer_bare)
        if config is not None and config.allowed and not config.may_receive_from:
            self.refusals.note("offer_refused", peer_bare, f"offer from {peer_bare}: this gateway only sends to it")
            return "forbidden", f"this gateway does not take studies from {peer_bare} (it only sends to it)"
        if self.maintenance is not None:
            return "resource-constraint", f"busy: {self.maintenance}"
        refusal = self._check_pin(peer_bare, cert_sha256)
        if refusal is not None:
            self.refusals.note("e2e_refused", peer_bare, f"offer of bundle {bundle} from {peer_bare}: {refusal}")
            return "not-authorized", refusal
        return None

    def authorize(self, peer_bare: str, size: int, bundle_sha256: str = "", cert_sha256: str | None = None,
                  priority: str = "routine") -> tuple[str, str] | None:
        """None to admit (then :meth:`release` must follow on every path), else (stanza condition, text).
        ``cert_sha256``: the fingerprint of the certificate the offer carries (None: a plaintext offer).
        A ``stat`` offer may take one of the ``stat_reserve`` admissions kept beyond ``max_inbound``.
        Reads and writes the database: call it off the event loop, after :meth:`screen`."""
        refusal = self.screen(peer_bare, bundle_sha256, cert_sha256)
        if refusal is not None:
            return refusal
        bundle = bundle_sha256[:12] or "?"
        held = self.store.inbound_bundle_state(peer_bare, bundle_sha256) if bundle_sha256 else None
        if held is not None:
            unit_id, state = held
            if state in (State.DELIVERED.value, State.FAILED.value):
                self.store.resend_receipt(unit_id, f"{peer_bare} offered bundle {bundle_sha256[:12]} again: receipt sent again")
            self.store.audit("offer_refused", f"bundle {bundle} from {peer_bare}: already here ({state})", unit_id)
            return "conflict", f"already received here (unit {unit_id}, {state}); the receipt follows"
        if size < 0 or size > self.max_study_bytes:
            self.store.audit("offer_refused", f"offer of bundle {bundle} from {peer_bare}: {size} bytes over the limit")
            return "not-acceptable", f"study of {size} bytes exceeds this gateway's limit of {self.max_study_bytes}"
        limit = self.max_inbound + (self.stat_reserve if priority == "stat" else 0)
        free = need = 0
        if self.free_bytes is not None:
            need = max(0, size - self.store.bytes_held(peer_bare, bundle_sha256)) if bundle_sha256 else size
            try:
                free = self.free_bytes()
            except OSError as exc:
                return "resource-constraint", f"busy: the spool's free space cannot be read ({exc.strerror})"
        short = ""
        with self._lock:
            if self.active >= limit:
                return "resource-constraint", f"busy: {self.active} inbound transfer(s) running"
            if self.free_bytes is not None:
                coming = sum(sum(amounts) for amounts in self._incoming.values())
                if free - coming - need < self.reserve_bytes:
                    short = _space_text(free, coming, need, self.reserve_bytes)
                else:
                    self._incoming.setdefault(bundle_sha256, []).append(need)
            if not short:
                self.active += 1
                full = self.active >= self.max_inbound
        if short:
            self.store.audit("offer_refused", f"offer of bundle {bundle} from {peer_bare}: {short}")
            log.warning("refused an offer of bundle %s from %s: %s", bundle, peer_bare, short)
            return "resource-constraint", f"busy: {short}"
        # Admitted from here: a database that fails below (unreachable, read-only, its disk full) must not keep
        # the admission and the space counted for it, or each refused offer would leave B one slot shorter,
        # until it answered every offer "busy" for good once the database was back.
        claimed = False
        try:
            holder = self.claims.claim_stream(bundle_sha256, peer_bare) if self.claims and bundle_sha256 else None
            claimed = holder is None and bool(self.claims and bundle_sha256)
            if holder is None:
                self.store.audit("offer_accepted", f"{'STAT ' if priority == 'stat' else ''}bundle {bundle} ({size} bytes) "
                                 f"from {peer_bare}{', end-to-end encrypted' if cert_sha256 else ', NOT encrypted (require_e2e is off)'}")
        except BaseException:
            if claimed:
                with contextlib.suppress(Exception):  # the database that failed the audit may fail this too
                    self.claims.release_stream(bundle_sha256)  # type: ignore[union-attr]
            self._release_space(bundle_sha256)
            self.release()
            raise
        if holder is not None:
            self._release_space(bundle_sha256)
            self.release()
            self.store.audit("offer_refused", f"bundle {bundle} from {peer_bare}: a stream of it is running ({holder})")
            return "resource-constraint", "busy: this bundle is being received on another stream"
        if full and self.on_capacity:
            self.on_capacity(True)
        return None

    def _check_pin(self, peer_bare: str, cert_sha256: str | None) -> str | None:
        pin = self.directory.pin(peer_bare)
        if cert_sha256 is None:
            return "this gateway exchanges studies end-to-end encrypted only" if self.require_e2e or pin else None
        if pin is None:
            return (f"no certificate pinned for {peer_bare} (its SHA-256 is {cert_sha256}; verify it out of band, then "
                    f"dicomgw peers add {peer_bare} --fingerprint SHA256)") if self.require_e2e else None
        if cert_sha256 not in pin_set(pin):
            return f"certificate SHA-256 {cert_sha256} of {peer_bare} does not match the pin {pin}"
        return None

    @property
    def full(self) -> bool:
        with self._lock:
            return self.active >= self.max_inbound

    def release(self, bundle_sha256: str = "") -> None:
        """End an admission; with the bundle, its stream claim too (another stream of it may start) and the
        space it was counted for (what it wrote is on disk now: the file system's free space says it)."""
        if bundle_sha256 and self.claims is not None:
            self.claims.release_stream(bundle_sha256)
        self._release_space(bundle_sha256)
        with self._lock:
            was_full = self.active >= self.max_inbound
            self.active = max(0, self.active - 1)
        if was_full and self.on_capacity:
            self.on_capacity(False)


    def landed(self, bundle_sha256: str, count: int) -> None:
        """``count`` bytes of an admitted stream are on disk: the free space shows them now, so they no longer
        count as admitted (a concurrent offer is measured against what the running streams still bring)."""
        with self._lock:
            amounts = self._incoming.get(bundle_sha256)
            if amounts:
                amounts[0] = max(0, amounts[0] - count)

    def _release_space(self, bundle_sha256: str) -> None:
        with self._lock:
            amounts = self._incoming.get(bundle_sha256)
            if amounts:
                amounts.pop()
                if not amounts:
                    del self._incoming[bundle_sha256]


def _space_text(free: int, coming: int, need: int, reserve: int) -> str:
    """Why an offer does not fit (no study named: this text goes to the peer through the XMPP server)."""
    mb = 10**6
    running = f", {coming / mb:,.0f} MB still to come for the transfers under way" if coming else ""
    return (f"not enough spool space here: {free / mb:,.0f} MB free{running}, {need / mb:,.0f} MB needed for this "
            f"study, {reserve / mb:,.0f} MB kept for this site's modalities")


class ReceiptSender:
    """Receiver side: tell each sender what became of its study (delivered to the PACS, or refused for good),
    repeating until the sender acknowledges; waits while the sender is offline."""

    RETRY_FIRST_S = 1.0  # a receipt the sender did not acknowledge (refused, an error, no answer) waits this long,
    RETRY_MAX_S = 30.0   # doubling up to this: every tick (0.1-1 s) again would repeat a refusal to no end

    def __init__(self, store: QueueStore, port: ReceiptPort, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.port = port
        self._clock = clock
        self._backoff: dict[int, tuple[float, float]] = {}  # unit id -> (not before, the next wait)

    async def tick(self) -> int:
        sent = 0
        now = self._clock()
        due = await asyncio.to_thread(self.store.receipts_due)
        waiting = {unit.unit_id for unit in due}
        self._backoff = {k: v for k, v in self._backoff.items() if k in waiting}  # acknowledged meanwhile: forgotten
        for unit in due:
            if unit.unit_id in self._backoff and now < self._backoff[unit.unit_id][0]:
                continue
            peer = self.port.peer_online(unit.origin_peer or "")
            if peer is None:
                continue
            delivered = unit.state == State.DELIVERED.value
            detail = f"{unit.instances} instance(s) stored in the PACS" if delivered else (unit.error or "refused by the PACS")
            if delivered:  # which attributes were coerced on import (names only: gateway.coercion)
                coerced = [e["detail"] for e in await asyncio.to_thread(self.store.audit_entries, 20, unit.unit_id)
                           if e["event"] == "coerced"]
                if coerced:
                    detail += f"; {coerced[0]}"
            if not delivered:  # the PACS's text may name instances: not for the XMPP server's eyes
                uids = [i.sop_instance_uid for i in await asyncio.to_thread(self.store.unit_instances, unit.unit_id)]
                detail = redact(detail, unit.study_instance_uid, uids)
            receipt = Receipt(unit.study_instance_uid, unit.bundle_sha256 or "", unit.instances, delivered, detail)
            ok, detail = await self.port.send_receipt(peer, receipt)
            if ok:
                sent += 1
                self._backoff.pop(unit.unit_id, None)
                await asyncio.to_thread(
                    self.store.receipt_acknowledged, unit.unit_id,
                    f"{'delivery' if delivered else 'failure'} receipt to {peer}: {detail}",
                )
            else:
                wait = self._backoff.get(unit.unit_id, (0.0, self.RETRY_FIRST_S))[1]
                self._backoff[unit.unit_id] = (self._clock() + wait, min(wait * 2, self.RETRY_MAX_S))
                log.warning("receipt for unit %s to %s not acknowledged: %s (again in %g s)", unit.unit_id, peer, detail, wait)
        return sent
