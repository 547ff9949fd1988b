"""The gateway's XMPP agent (slixmpp): the session, and the parts it holds, each with its own state.

One part per protocol, as slixmpp has one plugin object per XEP; each file says its contract, and the parts
use the agent only through ``common.XmppClient`` (the session's stanzas, IQs, handlers, settings, identities):
- here: connection, TLS to the server, presence, status; every handler registered in one block in ``__init__``;
- ``connection.py`` (``ServerRotation``): which server node next and when (``[xmpp] servers``, failover);
  ``srv.py``: the nodes from the domain's DNS SRV records when no node is configured;
- ``presence.py`` (``PeerPresence``, ``FlowControl``): what the peers show, and what we show;
- ``offer.py`` (``StudyOffers``): XEP-0095/0096 offers, our verdict, the delivery receipt; the inbound offers;
- ``s5b.py`` (``Socks5Bytestreams``): XEP-0065 mediated SOCKS5 bytestreams; the proxy, the inbound sockets;
- ``ibb.py`` (``InBandBytestreams``): XEP-0047 in-band bytestreams; the encrypted streams we send;
- ``e2e.py``: the end-to-end channel (mutual TLS 1.3 between the gateways inside either bytestream);
- ``stanzas.py``: the XML, declared apart from behaviour; ``common.py``: settings, ports, stream state.

Connection: STARTTLS verified against ``ca_file`` (or the system store), chain and name, optionally a pinned
server certificate (``server_cert_sha256``), then SASL SCRAM only. A server that fails verification is never
used in plaintext: the reason (unknown CA, wrong name, expired, pin) is kept in ``status`` (written through
``InboundPort.status_changed`` for `dicomgw status`) and the connection retried with backoff.
``use_tls = false`` (loopback tests only) allows PLAIN without TLS. Reconnects with backoff, answers
XEP-0199 pings, uses XEP-0198 when offered, publishes presence (``dnd`` with a status text while the inbound
side is at its limit, at most once per ``presence_min_interval_s``: ``presence.FlowControl``) and tracks every
peer's presence (``presence.PeerPresence``).

Config: the ``XmppSettings`` given to the constructor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import Any

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins.xep_0198.stream_management import MAX_SEQ as SM_MAX_SEQ
from slixmpp.xmlstream.handler import Callback, CoroutineCallback
from slixmpp.xmlstream.matcher import MatchXPath

from adapters.xmpp import attest
from adapters.xmpp.common import (
    IQ,
    InboundPort,
    StreamLost,
    TransferCut,
    XmppSettings,
    log_task_failure,
)
from adapters.xmpp.connection import ServerRotation
from adapters.xmpp.e2e import Identities, fingerprint
from adapters.xmpp.ibb import InBandBytestreams
from adapters.xmpp.offer import StudyOffers
from adapters.xmpp.presence import FlowControl, PeerPresence
from adapters.xmpp.s5b import Socks5Bytestreams
from adapters.xmpp.srv import LookupFailed, client_nodes
from adapters.xmpp.stanzas import NS_IBB, NS_RESULT, NS_S5B, NS_SI, q

log = logging.getLogger(__name__)


TLS_REASONS = (
    ("unable to get local issuer certificate", "unknown CA"),
    ("certificate signature failure", "unknown CA (a CA of the same name did not sign it)"),
    ("self-signed certificate", "self-signed server certificate (not issued by the configured CA)"),
    ("certificate has expired", "server certificate expired"),
    ("not yet valid", "server certificate not yet valid"),
    ("Hostname mismatch", "wrong host name"),
    ("IP address mismatch", "wrong host name"),
)


def tls_reason(exc: BaseException) -> str:
    """A verification failure in an operator's words, with OpenSSL's own text after it."""
    text = getattr(exc, "verify_message", "") or str(exc)
    for needle, reason in TLS_REASONS:
        if needle.lower() in text.lower():
            return f"{reason}: {text}"
    return f"TLS failed: {text}"


class GatewayAgent(slixmpp.ClientXMPP):
    """The session and the parts that hold their own state: ``servers`` (which node), ``peers`` and ``flow``
    (presence), ``s5b`` and ``ibb`` (the bytestreams), ``offers`` (offers, verdicts, receipts). The parts use
    the agent through ``common.XmppClient``; the handlers are registered here, in one block."""

    def __init__(self, settings: XmppSettings, inbound: InboundPort) -> None:
        super().__init__(settings.jid, settings.password)
        self.settings = settings
        self.inbound = inbound
        self.enable_direct_tls = False
        self.enable_starttls = settings.use_tls
        self.enable_plaintext = not settings.use_tls
        if settings.use_tls:
            context = ssl.create_default_context(cafile=settings.ca_file or None)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            self.ssl_context = context  # verified chain and name; never a fallback to plaintext
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0199", {"keepalive": True, "interval": 60, "timeout": 20})
        self.register_plugin("xep_0198")  # stream management, used when the server offers it
        if settings.use_tls:
            mechanisms = self.plugin["feature_mechanisms"]
            mechanisms.use_mechs = {"SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-512"}  # SCRAM only, over TLS only
            mechanisms.encrypted_plain = False
        else:
            self.plugin["feature_mechanisms"].unencrypted_plain = True
        # which node, when (connection.py); host "" and no servers: the nodes from DNS SRV (srv.py)
        self.servers = ServerRotation(settings.server_list(), settings.reconnect_s, from_dns=settings.from_dns)
        self.status: dict[str, Any] = {
            "state": "connecting", "server": self._server_text(), "jid": settings.jid,
            "tls": settings.use_tls, "tls_version": None, "server_cert_sha256": None, "last_error": None,
        }
        self.peers = PeerPresence()  # what the peers show (presence.py)
        self.flow = FlowControl(lambda show, status: self.send_presence(pshow=show, pstatus=status),
                                settings.presence_min_interval_s,
                                lambda delay, fn: asyncio.get_running_loop().call_later(delay, fn))  # what we show
        self._online = asyncio.Event()
        self._settled = asyncio.Event()  # online, or refused for a reason an operator must fix
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._reconnect_pending = False
        self._pending_iqs: dict[asyncio.Future[Any], Any] = {}  # answers we wait for (-> the IQ): failed on disconnect
        self.stream_managed = False  # XEP-0198 enabled by the server on this session
        # Our end-to-end identities (the previous one while a key rotation's overlap runs); replaced whole by the
        # gateway when the key files change (``Gateway._check_identities``).
        self.identities: Identities | None = Identities(settings.identity) if settings.identity is not None else None
        self.s5b = Socks5Bytestreams(self)  # XEP-0065 (s5b.py)
        self.ibb = InBandBytestreams(self)  # XEP-0047 (ibb.py)
        self.offers = StudyOffers(self, self.s5b, self.ibb)  # XEP-0095/0096, verdicts, receipts (offer.py)
        self.s5b.ends = self.ibb.ends = self.offers  # an inbound stream's end goes to its offer

        self.add_event_handler("session_start", self._on_session_start)
        self.add_event_handler("disconnected", self._on_disconnected)
        self.add_event_handler("presence", self._on_presence)
        self.add_event_handler("message", self._on_message)
        self.add_event_handler("sm_enabled", lambda _e: setattr(self, "stream_managed", True))
        self.add_event_handler("ssl_cert", self._on_server_cert)
        self.add_event_handler("ssl_invalid_chain", self._on_tls_refused)
        self.add_event_handler("failed_auth", lambda _e: self._set_status(last_error="authentication failed (SASL)"))
        self.add_event_handler("no_auth", lambda _e: self._set_status(
            last_error="no acceptable login method (SCRAM over TLS required)"))
        self.add_event_handler("connection_failed", self._on_connection_failed)
        self.register_handler(CoroutineCallback("si offer", MatchXPath(f"{IQ}/{q(NS_SI, 'si')}"), self.offers.on_offer))
        self.register_handler(CoroutineCallback("s5b", MatchXPath(f"{IQ}/{q(NS_S5B, 'query')}"), self.s5b.on_query))
        self.register_handler(Callback("ibb open", MatchXPath(f"{IQ}/{q(NS_IBB, 'open')}"), self.ibb.on_open))
        self.register_handler(Callback("ibb data", MatchXPath(f"{IQ}/{q(NS_IBB, 'data')}"), self.ibb.on_data))
        self.register_handler(Callback("ibb close", MatchXPath(f"{IQ}/{q(NS_IBB, 'close')}"), self.ibb.on_close))
        self.register_handler(Callback("verdict", MatchXPath(f"{IQ}/{q(NS_RESULT, 'result')}"), self.offers.on_verdict))
        self.register_handler(CoroutineCallback("receipt", MatchXPath(f"{IQ}/{q(NS_RESULT, 'receipt')}"),
                                                self.offers.on_receipt))

    # -- what the gateway asks of the agent (gateway.dispatch.Sender, gateway.transfer.ReceiptSender) ----------
    async def send_bundle(self, *args: Any, **kwargs: Any) -> Any:
        return await self.offers.send_bundle(*args, **kwargs)

    async def send_receipt(self, peer_full_jid: str, receipt: Any) -> tuple[bool, str]:
        return await self.offers.send_receipt(peer_full_jid, receipt)

    # -- connection -----------------------------------------------------------------------------
    async def start(self, timeout_s: float = 30.0) -> None:
        """Connect; returns when the session is up, or raises ``ConnectionRefusedError`` at once when the
        server failed verification (then retried in the background), or ``TimeoutError``."""
        self._connect_current()
        await asyncio.wait_for(self._settled.wait(), timeout_s)
        if not self.online:
            raise ConnectionRefusedError(self.status.get("last_error") or "XMPP server refused")

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await self.offers.writes_ended()  # IBB blocks taken are written before their sinks close
        self.offers.stop()  # the inbound streams end (their reading threads return), what arrived is kept
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.disconnect(), 5)

    def _set_status(self, **values: Any) -> None:
        self.status.update(values, updated_at=time.time())
        if self.status["state"] in ("online", "refused"):
            self._settled.set()
        with contextlib.suppress(Exception):  # a status that cannot be written must not stop the connection
            self.inbound.status_changed(dict(self.status))

    def _on_server_cert(self, pem_cert: str) -> None:
        der = ssl.PEM_cert_to_DER_cert(pem_cert)
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        seen = fingerprint(der)
        self._set_status(server_cert_sha256=seen, tls_version=ssl_object.version() if ssl_object is not None else None)
        pin = self.settings.server_cert_sha256
        if pin and seen != pin:
            self._set_status(state="refused", last_error=f"server certificate pin mismatch: SHA-256 {seen}, pinned {pin}")
            log.error("XMPP server %s: certificate SHA-256 %s does not match the pin %s", self.settings.host, seen, pin)
            self.abort()
            self._on_disconnected(None)

    def _on_tls_refused(self, exc: BaseException) -> None:
        reason = tls_reason(exc)
        log.error("XMPP server %s:%s refused: %s", self.settings.host, self.settings.port, reason)
        self._set_status(state="refused", last_error=reason, tls_version=None)
        self.abort()
        self._on_disconnected(None)

    async def _on_session_start(self, _event: object) -> None:
        self.flow.session_started()
        await self.get_roster()
        self._online.set()
        self.servers.connected()
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        self._set_status(state="online", bound_jid=self.boundjid.full, last_error=None,
                         tls_version=ssl_object.version() if ssl_object is not None else None)
        log.info("XMPP session up as %s", self.boundjid.full)
        if self.identities is not None:  # the first verdict or receipt signed or checked without a cold start
            self.spawn(asyncio.to_thread(attest.prepare, self.identities.all()))
        if NS_S5B in self.settings.methods:  # the proxy is named in offers (``Offer.streamhost``): know it before one
            self.spawn(self._discover_proxy_quietly())

    async def _discover_proxy_quietly(self) -> None:
        try:
            await self.s5b.discover_proxy()
        except (TransferCut, StreamLost, IqError, IqTimeout) as exc:  # the first S5B attempt looks again and says why
            log.info("no SOCKS5 proxy known yet: %s", exc)

    async def send_iq(self, iq: slixmpp.Iq, timeout_s: float | None = None) -> Any:
        """Send an IQ and wait for its answer; on a dead connection fail at once (:class:`StreamLost`)."""
        if not self.online:
            raise StreamLost(iq)
        future = iq.send(timeout=timeout_s or self.settings.iq_timeout_s)
        self.track(future, iq)
        return await future

    def track(self, future: asyncio.Future[Any], iq: Any) -> None:
        """An answer awaited (``send_iq``, IBB blocks): failed at once on disconnect."""
        self._pending_iqs[future] = iq
        future.add_done_callback(lambda f: self._pending_iqs.pop(f, None))

    def _server_text(self) -> str:
        return self.servers.describe(self.boundjid.domain)

    def _connect_current(self) -> None:
        self._set_status(state="connecting", server=self._server_text())
        if self.servers.needs_lookup:
            self.spawn(self._look_up_and_connect())
            return
        self.connect(*self.servers.current)

    async def _look_up_and_connect(self) -> None:
        """The nodes from DNS SRV, then the first of them; a failed lookup is retried as a failed node is. We
        connect to each address ourselves: slixmpp tries its SRV targets in turn too, but only within one attempt,
        which a failed node ends here (``_on_connection_failed``), so a primary that is down would be tried again
        and again and its backup never."""
        try:
            nodes = await client_nodes(self.boundjid.domain, self.settings.dns_servers)
        except LookupFailed as exc:
            self.servers.use(())
            self._set_status(state="disconnected", server=self._server_text(), last_error=str(exc))
            log.warning("XMPP: %s", exc)
            self._schedule_reconnect()
            return
        if self._stopping:
            return
        self.servers.use(nodes)
        self._set_status(state="connecting", server=self._server_text())
        self.connect(*self.servers.current)

    def _on_connection_failed(self, error: object) -> None:
        """A node that cannot be reached: slixmpp would retry the same address with a growing wait (up to 300 s);
        we take the attempt over and try the next node (``_schedule_reconnect``)."""
        self._set_status(state="disconnected", last_error=f"connection failed ({self._server_text()}): {error}")
        log.warning("XMPP server %s: connection failed: %s", self._server_text(), error)
        self.cancel_connection_attempt()
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        """Connect to the next node after the delay ``ServerRotation`` says (at once, or after a round of failures)."""
        if self._stopping or self._reconnect_pending:
            return
        delay = self.servers.after_failure()
        self._reconnect_pending = True
        log.warning("XMPP: connecting to %s in %.1f s", self._server_text(), delay)
        asyncio.get_running_loop().call_later(delay, self._reconnect)

    def _on_disconnected(self, _event: object) -> None:
        self._online.clear()
        self.s5b.session_ended()  # the next session may be on another node, with its own proxy65
        self.peers.clear()
        self.flow.session_ended()
        for future, iq in list(self._pending_iqs.items()):  # no answer comes on a dead stream: fail now, not at the timeout
            if not future.done():
                future.set_exception(StreamLost(iq))
        self.offers.session_ended()
        self.ibb.session_ended(TransferCut("XMPP connection lost"))
        if not self._stopping and not self._reconnect_pending:
            if self.status.get("state") != "refused":
                self._set_status(state="disconnected")
            log.warning("XMPP connection to %s lost", self._server_text())
            self._schedule_reconnect()

    def _reconnect(self) -> None:
        self._reconnect_pending = False
        if not self._stopping and not self._online.is_set():
            self._connect_current()

    def _on_presence(self, presence: slixmpp.Presence) -> None:
        sender = presence["from"]
        if sender.bare == self.boundjid.bare and sender.resource == self.boundjid.resource:
            return
        self.peers.update(sender.bare, sender.resource, presence["type"], presence["show"], presence["status"])

    @property
    def online(self) -> bool:
        return self._online.is_set()

    def set_busy(self, busy: bool, status: str) -> None:
        """Presence as flow control: ``dnd`` while the inbound side is at its limit (rate-limited: FlowControl)."""
        self.flow.set(busy, status, self.online)

    def peer_online(self, bare_jid: str) -> str | None:
        """A full JID of the peer if any of its resources is online (busy or not): for receipts."""
        return self.peers.online_resource(bare_jid)

    def _on_message(self, msg: slixmpp.Message) -> None:
        """Only the server's own broadcasts matter here (mod_announce: from the bare domain, any type but
        error); messages from accounts are not part of the protocol and are dropped."""
        sender = msg["from"]
        if msg["type"] == "error" or sender.user or sender.resource or sender.domain != self.boundjid.domain:
            return
        text = msg["body"] or msg["subject"] or ""
        if text:
            log.warning("announcement from the XMPP server %s: %s", sender.domain, text.strip()[:200])
            self.inbound.server_announcement(sender.domain, text)

    def peer_availability(self, bare_jid: str, priority: str = "routine") -> tuple[str | None, str]:
        """(full JID to offer to, or None; 'available' | 'busy' | 'offline'): see ``PeerPresence.availability``."""
        return self.peers.availability(bare_jid, priority)

    def send_stanza_text(self, data: str) -> None:
        """A stanza serialised by us (an IBB block: no stanza object per block), written at once. XEP-0198 counts
        it as slixmpp counts the stanzas it sends itself (``_handle_outgoing``: the sequence number and the
        unacked queue, which a resumed stream resends): sent raw without that, the server's acks counted more
        stanzas than slixmpp had queued ("inconsistent sequence numbers", logged as an error) and its queue lost
        track of which stanzas were still unacknowledged."""
        sm = self.plugin.get("xep_0198", None)
        if sm is not None and sm.enabled_out:
            sm.seq = (sm.seq + 1) % SM_MAX_SEQ
            sm.unacked_queue.append((sm.seq, data))
            sm.window_counter -= 1
            if sm.window_counter == 0:
                sm.window_counter = sm.window
                sm.request_ack()
        self.send_raw(data)

    def spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(log_task_failure)
        task.add_done_callback(self._tasks.discard)
