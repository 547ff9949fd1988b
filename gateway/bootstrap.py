"""The composition root: the one place that wires the edges (adapters) to the core and runs them.

``Gateway(settings)`` builds everything without side effects; ``await gateway.run(stop)`` upgrades the DB,
recovers the spool, starts the SCP and the watched folder, ticks the completeness check, and on ``stop``
shuts every part down in reverse order. ``run_forever(settings)`` adds SIGINT/SIGTERM handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from adapters.dicom_files import inspect_part10_file, read_tags
from adapters.dicom_scp import StorageSCP
from adapters.dicom_scu import EchoResult, echo
from adapters.folder_watch import FolderWatcher
from adapters.inbox import InboundBundle
from adapters.pacs import PacsClient, StreamingImport
from adapters.spool import Spool
from adapters.xmpp.agent import GatewayAgent
from adapters.xmpp.agent import XmppSettings as AgentSettings
from adapters.xmpp.e2e import (
    Identities,
    Identity,
    ensure_identity,
    load_identities,
)
from adapters.xmpp.stanzas import NS_IBB, NS_S5B
from gateway.claims import Claims
from gateway.coercion import Coercer
from gateway.commitment import CommitmentService
from gateway.directory import PeerDirectory
from gateway.dispatch import Dispatcher
from gateway.importing import ImportService
from gateway.maintenance import Maintenance, maintenance
from gateway.model import IngestResult
from gateway.mpps import MppsService
from gateway.outage import DatabaseOutage, unreachable
from gateway.processes import BEAT_S, Heartbeat
from gateway.receiving import Inbound
from gateway.refusals import RefusalLog
from gateway.retention import RowArchiver, SpoolCleaner
from gateway.retry import RetryPolicy
from gateway.routing import Router, Rules, StudyFacts
from gateway.service import CompletenessService, IngestService
from gateway.settings import Settings
from gateway.store import QueueStore, make_engine, upgrade_schema, utcnow
from gateway.terminal import plain
from gateway.transfer import (
    InboundPolicy,
    ReceiptSender,
)
from gateway.windows import local_clock, local_zone

log = logging.getLogger(__name__)
SPOOL_LOW_STATUS = "busy: spool space below the reserve kept for this site's modalities"
STABLE_SLACK_S = 0.02  # a study is looked at this long after it may have become stable (clocks, stamping)

__all__ = ["EchoResult", "Gateway", "GatewayController", "echo", "run_forever"]


def identity_paths(settings: Settings) -> tuple[Path, Path]:
    """Key and certificate files; a relative path (settings built in code) sits beside the spool."""
    base = settings.paths.spool_dir.parent
    x = settings.xmpp
    return tuple(p if p.is_absolute() else base / p for p in (x.identity_key_file, x.identity_cert_file))  # type: ignore[return-value]


def load_identity(settings: Settings) -> tuple[Identity, bool]:
    """This gateway's end-to-end identity, made on first use: (identity, created)."""
    key_path, cert_path = identity_paths(settings)
    return ensure_identity(key_path, cert_path, _common_name(settings))


def _common_name(settings: Settings) -> str:
    return settings.xmpp.jid.split("/")[0] or settings.dicom.ae_title


def load_all_identities(settings: Settings) -> tuple[Identities, bool, str | None]:
    """The current identity and, during a rotation's overlap, the previous one: (identities, created, the
    fingerprint of a previous one retired now that its overlap ended)."""
    key_path, cert_path = identity_paths(settings)
    return load_identities(key_path, cert_path, _common_name(settings))


def rotate_keys(settings: Settings, overlap_s: float) -> tuple[Identities, str]:
    """`dicomgw keys rotate`: a new identity, the old one usable for ``overlap_s`` (audited by the caller)."""
    from adapters.xmpp.e2e import rotate_identity

    key_path, cert_path = identity_paths(settings)
    return rotate_identity(key_path, cert_path, _common_name(settings), overlap_s)


def facts_from_file(path: str | Path, source: str, tag_keys: tuple[str, ...]) -> StudyFacts:
    """What routing sees of a study whose first instance is this Part-10 file (``dicomgw route test``)."""
    header = inspect_part10_file(Path(path))
    return StudyFacts(source, (header.modality,) if header.modality else (), read_tags(Path(path), tag_keys))



class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.queue.db_url)
        self.store = QueueStore(self.engine)
        self.claims = Claims(self.engine, lease_s=settings.queue.lease_s)
        self.spool = Spool(settings.paths.spool_dir, settings.paths.quarantine_dir)
        self.ingest = IngestService(self.store, self.spool)
        self.completeness = CompletenessService(self.store, settings.queue.stable_age_s,
                                                pause_s=settings.queue.association_pause_s)
        self.instances_stored = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pacs = PacsClient(settings.pacs, settings.paths.spool_dir) if settings.pacs.enabled else None
        self.coercer = Coercer(settings.coerce)  # [[import.coerce]]: identities reconciled on import
        self.importer = (
            ImportService(self.store, self.pacs, settings.pacs, self._outcome_threadsafe, claims=self.claims,
                          coercer=self.coercer, make_transform=self._coerce_transform)
            if self.pacs is not None else None
        )
        self.outage = DatabaseOutage()  # the queue database away while running: said once, the gateway goes on
        self.refusals = RefusalLog()  # refusals counted in memory, written once a second (gateway.refusals)
        self._watcher_health: str | None = None  # the watcher's health as last written (``_record_watcher``)
        self.cleaner = SpoolCleaner(self.store, self.spool, settings.retention.keep_delivered_s)
        self.archiver = RowArchiver(self.store, settings.retention.keep_rows_days, settings.retention.keep_delivered_s)
        self.mpps = MppsService(self.store, settings.dicom.on_discontinued)
        self.commitments = CommitmentService(self.store, settings.dicom.commit_when, settings.dicom.commit_timeout_s,
                                             self._send_commitment_report)
        self.scp = StorageSCP(
            settings.dicom, self.ingest, self.spool, self._audit, self._stored_threadsafe,
            on_commitment=self.importer.commitment_result if self.importer else None, refused=self.refusals.note,
            on_commit_request=self._commit_request, on_commit_reported=self.store.commitment_reported,
            on_mpps=self._mpps, feeds=self.completeness,
        )
        self.watcher = (
            FolderWatcher(
                settings.paths.watch_dir,
                self.ingest,
                self.spool,
                self._audit,
                settle_s=settings.watch.settle_s,
                scan_interval_s=settings.watch.scan_interval_s,
                on_stored=self._stored_threadsafe,
            )
            if settings.paths.watch_dir
            else None
        )

        self.agent: GatewayAgent | None = None
        self.identity: Identity | None = None
        self.dispatcher: Dispatcher | None = None
        self.inbound_policy: InboundPolicy | None = None
        self.receipts: ReceiptSender | None = None
        self._receipts_due = asyncio.Event()
        self._dispatch_due = asyncio.Event()  # set when a unit became stable: dispatch without waiting
        # When each study unit fed here may become stable: its last instance's time + the stable age. A newer
        # instance moves its unit's time later (a tick at the earlier one would find it still growing).
        self._stable_dues: dict[int, float] = {}
        self._main_wake = asyncio.Event()  # an earlier wake-up of the main loop than it sleeps until
        self._main_wake_at = math.inf
        self._wake_pending = False
        self._dues_lock = threading.Lock()  # the dues are noted on the storing threads, read on the loop
        self._maintenance = Maintenance(False)
        self._spool_low = False  # the spool's free space below the reserve: our presence says so (_check_spool_room)
        self.directory = PeerDirectory(self.store.peer_configs, settings.xmpp.peers, settings.xmpp.pin_for,
                                       self.store.signing_pins)
        self.web: Any = None  # adapters.web.WebServer while [web] port is set
        self._xmpp_refused: dict[str, Any] | None = None  # the last refusal until the session is online again
        self._beat_due = asyncio.Event()  # the XMPP state changed: beat now, not in up to BEAT_S
        self.heartbeat = Heartbeat(self.store, self.claims.owner, utcnow)  # gateway.processes: `dicomgw status`

    def _build_xmpp(self) -> None:
        """On the running loop: slixmpp binds to the event loop current at construction."""
        x = self.settings.xmpp
        methods = tuple({"s5b": NS_S5B, "ibb": NS_IBB}[m] for m in x.methods)
        identities, created, retired = load_all_identities(self.settings)
        self.identity = identities.current
        if created:
            self._audit("identity_created", f"new end-to-end identity, certificate SHA-256 {self.identity.fingerprint}")
        self._identities_retired(retired)
        log.info("end-to-end identity: certificate SHA-256 %s%s", self.identity.fingerprint,
                 f" (and the previous one, {identities.previous.fingerprint}, until {identities.previous_until:%Y-%m-%d %H:%M} UTC)"
                 if identities.previous is not None else "")
        self._identity_files = self._identity_stamp()
        self.inbound_policy = InboundPolicy(
            self.store, self.directory, x.max_study_bytes, x.max_inbound, on_capacity=self._capacity_changed,
            require_e2e=x.require_e2e, claims=self.claims, stat_reserve=x.stat_reserve, refusals=self.refusals,
            free_bytes=self.spool.free_bytes, reserve_bytes=self.settings.paths.spool_reserve_bytes,
        )
        self.agent = GatewayAgent(
            AgentSettings(
                jid=x.jid, password=x.password, host=x.host, port=x.port, use_tls=x.use_tls, methods=methods,
                ibb_block_bytes=x.ibb_block_bytes, ibb_window=x.ibb_window, verdict_timeout_s=x.verdict_timeout_s,
                s5b_idle_timeout_s=x.s5b_idle_timeout_s, ibb_idle_timeout_s=x.ibb_idle_timeout_s,
                proxy_address=_host_port(x.s5b_proxy) if x.s5b_proxy else None,
                ca_file=str(x.ca_file) if x.ca_file else "", server_cert_sha256=x.server_cert_sha256,
                identity=self.identity, require_e2e=x.require_e2e, stream_start_timeout_s=x.stream_start_timeout_s,
                handshake_timeout_s=x.handshake_timeout_s,
                compress=x.compress, servers=x.servers, dns_servers=x.dns_servers, reconnect_s=x.reconnect_s,
                presence_min_interval_s=x.presence_min_interval_s,
            ),
            Inbound(self),
        )
        self.agent.identities = identities
        domain = x.jid.split("@", 1)[1].split("/", 1)[0]
        rules = Rules(self.settings.routing.rules, self.settings.routing.default_destination)
        for warning in rules.warnings():
            log.warning("routing: %s", warning)
        router = Router(rules, domain, self.store, self.settings.paths.spool_dir, read_tags, self.store.peer_configs)
        self.dispatcher = Dispatcher(
            self.store, self.settings.paths.spool_dir, self.agent, router,
            policy=RetryPolicy(base_s=x.retry_base_s, cap_s=x.retry_max_s, max_attempts=x.retry_max_attempts,
                               max_age_s=x.retry_max_age_s),
            receipt_timeout_s=x.receipt_timeout_s, max_sends=x.max_sends, claims=self.claims,
            peer_configs=self.store.peer_configs, wake=self._dispatch_due.set,
            clock=functools.partial(local_clock, local_zone(self.settings.routing.timezone)),
            deidentify=self._deidentify,
        )
        self.receipts = ReceiptSender(self.store, self.agent)

    def pin_for(self, peer_jid: str) -> str | None:
        """The peer's pinned certificate: `dicomgw peers add --fingerprint` first, then the TOML file (from
        memory: ``gateway.directory``)."""
        return self.directory.pin(peer_jid)

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        """Renew this process's leases every ``lease_s / 4`` on a thread of their own: a slow tick or a busy
        worker pool (progress writes, imports, receipts on a loaded machine) must never delay the renewal past
        the lease, or another process would take over a unit this one is still sending (seen with 3 processes,
        a 4 s lease and a CPU hog: 'illegal study state move queued -> sending')."""
        from concurrent.futures import ThreadPoolExecutor

        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease-heartbeat") as pool:
            while not stop.is_set():
                try:
                    await loop.run_in_executor(pool, self.claims.heartbeat)
                except Exception as exc:  # the database away for a moment: the next beat tries again
                    self.outage.failed("lease heartbeat", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.queue.lease_s / 4)

    def describe(self) -> dict[str, Any]:
        """This process as its heartbeat row shows it (on the loop: the agent's status is the loop's)."""
        scp = f"{self.settings.dicom.host}:{self.scp.port}" if self.scp.listening else None
        tls = f"{self.settings.dicom.host}:{self.scp.tls_port}" if self.scp.tls_port else None
        web = f"{self.web.host}:{self.web.port}" if self.web is not None else None
        watcher = self.watcher.health() if self.watcher is not None else None
        xmpp: dict[str, Any] = {}
        if self.agent is not None:
            keys = ("state", "jid", "server", "tls", "tls_version", "server_cert_sha256", "last_error")
            xmpp = {k: self.agent.status.get(k) for k in keys}
            if xmpp["state"] not in ("online", "refused") and self._xmpp_refused is not None:
                # Retrying after a refusal (bad certificate, wrong password): the refusal is what an admin must
                # see, not the 'connecting' of each retry.
                xmpp = {**{k: self._xmpp_refused.get(k) for k in keys}, "retrying": True}
        return {"listeners": {"dicom": scp, "dicom_tls": tls, "web": web, "watcher": watcher}, "xmpp": xmpp}

    async def _beat_loop(self, stop: asyncio.Event) -> None:
        """This process's heartbeat row every ``BEAT_S`` (``gateway.processes``), written on a thread of its own."""
        from concurrent.futures import ThreadPoolExecutor

        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="process-heartbeat") as pool:
            with contextlib.suppress(Exception):
                await loop.run_in_executor(pool, self.heartbeat.prune)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):  # every BEAT_S, or at once when the XMPP state changed
                    await asyncio.wait_for(self._beat_due.wait(), BEAT_S)
                self._beat_due.clear()
                try:
                    await loop.run_in_executor(pool, self.heartbeat.beat, self.describe())
                except Exception as exc:
                    self.outage.failed("process heartbeat", exc)
                else:
                    self.outage.answered()  # the heartbeat's row committed: the database takes writes

    def _identity_stamp(self) -> tuple[float, ...]:
        """The identity files' modification times: a change (`dicomgw keys rotate`) is picked up within a second."""
        from adapters.xmpp.e2e import previous_paths

        key_path, cert_path = identity_paths(self.settings)
        stamps = []
        for path in (key_path, cert_path, *previous_paths(key_path, cert_path)):
            try:
                stamps.append(path.stat().st_mtime)
            except OSError:
                stamps.append(0.0)
        return tuple(stamps)

    def _identities_retired(self, retired: str | None) -> None:
        if retired is not None:
            self._audit("identity_retired", f"the previous end-to-end certificate SHA-256 {retired} is retired: its "
                        f"overlap ended (its key is removed; peers still pinning it must pin the new one)")
            log.warning("previous end-to-end identity %s retired: its overlap ended", retired)

    def _check_identities(self) -> None:
        """Off the loop, each second: a rotation (new files) or the end of an overlap is taken over by the
        running agent at once, without a restart and without cutting a stream."""
        if self.agent is None or self.identity is None:
            return
        until = self.agent.identities.previous_until if self.agent.identities is not None else None
        stamp = self._identity_stamp()
        if stamp == self._identity_files and (until is None or utcnow().replace(tzinfo=datetime.UTC) < until):
            return
        identities, _created, retired = load_all_identities(self.settings)
        self._identity_files = self._identity_stamp()
        self._identities_retired(retired)
        if identities != self.agent.identities:
            log.warning("end-to-end identity now SHA-256 %s%s", identities.current.fingerprint,
                        f" (previous {identities.previous.fingerprint} until {identities.previous_until:%Y-%m-%d %H:%M} UTC)"
                        if identities.previous is not None else "")
            self.identity = identities.current
            if self._loop is not None:
                self._loop.call_soon_threadsafe(setattr, self.agent, "identities", identities)

    async def _refusal_loop(self, stop: asyncio.Event) -> None:
        """Each second, off the loop: refusals counted in memory go to the audit log, the peer table is re-read,
        the identity files looked at."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            try:
                await asyncio.to_thread(self.flush_refusals)
                await asyncio.to_thread(self.directory.refresh)
                await asyncio.to_thread(self._check_identities)
            except Exception as exc:  # a database hiccup must not end the loop; the counts wait for the next second
                self.outage.failed("writing refusal counts", exc)

    def flush_refusals(self) -> None:
        self.refusals.flush_quiet()
        tallies = self.refusals.drain()
        try:
            self.store.audit_counts([(t.event, t.key, t.detail, t.count) for t in tallies])
        except Exception:
            self.refusals.restore(tallies)  # written at the next flush
            raise

    def _capacity_changed(self, _full: bool) -> None:
        """Admissions and releases come from several threads: the presence shown is decided on the loop from
        the count as it is then, so a late 'full' can never outlive the release that followed it."""
        if self.agent is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._show_capacity)

    def _show_capacity(self) -> None:
        """The presence: ``dnd`` with the admin's message in maintenance, ``dnd`` busy at the inbound limit."""
        if self.agent is not None and self.inbound_policy is not None:
            if self._maintenance.on:
                self.agent.set_busy(True, self._maintenance.status_text)
                return
            if self._spool_low:
                self.agent.set_busy(True, SPOOL_LOW_STATUS)
                return
            full = self.inbound_policy.full
            self.agent.set_busy(full, "busy: at the inbound transfer limit" if full else "ready")

    def _check_maintenance(self) -> None:
        """Each tick: follow `dicomgw maintenance on|off` (a row shared by every process of this gateway)."""
        now = maintenance(self.store)
        if now != self._maintenance:
            self._maintenance = now
            if self.inbound_policy is not None:
                self.inbound_policy.maintenance = now.status_text if now.on else None
            log.warning("maintenance %s%s", "on" if now.on else "off", f": {now.message}" if now.message else "")
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._show_capacity)

    def _check_spool_room(self) -> None:
        """Each tick: with the spool's free space below ``[paths] spool_reserve_mb`` no peer's study can be taken
        (the admission refuses each offer busy). The presence then says so (``dnd``), so that the peers wait by
        presence instead of each offering again at every backoff step (a region's hub has hundreds of peers);
        flipped only when the state changes (``FlowControl`` spaces the presences)."""
        if self.agent is None or self._loop is None:
            return
        try:
            low = self.spool.free_bytes() < self.settings.paths.spool_reserve_bytes
        except OSError:
            return  # unreadable: the admission says so per offer (and `dicomgw status`)
        if low != self._spool_low:
            self._spool_low = low
            log.warning("spool space %s: peers' studies %s", "below the reserve" if low else "back above the reserve",
                        "wait (presence dnd)" if low else "are taken again")
            self._loop.call_soon_threadsafe(self._show_capacity)

    def _record_watcher(self) -> None:
        """The watched folder's health for `dicomgw status` (a row, written when it changes)."""
        if self.watcher is None:
            return
        health = json.dumps(self.watcher.health())
        if health != self._watcher_health:
            self.store.set_runtime_status("watcher", health)
            self._watcher_health = health

    def _commit_request(self, calling_ae: str, address: str, transaction_uid: str, refs: list[tuple[str, str]],
                        here: bool) -> tuple[int, object]:
        """A modality's Storage Commitment request (association thread): recorded, then decided at once when the
        report may go on the same association; else ``commitments.tick`` reports it (a new association)."""
        on_this = here and self.settings.dicom.commit_when == "stored"
        # The report goes on this association; should the modality not answer it, a new one in 30 s (not before:
        # the tick must not find the request due while this association reports it).
        request_id = self.store.add_commitment_request(
            transaction_uid, calling_ae, address, refs, utcnow() + datetime.timedelta(seconds=30) if on_this else None)
        if not on_this:
            return request_id, None
        request = {"id": request_id, "refs": refs, "result": None, "requested_at": utcnow(), "attempts": 0}
        return request_id, self.commitments.decision(request)

    def _mpps(self, creating: bool, calling_ae: str, sop_instance_uid: str, message: Any) -> tuple[int, str]:
        """An MPPS N-CREATE or N-SET (association thread); a completed step is settled at once, not at the tick."""
        answer = (self.mpps.create if creating else self.mpps.set)(calling_ae, sop_instance_uid, message)
        if answer[0] == 0 and not creating and message.status in ("COMPLETED", "DISCONTINUED"):
            if self.mpps.tick() and self._loop is not None:
                self._loop.call_soon_threadsafe(self._dispatch_due.set)  # offered now, not at the next tick
        return answer

    def open_bundle(self, peer_jid: str, bundle_key: str, size: int, on_file: Callable[..., None] | None) -> InboundBundle:
        """The receiving side's inbox (``gateway.receiving``): an inbound bundle into the spool and the queue."""
        return InboundBundle(self.spool, self.ingest, peer_jid, bundle_key, size, on_file=on_file)

    def early_import(self) -> EarlyImport | None:
        """The PACS's streaming import, fed file by file while a bundle arrives (None without a PACS)."""
        return EarlyImport(self.pacs) if self.pacs is not None else None

    def _deidentify(self, unit: Any, manifest: Any, paths: list[Path], rule: Any) -> Any:
        """A rule's ``deidentify = "basic"`` (worker thread): de-identified copies under spool/outbox/<unit>/."""
        from adapters.dicom_deid import deidentify_bundle, secret

        key = secret(identity_paths(self.settings)[0].with_name("deid.key"))
        return deidentify_bundle(manifest, paths, self.settings.paths.spool_dir / "outbox" / str(unit.unit_id), key,
                                 rule.deid_options, rule.allow_burned_in, self.settings.dicom.ae_title)

    def _coerce_transform(self, coercion: Any, peer_jid: str) -> Callable[[Any], bytes]:
        from adapters.dicom_coerce import coerce_file

        spool = self.settings.paths.spool_dir
        return lambda instance: coerce_file(spool / instance.spool_path, coercion, self.settings.dicom.ae_title, peer_jid)

    def _send_commitment_report(self, request: dict, decision: Any) -> str:
        from adapters.dicom_commit import send_report

        modality = self.settings.dicom.modality(request["calling_ae"])
        if modality is None:
            raise LookupError(f"no [[dicom.modalities]] entry for AE title {request['calling_ae']!r}: nowhere to "
                              f"send its Storage Commitment report")
        d = self.settings.dicom
        return send_report(modality, d.ae_title, request["transaction_uid"], decision, d.network_timeout_s,
                           (d.tls_ca_file, d.tls_cert_file, d.tls_key_file))

    def _audit(self, event_name: str, detail: str) -> None:
        self.store.audit(event_name, detail)

    def _stored_threadsafe(self, result: IngestResult) -> None:
        """An instance was stored (an association's or the watcher's thread). Its study may be stable one stable
        age from now: the main loop wakes then, not at its next interval. The due is noted here, under a lock;
        the loop is woken only when it sleeps past it (at most one wake-up pending), not for every instance (a
        wake-up per instance took the GIL from the storing thread 400 times a push)."""
        due = time.monotonic() + self.settings.queue.stable_age_s + STABLE_SLACK_S
        with self._dues_lock:
            self.instances_stored += 1
            self._stable_dues[result.unit_id] = due  # one per unit, however many instances it is fed
            wake = due < self._main_wake_at and not self._wake_pending
            if wake:
                self._wake_pending = True
        if wake and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake_main)

    def _wake_main(self) -> None:
        with self._dues_lock:
            self._wake_pending = False
        self._main_wake.set()

    async def _until_next_tick(self, stop: asyncio.Event, ticked_at: float) -> None:
        """Sleep until the next tick of the main loop: ``stable_check_interval_s`` after the last, or sooner when
        a stored instance's study may become stable (its time + ``stable_age_s``). Instances stored meanwhile
        only move their unit's wake-up later; they never run a tick of their own: while a study is fed, the
        loop wakes at its last due, finds it moved, and sleeps on (ticking at every instance's due, 50 a
        second, slowed a 400-instance push by ~0.2 s: each tick reads and writes the queue)."""
        with self._dues_lock:
            for unit, due in list(self._stable_dues.items()):
                if due <= ticked_at:
                    del self._stable_dues[unit]  # that tick saw it
        end = ticked_at + self.settings.queue.stable_check_interval_s
        while not stop.is_set():
            with self._dues_lock:  # a due noted after this, earlier than wake_at, wakes the loop (_wake_main)
                wake_at = min(end, min(self._stable_dues.values(), default=end))
                self._main_wake_at = wake_at
            timeout = wake_at - time.monotonic()
            if timeout <= 0:
                break
            self._main_wake.clear()
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._main_wake.wait())]
            try:
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
        with self._dues_lock:
            self._main_wake_at = math.inf

    def kick_import(self) -> None:
        """A bundle was verified and stored: start its import now instead of at the next tick (any thread)."""
        if self.importer is not None:
            self.importer.tick()

    def _outcome_threadsafe(self, unit_id: int) -> None:
        """An import ended (delivered or refused): send the receipt now instead of at the next tick."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._receipts_due.set)

    async def run(self, stop: asyncio.Event, ready: Callable[[], None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(upgrade_schema, self.engine)
        await asyncio.to_thread(self.directory.refresh)
        refusals = asyncio.ensure_future(self._refusal_loop(stop))
        heartbeat = asyncio.ensure_future(self._heartbeat_loop(stop))
        beats: asyncio.Future[None] | None = None  # from when every listener runs (a first beat says so)
        ended: BaseException | None = None
        try:  # what cannot start ends here with its reason in the process's row too (`dicomgw status`)
            for key, path in self.settings.files_to_read():  # named here, not as an ssl error without a file name
                with _starting(f"{key} {path} cannot be read"):
                    path.open("rb").close()
            if self.settings.xmpp.enabled:
                with _starting("the XMPP side cannot be set up (end-to-end identity, TLS)", ValueError):
                    self._build_xmpp()
            await asyncio.to_thread(self._recover)
            paths, dicom = self.settings.paths, self.settings.dicom
            with _starting(f"the spool {paths.spool_dir} (quarantine {paths.quarantine_dir}) cannot be used"):
                kept_at_start = self.spool.start()
            for kept in kept_at_start:
                self._audit("quarantined", f"recovered at start-up: {kept}")
            tls = f" or its TLS port {dicom.tls_port} (tls_cert_file, tls_key_file)" if dicom.tls_port else ""
            with _starting(f"the DICOM port {dicom.host}:{dicom.port}{tls} cannot be listened on"):
                self.scp.start()
            with _starting("the admin web page cannot start"):
                await self._start_web()
            if self.watcher is not None:
                with _starting(f"the watched folder {paths.watch_dir} cannot be used"):
                    self.watcher.start()
            await asyncio.to_thread(self.heartbeat.beat, self.describe())  # `dicomgw status`: running from here
            beats = asyncio.ensure_future(self._beat_loop(stop))
            log.info(
                "gateway ready: AE %s on %s:%s, spool %s",
                self.settings.dicom.ae_title,
                self.settings.dicom.host,
                self.scp.port,
                self.settings.paths.spool_dir,
            )
            if self.agent is not None:
                try:
                    await _unless_stopped(self.agent.start(timeout_s=30), stop)
                except TimeoutError:
                    log.error("XMPP server %s not reachable yet (%s); retrying in the background",
                              self.agent.status.get("server"), self.agent.status.get("last_error") or "no answer")
                except ConnectionRefusedError as exc:
                    log.error("XMPP server %s refused (%s); retrying with backoff, never in plaintext",
                              self.agent.status.get("server"), exc)
            if ready is not None:
                ready()
            dispatching = asyncio.ensure_future(self._dispatch_loop(stop)) if self.dispatcher else None
            next_clean = next_beat = 0.0
            while not stop.is_set():
                ticked_at = time.monotonic()
                try:
                    next_beat, next_clean = await self._tick(next_beat, next_clean)
                    self.outage.answered(wrote=False)  # a tick may only read: a disk full is over at a write
                except Exception as exc:  # the database away: said once, the gateway goes on (anything else ends it)
                    if not unreachable(exc):
                        raise
                    self.outage.failed("the gateway's tick", exc)
                await self._until_next_tick(stop, ticked_at)
            if dispatching is not None:
                dispatching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dispatching
        except BaseException as exc:
            ended = exc
            raise
        finally:
            refusals.cancel()
            heartbeat.cancel()
            if beats is not None:
                beats.cancel()
                with contextlib.suppress(BaseException):
                    await beats
            failed = ended is not None and not isinstance(ended, asyncio.CancelledError | KeyboardInterrupt)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.heartbeat.stopped, self.describe(), 1 if failed else 0,
                                        f"{type(ended).__name__}: {ended}" if failed else "")
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.flush_refusals)
            if self.web is not None:
                await self.web.stop()
            if self.agent is not None:
                await self.agent.stop()
            if self.watcher is not None:
                await asyncio.to_thread(self.watcher.stop)
            await asyncio.to_thread(self.scp.stop)
            await asyncio.to_thread(self.spool.stop)  # its fsync threads: the associations that used them are over
            self.engine.dispose()
            log.info("gateway stopped")


    async def _tick(self, next_beat: float, next_clean: float) -> tuple[float, float]:
        """One pass of the queue's periodic work; returns when the next lease recovery and clean-up are due."""
        await asyncio.to_thread(self._check_maintenance)
        await asyncio.to_thread(self._check_spool_room)
        await asyncio.to_thread(self._record_watcher)
        if time.monotonic() >= next_beat:  # lapsed leases of other processes (ours: _heartbeat_loop)
            next_beat = time.monotonic() + self.settings.queue.lease_s / 4
            await asyncio.to_thread(self._recover)
        await asyncio.to_thread(self.commitments.tick)  # Storage Commitment reports (gateway.commitment)
        if await asyncio.to_thread(self.mpps.tick):  # a step completed before its last instance came
            self._dispatch_due.set()
        if await asyncio.to_thread(self.completeness.tick):
            self._dispatch_due.set()  # offer what just became stable now, not at the next dispatch tick
        if self.importer is not None:
            await asyncio.to_thread(self.importer.tick)
        if time.monotonic() >= next_clean:
            next_clean = time.monotonic() + self.settings.retention.check_interval_s
            await asyncio.to_thread(self.cleaner.tick)
            await asyncio.to_thread(self.archiver.tick)
        return next_beat, next_clean

    async def _start_web(self) -> None:
        """The admin web page and /metrics on ``[web]`` host and port (``adapters.web``), when a port is set."""
        w = self.settings.web
        if not w.port:
            return
        from adapters.web import WebAccess, WebServer, make_app

        access = WebAccess(w.auth_user, w.auth_password_hash, str(w.tls_cert_file or ""), str(w.tls_key_file or ""),
                           str(w.client_ca_file or ""))

        def presence(jid: str) -> str:
            return self.agent.peer_availability(jid)[1] if self.agent is not None and self.agent.online else "unknown (offline)"

        app = make_app(self.store, presence, self.settings.xmpp.peers,
                       lambda: self.agent.online if self.agent is not None else None, access, w.refresh_s,
                       own_jid=self.settings.xmpp.jid or self.settings.dicom.ae_title, pin_for=self.pin_for,
                       spool_space=lambda: (self.spool.free_bytes(), self.settings.paths.spool_reserve_bytes),
                       outage=self.outage.state)
        self.web = WebServer(app, w.host, w.port, access)
        await self.web.start()

    def _recover(self) -> None:
        """Units in flight whose process is gone (its lease lapsed, or its PID on this host ended) resume."""
        for unit_id, before, after in self.store.recover_in_flight(self.claims.lapsed()):
            log.warning("unit %s was %s in a gateway process that stopped: now %s", unit_id, before, after)

    async def _dispatch_loop(self, stop: asyncio.Event) -> None:
        assert self.dispatcher is not None and self.receipts is not None
        receipts = asyncio.ensure_future(self._receipt_loop(stop))
        try:
            while not stop.is_set():
                self._dispatch_due.clear()
                try:
                    await self.dispatcher.tick()
                except Exception as exc:  # one bad tick must not stop the queue: logged, retried next tick
                    self.outage.failed("dispatch tick", exc)
                with contextlib.suppress(TimeoutError):  # every interval (backoffs, retries), or at once when woken
                    await asyncio.wait_for(self._dispatch_due.wait(), self.settings.xmpp.dispatch_interval_s)
        finally:
            receipts.cancel()
            await self.dispatcher.stop()

    async def _receipt_loop(self, stop: asyncio.Event) -> None:
        """Receipts to senders: at once when an import ends, else every dispatch interval (retries)."""
        assert self.receipts is not None and self.agent is not None
        while not stop.is_set():
            self._receipts_due.clear()
            if self.agent.online:
                try:
                    await self.receipts.tick()
                except Exception:
                    log.exception("receipt tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._receipts_due.wait(), self.settings.xmpp.dispatch_interval_s)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class EarlyImport:
    """Starts the streaming import at the first verified file of a bundle (the manifest is known by then)."""

    def __init__(self, client: PacsClient) -> None:
        self.client = client
        self.bundle: InboundBundle | None = None
        self.running: StreamingImport | None = None

    def feed(self, entry: object, path: object) -> None:
        if self.running is None and self.bundle is not None and self.bundle.manifest is not None:
            self.running = StreamingImport(self.client, self.bundle.manifest)
        if self.running is not None:
            self.running.feed(entry, path)  # type: ignore[arg-type]

    def finish(self) -> dict[str, tuple[int | None, str, str]]:
        if self.running is None:
            return {}
        outcomes = self.running.finish(timeout_s=120.0)
        self.running = None
        return {uid: (o.status, o.verdict.value, o.detail) for uid, o in outcomes.items()}



async def _unless_stopped(step: Awaitable[None], stop: asyncio.Event) -> None:
    """Await a start-up step, or give it up when ``stop`` is set meanwhile (a SIGTERM while the XMPP server does
    not answer ends the process now, not when the step's own wait of 30 s ends)."""
    task = asyncio.ensure_future(step)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return
    task.result()


class NotStarted(RuntimeError):
    """A listener or folder the gateway needs could not be had at start (a port in use, a spool path that is a
    file): what and why, in one line for the admin (``dicomgw run`` exits with it, no traceback)."""


@contextlib.contextmanager
def _starting(what: str, *also: type[Exception]) -> Iterator[None]:
    """OSError (and ``also``) inside: :class:`NotStarted` saying ``what`` and why."""
    try:
        yield
    except (OSError, *also) as exc:
        if isinstance(exc, OSError):
            where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in what else ""
            raise NotStarted(f"{what}: {exc.strerror or exc}{where}") from exc
        raise NotStarted(f"{what}: {plain(str(exc))[:300]}") from exc


def run_forever(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Gateway(settings).run(stop)

    asyncio.run(main())


class GatewayController:
    """Run a :class:`Gateway` on its own event loop in a thread (tests, the demo); ready-wait with a deadline."""

    def __init__(self, settings: Settings) -> None:
        self.gateway = Gateway(settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 30.0) -> Gateway:
        self._thread = threading.Thread(target=self._main, name="gateway", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"gateway not ready after {timeout_s} s")
        if self._error is not None:
            raise RuntimeError("gateway failed to start") from self._error
        return self.gateway

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.gateway.run(self._stop, ready=self._ready.set)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
