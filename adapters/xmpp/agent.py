"""The gateway's XMPP agent (slixmpp): connection, presence, study offers and both bytestream methods.

Events and behaviour
- Connects with STARTTLS verified against ``ca_file`` (or the system store), chain and name, optionally a
  pinned server certificate (``server_cert_sha256``), then SASL SCRAM only; a server that fails
  verification is never used in plaintext: the reason (unknown CA, wrong name, expired, pin) is kept in
  ``status`` and the connection retried with backoff. ``use_tls = false`` (loopback tests only) allows
  PLAIN without TLS. Reconnects with backoff, answers XEP-0199 pings, publishes presence (``dnd`` with a status text while
  the inbound side is at its limit) and tracks every peer's presence (``peer_status``).
- Sending (``send_bundle``): one XEP-0096 offer per study unit, carrying an opaque name, the size, the
  SHA-256 of the bundle manifest (XEP-0300), an empty ``<range/>`` and our certificate (``e2e``); the receiver answers with the method and the offset
  it wants (resume). Methods: XEP-0065 mediated through the server's proxy (found with disco#items and a
  bytestreams query), then XEP-0047 in-band. A failure of the S5B path (no proxy, connect refused,
  activation error, connection cut) re-offers the same bundle with IBB only, resuming at the receiver's
  offset. The sender then waits for the receiver's verdict (``urn:dicomgw:transfer:1``).
- Receiving: offers are passed to ``InboundPort.authorize`` (allowlist, size, capacity) and refused with a
  stanza error (``forbidden``, ``not-acceptable``, ``resource-constraint``) or accepted with the offset
  from ``InboundPort.open_sink``; the bytes of either method go to the sink; at the announced size the
  sink verifies and the verdict goes back to the sender.
- End to end (``adapters.xmpp.e2e``): with a pin for the peer the bundle travels inside mutual TLS 1.3
  between the gateways over either method; without a pin nothing is exchanged unless ``require_e2e`` is
  off (lab only). An offer that is malformed is answered ``bad-request`` before any admission; an accepted
  offer whose stream does not start within ``stream_start_timeout_s`` is released; IBB sequence numbers
  are checked (a gap or a replay closes the stream, XEP-0047 section 2.2).

Handlers are registered in one block in ``__init__``. Config: the ``XmppSettings`` given to the constructor.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from xml.sax.saxutils import quoteattr

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout, XMPPError
from slixmpp.xmlstream.handler import Callback, CoroutineCallback
from slixmpp.xmlstream.matcher import MatchXPath
from slixmpp.xmlstream.matcher.id import MatcherId

from adapters.xmpp import socks5
from adapters.xmpp.e2e import Identity, PinMismatch, TlsPipe, check_pin, client_context, fingerprint, server_context
from gateway.transfer import SendOutcome
from adapters.xmpp.stanzas import (
    NS_DISCO_ITEMS,
    NS_IBB,
    NS_RESULT,
    NS_S5B,
    NS_SI,
    Offer,
    build_accept,
    build_offer,
    Receipt,
    build_receipt,
    build_result,
    parse_accept,
    parse_offer,
    parse_receipt,
    q,
)

log = logging.getLogger(__name__)
IQ = "{jabber:client}iq"


@dataclass(frozen=True)
class XmppSettings:
    jid: str
    password: str
    host: str = "127.0.0.1"
    port: int = 5222
    use_tls: bool = True
    methods: tuple[str, ...] = (NS_S5B, NS_IBB)
    ibb_block_bytes: int = 65535  # XEP-0047: at most 65535 bytes of data per block (before base64)
    ibb_window: int = 8
    s5b_write_bytes: int = 1 << 20
    verdict_timeout_s: float = 600.0
    s5b_idle_timeout_s: float = 120.0  # an inbound S5B stream with no byte for this long counts as cut
    iq_timeout_s: float = 30.0
    proxy_address: tuple[str, int] | None = None  # override the address the proxy advertises (NAT, relays)
    ca_file: str = ""  # PEM CA bundle for the server's certificate; empty: the system store
    server_cert_sha256: str = ""  # optional pin of the server's certificate (64 hex digits)
    identity: Identity | None = None  # this gateway's end-to-end identity
    require_e2e: bool = True  # no pinned peer certificate, no exchange
    stream_start_timeout_s: float = 60.0  # an accepted offer whose stream does not start is released


class Sink(Protocol):
    """Where an accepted inbound bundle's bytes go (see ``adapters.inbox``)."""

    offset: int
    size: int
    bundle_key: str  # the manifest SHA-256: one sink per bundle at a time

    def write(self, data: bytes | memoryview) -> None: ...
    def finish(self) -> tuple[bool, str]: ...
    def close(self, reason: str) -> None: ...


class InboundPort(Protocol):
    def authorize(self, peer_jid: str, offer: Offer) -> tuple[str, str] | None:
        """None to accept, else (stanza error condition, text)."""

    def open_sink(self, peer_jid: str, offer: Offer, method: str) -> Sink:
        """Called only after ``authorize`` accepted; the sink's ``finish``/``close`` ends the admission."""

    def receipt(self, peer_jid: str, receipt: Receipt) -> str:
        """A delivery receipt from a peer we sent to: 'delivered' | 'failed' | 'noted' | 'unknown'."""

    def pin_for(self, peer_jid: str) -> str | None:
        """The pinned certificate fingerprint of a peer gateway (bare JID), if any."""

    def security_event(self, peer_jid: str, text: str) -> None:
        """A refused end-to-end channel (pin mismatch, failed handshake): audited."""

    def status_changed(self, status: dict[str, Any]) -> None:
        """The XMPP connection's state changed (``GatewayAgent.status``)."""


@dataclass
class _Inbound:
    """An accepted offer: where its bytes go, and its end-to-end channel."""

    peer: str  # full JID of the sender
    sink: Sink
    method: str
    tls: ssl.SSLContext | None  # None: plaintext (lab only)
    pipe: TlsPipe | None = None  # IBB: TLS over the blocks
    next_seq: int = 0  # XEP-0047: the seq the next block from the sender must carry
    out_seq: int = 0  # our blocks back to the sender (TLS handshake records)
    started: bool = False  # the bytestream was opened


@dataclass
class _Outbound:
    """An IBB stream we send on end to end: the receiver's TLS records come back on it."""

    peer: str
    pipe: TlsPipe
    handshake: asyncio.Future[None]
    next_seq: int = 0
    pending: list[bytes] = field(default_factory=list)


class TransferCut(ConnectionError):
    """A bytestream failed after it started; the next offer resumes at the receiver's offset."""


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
        self.status: dict[str, Any] = {
            "state": "connecting", "server": f"{settings.host}:{settings.port}", "jid": settings.jid,
            "tls": settings.use_tls, "tls_version": None, "server_cert_sha256": None, "last_error": None,
        }
        self.peer_status: dict[str, dict[str, str]] = {}  # bare JID -> {resource: show}
        self._online = asyncio.Event()
        self._settled = asyncio.Event()  # online, or refused for a reason an operator must fix
        self._sinks: dict[str, _Inbound] = {}  # sid -> accepted inbound offer
        self._outbound: dict[str, _Outbound] = {}  # sid -> our end-to-end IBB stream
        self._verdicts: dict[str, asyncio.Future[tuple[str, str]]] = {}
        self._proxy: tuple[str, str, int] | None = None
        self._status = ("", "ready")
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._reconnects = 0
        self._reconnect_pending = False
        self._readers: dict[str, asyncio.Future[None]] = {}
        self._sockets: dict[str, socket.socket] = {}  # sid -> inbound S5B socket, read on its own thread
        self.stream_managed = False  # XEP-0198 enabled by the server on this session

        self.add_event_handler("session_start", self._on_session_start)
        self.add_event_handler("disconnected", self._on_disconnected)
        self.add_event_handler("presence", self._on_presence)
        self.add_event_handler("sm_enabled", lambda _e: setattr(self, "stream_managed", True))
        self.add_event_handler("ssl_cert", self._on_server_cert)
        self.add_event_handler("ssl_invalid_chain", self._on_tls_refused)
        self.add_event_handler("failed_auth", lambda _e: self._set_status(last_error="authentication failed (SASL)"))
        self.add_event_handler("no_auth", lambda _e: self._set_status(
            last_error="no acceptable login method (SCRAM over TLS required)"))
        self.add_event_handler("connection_failed", lambda e: self._set_status(state="disconnected", last_error=f"connection failed: {e}"))
        self.register_handler(CoroutineCallback("si offer", MatchXPath(f"{IQ}/{q(NS_SI, 'si')}"), self._on_offer))
        self.register_handler(CoroutineCallback("s5b", MatchXPath(f"{IQ}/{q(NS_S5B, 'query')}"), self._on_s5b))
        self.register_handler(Callback("ibb open", MatchXPath(f"{IQ}/{q(NS_IBB, 'open')}"), self._on_ibb_open))
        self.register_handler(Callback("ibb data", MatchXPath(f"{IQ}/{q(NS_IBB, 'data')}"), self._on_ibb_data))
        self.register_handler(Callback("ibb close", MatchXPath(f"{IQ}/{q(NS_IBB, 'close')}"), self._on_ibb_close))
        self.register_handler(Callback("verdict", MatchXPath(f"{IQ}/{q(NS_RESULT, 'result')}"), self._on_verdict))
        self.register_handler(CoroutineCallback("receipt", MatchXPath(f"{IQ}/{q(NS_RESULT, 'receipt')}"), self._on_receipt))

    # -- connection -----------------------------------------------------------------------------
    async def start(self, timeout_s: float = 30.0) -> None:
        """Connect; returns when the session is up, or raises ``ConnectionRefusedError`` at once when the
        server failed verification (then retried in the background), or ``TimeoutError``."""
        self.connect(self.settings.host, self.settings.port)
        await asyncio.wait_for(self._settled.wait(), timeout_s)
        if not self.online:
            raise ConnectionRefusedError(self.status.get("last_error") or "XMPP server refused")

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        for sock in list(self._sockets.values()):
            _shut(sock)  # the reader threads see the end of their stream and return
        for entry in self._sinks.values():
            entry.sink.close("gateway stopping")
        self._sinks.clear()
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
        self.send_presence(pshow=self._status[0] or None, pstatus=self._status[1])
        await self.get_roster()
        self._online.set()
        self._reconnects = 0
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        self._set_status(state="online", bound_jid=self.boundjid.full, last_error=None,
                         tls_version=ssl_object.version() if ssl_object is not None else None)
        log.info("XMPP session up as %s", self.boundjid.full)

    def _on_disconnected(self, _event: object) -> None:
        self._online.clear()
        self.peer_status.clear()
        for sid in list(self._outbound):
            self._fail_outbound(sid, TransferCut("XMPP connection lost"))
        if not self._stopping and not self._reconnect_pending:
            delay = min(60.0, 1.0 * 2 ** min(self._reconnects, 6))
            self._reconnects += 1
            self._reconnect_pending = True
            if self.status.get("state") != "refused":
                self._set_status(state="disconnected")
            log.warning("XMPP connection lost; reconnecting in %.0f s", delay)
            asyncio.get_running_loop().call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        self._reconnect_pending = False
        if not self._stopping and not self._online.is_set():
            self._set_status(state="connecting")
            self.connect(self.settings.host, self.settings.port)

    def _on_presence(self, presence: slixmpp.Presence) -> None:
        sender = presence["from"]
        if sender.bare == self.boundjid.bare and sender.resource == self.boundjid.resource:
            return
        resources = self.peer_status.setdefault(sender.bare, {})
        if presence["type"] == "unavailable":
            resources.pop(sender.resource, None)
        elif presence["type"] in ("available", "", "chat", "away", "dnd", "xa"):
            resources[sender.resource] = presence["show"] or "available"

    @property
    def online(self) -> bool:
        return self._online.is_set()

    def set_busy(self, busy: bool, status: str) -> None:
        """Presence as flow control: ``dnd`` while the inbound side is at its limit."""
        self._status = ("dnd" if busy else "", status)
        if self.online:
            self.send_presence(pshow="dnd" if busy else None, pstatus=status)

    def peer_online(self, bare_jid: str) -> str | None:
        """A full JID of the peer if any of its resources is online (busy or not): for receipts."""
        resources = sorted(self.peer_status.get(bare_jid, {}))
        return f"{bare_jid}/{resources[0]}" if resources else None

    async def send_receipt(self, peer_full_jid: str, receipt: Receipt) -> tuple[bool, str]:
        """(acknowledged, detail): True when the sender answered (result, or item-not-found: not its study)."""
        iq = self.make_iq_set(ito=peer_full_jid)
        iq.xml.append(build_receipt(receipt))
        try:
            await iq.send(timeout=self.settings.iq_timeout_s)
        except IqError as exc:
            condition = exc.iq["error"]["condition"]
            return condition == "item-not-found", f"{condition}: {exc.iq['error']['text']}"
        except IqTimeout:
            return False, "no answer (timeout)"
        return True, "acknowledged"

    def peer_availability(self, bare_jid: str) -> tuple[str | None, str]:
        """(full JID to offer to, or None; 'available' | 'busy' | 'offline')."""
        resources = self.peer_status.get(bare_jid, {})
        free = sorted(r for r, show in resources.items() if show in ("available", "chat"))
        if free:
            return f"{bare_jid}/{free[0]}", "available"
        return (None, "busy") if resources else (None, "offline")

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sending --------------------------------------------------------------------------------
    async def send_bundle(
        self,
        peer_full_jid: str,
        size: int,
        manifest_sha256: str,
        stream_from: Callable[[int], Iterator[bytes]],
        progress: Callable[[int, str], None] | None = None,
    ) -> SendOutcome:
        """Offer and stream one bundle; falls back from S5B to IBB (resuming) when the S5B path fails.
        With a pin for the peer the bundle goes end-to-end encrypted; without one, only if ``require_e2e``
        is off."""
        result = SendOutcome(ok=False)
        peer_bare = peer_full_jid.split("/", 1)[0]
        pin = self.inbound.pin_for(peer_bare)
        identity = self.settings.identity
        if pin is None and self.settings.require_e2e:
            result.detail = (f"no pinned certificate for {peer_bare}: nothing is sent unencrypted "
                             f"(dicomgw peers add {peer_bare} --fingerprint SHA256)")
            return result
        encrypted = pin is not None and identity is not None
        methods = tuple(self.settings.methods)
        while methods:
            sid = uuid.uuid4().hex
            offer = Offer(sid, f"{sid}.dgwb", size, manifest_sha256, methods, identity.cert_der if encrypted and identity else b"")
            started = time.time()
            attempt: dict[str, object] = {"sid": sid, "methods": list(methods), "started": started}
            result.attempts.append(attempt)
            try:
                method, offset = await self._offer(peer_full_jid, offer)
            except XMPPError as exc:
                attempt.update(outcome="held" if exc.condition == "conflict" else "refused", error=f"{exc.condition}: {exc.text}")
                result.detail = f"peer refused the offer: {exc.condition} ({exc.text})"
                return result
            except (IqTimeout, ValueError) as exc:
                attempt.update(outcome="cut", error=_describe(exc))
                result.detail = f"offer not answered: {_describe(exc)}"
                return result
            attempt.update(method=method, offset=offset)
            result.method, result.offset = method, offset
            verdict = asyncio.get_running_loop().create_future()
            self._verdicts[sid] = verdict
            tls = client_context(identity) if encrypted and identity else None
            moved = [0]
            try:
                stream_started = time.perf_counter()
                sent = await (self._send_s5b if method == NS_S5B else self._send_ibb)(
                    peer_full_jid, sid, stream_from(offset), offset, _in_thread(progress), tls, pin, moved
                )
                attempt["stream_s"] = time.perf_counter() - stream_started
                attempt["bytes"] = sent
                result.bytes_sent += sent
                outcome, detail = await asyncio.wait_for(verdict, self.settings.verdict_timeout_s)
                if outcome == "incomplete":
                    raise TransferCut(f"receiver got {detail}")
            except PinMismatch as exc:
                attempt.update(outcome="refused", error=str(exc), bytes=moved[0])
                self.inbound.security_event(peer_bare, f"end-to-end channel to {peer_full_jid} refused: {exc}")
                result.detail = f"end-to-end channel refused: {exc}"
                return result
            except (TransferCut, socks5.Socks5Error, IqError, IqTimeout, OSError, TimeoutError) as exc:
                attempt.update(outcome="cut", error=_describe(exc), bytes=moved[0])
                log.warning("%s transfer %s to %s failed: %s", _short(method), sid, peer_full_jid, _describe(exc))
                if method == NS_S5B and NS_IBB in methods:
                    methods = (NS_IBB,)
                    continue
                result.detail = f"{_short(method)} failed: {_describe(exc)}"
                return result
            finally:
                self._verdicts.pop(sid, None)
            attempt.update(outcome=outcome, error=detail)
            result.ok = outcome == "received"
            result.detail = detail
            return result
        result.detail = "no stream method left"
        return result

    async def _offer(self, peer: str, offer: Offer) -> tuple[str, int]:
        iq = self.make_iq_set(ito=peer)
        iq.xml.append(build_offer(offer))
        try:
            response = await iq.send(timeout=self.settings.iq_timeout_s)
        except IqError as exc:
            error = exc.iq["error"]
            raise XMPPError(error["condition"] or "undefined-condition", error["text"] or "") from exc
        method, offset = parse_accept(response.xml.find(q(NS_SI, "si")))
        if method not in offer.methods or offset < 0 or offset > offer.size:
            raise XMPPError("bad-request", f"peer chose {method!r} at offset {offset}")
        return method, offset

    async def _discover_proxy(self) -> tuple[str, str, int]:
        if self._proxy is None:
            items = await self.plugin["xep_0030"].get_items(jid=self.boundjid.domain, timeout=self.settings.iq_timeout_s)
            for item in items["disco_items"]["items"]:
                iq = self.make_iq_get(ito=item[0])
                ET.SubElement(iq.xml, q(NS_S5B, "query"))
                try:
                    response = await iq.send(timeout=self.settings.iq_timeout_s)
                except (IqError, IqTimeout):
                    continue
                host = response.xml.find(f"{q(NS_S5B, 'query')}/{q(NS_S5B, 'streamhost')}")
                if host is not None and host.get("host") and host.get("port"):
                    address = self.settings.proxy_address or (host.get("host", ""), int(host.get("port", "0")))
                    self._proxy = (host.get("jid", item[0]), address[0], address[1])
                    break
            if self._proxy is None:
                raise TransferCut("the server offers no SOCKS5 proxy (XEP-0065)")
        return self._proxy

    async def _send_s5b(self, peer: str, sid: str, chunks: Iterator[bytes], offset: int,
                        progress: Callable[[int, str], None] | None, tls: ssl.SSLContext | None, pin: str | None,
                        moved: list[int]) -> int:
        proxy_jid, host, port = await self._discover_proxy()
        iq = self.make_iq_set(ito=peer)
        query = ET.SubElement(iq.xml, q(NS_S5B, "query"), {"sid": sid, "mode": "tcp"})
        ET.SubElement(query, q(NS_S5B, "streamhost"), {"jid": proxy_jid, "host": host, "port": str(port)})
        await iq.send(timeout=self.settings.iq_timeout_s)
        reader, writer = await socks5.connect(host, port, socks5.dst_addr(sid, self.boundjid.full, peer))
        try:
            activate = self.make_iq_set(ito=proxy_jid)
            ET.SubElement(ET.SubElement(activate.xml, q(NS_S5B, "query"), {"sid": sid}), q(NS_S5B, "activate")).text = peer
            await activate.send(timeout=self.settings.iq_timeout_s)
            if tls is not None:  # the relayed socket becomes a TLS 1.3 session with the receiving gateway
                await asyncio.wait_for(writer.start_tls(tls), self.settings.iq_timeout_s)
                check_pin(writer.get_extra_info("ssl_object"), pin or "", peer)
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
                moved[0] += len(chunk)
                if progress is not None:
                    progress(offset + moved[0], "s5b")
            if tls is None:
                writer.write_eof()  # TLS has no half-close: the receiver stops at the announced size
            await writer.drain()
            return moved[0]
        except PinMismatch:
            raise
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            raise TransferCut(f"SOCKS5 stream cut: {_describe(exc)}") from exc
        finally:
            writer.close()

    async def _send_ibb(self, peer: str, sid: str, chunks: Iterator[bytes], offset: int,
                        progress: Callable[[int, str], None] | None, tls: ssl.SSLContext | None, pin: str | None,
                        moved: list[int]) -> int:
        block = self.settings.ibb_block_bytes
        iq = self.make_iq_set(ito=peer)
        ET.SubElement(iq.xml, q(NS_IBB, "open"), {"sid": sid, "block-size": str(block), "stanza": "iq"})
        await iq.send(timeout=self.settings.iq_timeout_s)
        window = asyncio.Semaphore(self.settings.ibb_window)
        pending: set[asyncio.Future[object]] = set()
        failure: list[BaseException] = []
        to_attr = quoteattr(peer)
        seq = 0
        buffer = bytearray()

        def acked(fut: asyncio.Future[object]) -> None:
            pending.discard(fut)
            window.release()
            stanza = None if fut.cancelled() else fut.result()
            if stanza is None or stanza["type"] != "result":  # type: ignore[index]
                failure.append(TransferCut(f"IBB block refused: {stanza['error']['condition'] if stanza is not None else 'cancelled'}"))  # type: ignore[index]

        async def send_block(data: bytes) -> None:
            nonlocal seq
            await window.acquire()
            if failure:
                raise failure[0]
            iq_id = self.new_id()
            fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            self.register_handler(Callback(f"ibb-ack-{iq_id}", MatcherId(iq_id), fut.set_result, once=True))
            fut.add_done_callback(acked)
            pending.add(fut)
            self.send_raw(_ibb_data(to_attr, iq_id, seq, sid, data))
            seq = (seq + 1) % 65536

        async def flush(final: bool) -> None:
            while len(buffer) >= block or (final and buffer):
                piece = bytes(buffer[:block])
                del buffer[:block]
                await send_block(piece)

        channel: _Outbound | None = None
        try:
            if tls is not None:
                channel = _Outbound(peer, TlsPipe(tls, server_side=False), asyncio.get_running_loop().create_future())
                self._outbound[sid] = channel
                buffer += channel.pipe.start()
                await flush(True)
                await asyncio.wait_for(asyncio.shield(channel.handshake), self.settings.iq_timeout_s)
                check_pin(channel.pipe.ssl, pin or "", peer)
                buffer += channel.pipe.outgoing()  # our Certificate and Finished
            for chunk in chunks:
                buffer += channel.pipe.encrypt(chunk) if channel is not None else chunk
                await flush(False)
                moved[0] += len(chunk)
                if progress is not None:
                    progress(offset + moved[0], "ibb")
            await flush(True)
            deadline = time.monotonic() + self.settings.iq_timeout_s
            while pending and time.monotonic() < deadline and not failure:
                await asyncio.wait(set(pending), timeout=max(0.0, deadline - time.monotonic()))
            if failure or pending:
                raise failure[0] if failure else TransferCut("IBB acknowledgements timed out")
        except ssl.SSLError as exc:
            if isinstance(exc, PinMismatch):
                raise
            raise TransferCut(f"end-to-end TLS over IBB failed: {_describe(exc)}") from exc
        finally:
            self._outbound.pop(sid, None)
        close = self.make_iq_set(ito=peer)
        ET.SubElement(close.xml, q(NS_IBB, "close"), {"sid": sid})
        await close.send(timeout=self.settings.iq_timeout_s)
        return moved[0]

    def _fail_outbound(self, sid: str, exc: BaseException) -> None:
        channel = self._outbound.get(sid)
        if channel is not None and not channel.handshake.done():
            channel.handshake.set_exception(exc)

    # -- receiving ------------------------------------------------------------------------------
    async def _on_offer(self, iq: slixmpp.Iq) -> None:
        if iq["type"] != "set":
            return
        peer = iq["from"]
        try:  # a malformed offer is refused before anything is admitted
            offer = parse_offer(iq.xml.find(q(NS_SI, "si")))
        except ValueError as exc:
            raise XMPPError("bad-request", str(exc)) from exc
        if offer.sid in self._sinks or offer.sid in self._outbound:
            raise XMPPError("conflict", "this stream id is in use")
        refusal = self.inbound.authorize(peer.bare, offer)
        if refusal is not None:
            condition, text = refusal
            raise XMPPError(condition, text, etype="wait" if condition == "resource-constraint" else "cancel")
        method = next(m for m in (NS_S5B, NS_IBB) if m in offer.methods)  # parse_offer made sure there is one
        for old_sid, old in list(self._sinks.items()):
            if old.peer == peer.full and getattr(old.sink, "bundle_key", None) == offer.manifest_sha256:
                self._drop(old_sid, "superseded by a new offer of the same bundle")
        try:  # from here on the admission is the sink's: every path below ends it
            tls = server_context(self.settings.identity, offer.cert_der) if offer.cert_der and self.settings.identity else None
            sink = self.inbound.open_sink(peer.bare, offer, method)
        except Exception as exc:
            log.exception("could not open a sink for an offer from %s", peer)
            raise XMPPError("internal-server-error", f"receiver could not take the offer: {type(exc).__name__}") from exc
        self._sinks[offer.sid] = _Inbound(peer.full, sink, method, tls)
        reply = iq.reply()
        reply.xml.append(build_accept(method, sink.offset))
        reply.send()
        asyncio.get_running_loop().call_later(self.settings.stream_start_timeout_s, self._check_started, offer.sid)

    def _check_started(self, sid: str) -> None:
        entry = self._sinks.get(sid)
        if entry is not None and not entry.started:
            log.warning("offer %s from %s: no stream within %.0f s; released", sid, entry.peer, self.settings.stream_start_timeout_s)
            self._drop(sid, f"the stream did not start within {self.settings.stream_start_timeout_s:g} s")

    async def _on_s5b(self, iq: slixmpp.Iq) -> None:
        if iq["type"] != "set":
            return
        query = iq.xml.find(q(NS_S5B, "query"))
        sid = query.get("sid", "") if query is not None else ""
        entry = self._sinks.get(sid)
        if entry is None or entry.peer != iq["from"].full or entry.started:
            raise XMPPError("item-not-found", "no accepted offer with this stream id")
        entry.started = True
        hosts = [h for h in query.iterfind(q(NS_S5B, "streamhost")) if h.get("host") and (h.get("port") or "").isdigit()]
        for host in hosts[:4]:
            try:
                sock = await asyncio.to_thread(
                    socks5.connect_blocking,
                    host.get("host", ""), int(host.get("port", "0")), socks5.dst_addr(sid, entry.peer, self.boundjid.full),
                )
            except (socks5.Socks5Error, ValueError, OverflowError) as exc:
                log.warning("streamhost %s unusable: %s", host.get("jid"), exc)
                continue
            if self._sinks.get(sid) is not entry:  # dropped or superseded while we connected
                sock.close()
                raise XMPPError("item-not-found", "the offer was withdrawn")
            reply = iq.reply()
            ET.SubElement(ET.SubElement(reply.xml, q(NS_S5B, "query"), {"sid": sid}), q(NS_S5B, "streamhost-used"), {"jid": host.get("jid", "")})
            reply.send()
            self._sockets[sid] = sock.dup()  # to shut the stream down from the loop (the reader may wrap it in TLS)
            self._readers[sid] = asyncio.ensure_future(self._receive_s5b(sid, sock))
            self._readers[sid].add_done_callback(lambda _t, sid=sid: self._readers.pop(sid, None))
            return
        self._drop(sid, "no streamhost reachable")
        raise XMPPError("item-not-found", "none of the streamhosts could be reached")

    async def _receive_s5b(self, sid: str, sock: socket.socket) -> None:
        """The stream is read on a thread of its own (see :func:`_pump_s5b`); the loop only waits for its end."""
        entry = self._sinks[sid]
        try:
            await _on_own_thread(f"s5b-{sid[:8]}", _pump_s5b, sock, entry.sink, self.settings.s5b_idle_timeout_s, entry.tls)
        except ssl.SSLError as exc:
            log.warning("S5B stream %s from %s: end-to-end TLS failed: %s", sid, entry.peer, exc)
            self.inbound.security_event(entry.peer.split("/")[0], f"end-to-end channel from {entry.peer} failed: {_describe(exc)}")
        except (ConnectionError, OSError, ValueError) as exc:
            log.warning("S5B stream %s from %s cut: %s", sid, entry.peer, exc)
        finally:
            _shut(self._sockets.pop(sid, None), close=True)  # the reading thread closes its own socket
        await self._complete(sid)

    def _ibb_stream(self, iq: slixmpp.Iq, tag: str) -> tuple[ET.Element, str, _Inbound]:
        """The IBB element, its sid, and the accepted offer it belongs to (from the same full JID)."""
        el = iq.xml.find(q(NS_IBB, tag))
        sid = el.get("sid", "") if el is not None else ""
        entry = self._sinks.get(sid)
        if el is None or entry is None or entry.peer != iq["from"].full:
            raise XMPPError("item-not-found", "no accepted offer with this stream id")
        return el, sid, entry

    def _on_ibb_open(self, iq: slixmpp.Iq) -> None:
        el, _sid, entry = self._ibb_stream(iq, "open")
        block = el.get("block-size", "")
        if not block.isdigit() or not 0 < int(block) <= 65535 or el.get("stanza", "iq") != "iq":
            raise XMPPError("resource-constraint", "block-size 1..65535 with stanza='iq' only", etype="modify")
        if entry.started:
            raise XMPPError("not-acceptable", "this stream is already open")
        entry.started = True
        if entry.tls is not None:
            entry.pipe = TlsPipe(entry.tls, server_side=True)
        iq.reply().send()

    def _on_ibb_data(self, iq: slixmpp.Iq) -> None:
        el = iq.xml.find(q(NS_IBB, "data"))
        if el is not None and el.get("sid", "") in self._outbound:
            self._on_ibb_reply_data(iq, el)
            return
        el, sid, entry = self._ibb_stream(iq, "data")
        seq = el.get("seq", "")
        if not entry.started or not seq.isdigit() or int(seq) != entry.next_seq:  # XEP-0047 2.2: gap or replay
            self._drop(sid, f"IBB block out of order: seq {seq[:8]!r}, expected {entry.next_seq}")
            self._spawn(self._send_verdict(entry.peer, sid, "incomplete", "IBB stream closed: block out of order"))
            raise XMPPError("unexpected-request", f"expected seq {entry.next_seq}; the stream is closed", etype="cancel")
        entry.next_seq = (entry.next_seq + 1) % 65536
        try:
            data = base64.b64decode(el.text or "", validate=True)
            if entry.pipe is not None:
                plain = entry.pipe.feed(data)
                back = entry.pipe.outgoing()
                if back:  # handshake records for the sender, on the same IBB session
                    self.send_raw(_ibb_data(quoteattr(entry.peer), self.new_id(), entry.out_seq, sid, back))
                    entry.out_seq = (entry.out_seq + 1) % 65536
                data = plain
            if entry.sink.offset + len(data) > entry.sink.size:
                raise OverflowError(f"data past the announced size of {entry.sink.size} bytes")
            if data:
                entry.sink.write(data)
        except ssl.SSLError as exc:
            self.inbound.security_event(iq["from"].bare, f"end-to-end channel from {entry.peer} failed: {_describe(exc)}")
            self._drop(sid, f"end-to-end TLS failed: {_describe(exc)}")
            self._spawn(self._send_verdict(entry.peer, sid, "refused", "end-to-end TLS failed"))
            raise XMPPError("not-acceptable", "end-to-end TLS failed", etype="cancel") from exc
        except (ValueError, OverflowError) as exc:
            self._drop(sid, f"bad IBB data: {exc}")
            self._spawn(self._send_verdict(entry.peer, sid, "rejected", f"bad IBB data: {exc}"))
            raise XMPPError("bad-request", str(exc)) from exc
        iq.reply().send()

    def _on_ibb_reply_data(self, iq: slixmpp.Iq, el: ET.Element) -> None:
        """A TLS record from the receiver on an IBB stream we send (its handshake flight)."""
        sid = el.get("sid", "")
        channel = self._outbound[sid]
        seq = el.get("seq", "")
        if channel.peer != iq["from"].full or not seq.isdigit() or int(seq) != channel.next_seq:
            self._fail_outbound(sid, TransferCut("IBB block from the receiver out of order"))
            raise XMPPError("unexpected-request", "unexpected block", etype="cancel")
        channel.next_seq = (channel.next_seq + 1) % 65536
        try:
            channel.pipe.feed(base64.b64decode(el.text or "", validate=True))
        except (ssl.SSLError, ValueError) as exc:
            self._fail_outbound(sid, exc if isinstance(exc, ssl.SSLError) else TransferCut(str(exc)))
            raise XMPPError("not-acceptable", "end-to-end TLS failed", etype="cancel") from exc
        if channel.pipe.handshaken and not channel.handshake.done():
            channel.handshake.set_result(None)
        iq.reply().send()

    def _on_ibb_close(self, iq: slixmpp.Iq) -> None:
        _el, sid, _entry = self._ibb_stream(iq, "close")
        iq.reply().send()
        self._spawn(self._complete(sid))

    async def _complete(self, sid: str) -> None:
        entry = self._sinks.pop(sid, None)
        if entry is None:
            return
        sink = entry.sink
        if sink.offset < sink.size:
            detail = f"{sink.offset} of {sink.size} bytes before the stream ended"
            sink.close(detail)  # kept: the sender re-offers and resumes at our offset
            outcome = "incomplete"
        else:
            ok, detail = await asyncio.to_thread(sink.finish)
            outcome = "received" if ok else "rejected"
        await self._send_verdict(entry.peer, sid, outcome, detail)

    async def _send_verdict(self, peer: str, sid: str, outcome: str, detail: str) -> None:
        iq = self.make_iq_set(ito=peer)
        iq.xml.append(build_result(sid, outcome, detail))
        with contextlib.suppress(IqError, IqTimeout):
            await iq.send(timeout=self.settings.iq_timeout_s)

    def _drop(self, sid: str, reason: str) -> None:
        _shut(self._sockets.pop(sid, None), close=True)
        reader = self._readers.pop(sid, None)
        if reader is not None:
            reader.cancel()
        entry = self._sinks.pop(sid, None)
        if entry is not None:
            entry.sink.close(reason)

    def _on_verdict(self, iq: slixmpp.Iq) -> None:
        el = iq.xml.find(q(NS_RESULT, "result"))
        sid = el.get("sid", "") if el is not None else ""
        future = self._verdicts.get(sid)
        if future is None or future.done():
            raise XMPPError("item-not-found", "no transfer with this stream id")
        future.set_result((el.get("outcome", ""), el.text or ""))
        iq.reply().send()

    async def _on_receipt(self, iq: slixmpp.Iq) -> None:
        if iq["type"] != "set":
            return
        try:
            receipt = parse_receipt(iq.xml.find(q(NS_RESULT, "receipt")))
        except ValueError as exc:
            raise XMPPError("bad-request", str(exc)) from exc
        outcome = await asyncio.to_thread(self.inbound.receipt, iq["from"].bare, receipt)
        if outcome == "unknown":
            raise XMPPError("item-not-found", f"no bundle {receipt.bundle_sha256[:12]} was sent to you")
        iq.reply().send()


S5B_BLOCK_BYTES = 1 << 20


def _pump_s5b(sock: socket.socket, sink: Sink, idle_timeout_s: float, tls: ssl.SSLContext | None = None) -> None:
    """Read an inbound S5B stream into ``sink`` until its announced size, the sender's end of stream, or
    ``idle_timeout_s`` without a byte (then ``TimeoutError``). Plaintext: blocking ``recv_into`` with
    MSG_WAITALL fills a whole 1 MiB block per system call whatever piece size the proxy relays (stock
    proxy65: 4 KiB). End to end (``tls``): the socket is the TLS server side of the gateways' channel, and
    a block is filled record by record. The sink splits, hashes and writes each block on this thread."""
    seconds = max(1, int(idle_timeout_s))
    block = memoryview(bytearray(S5B_BLOCK_BYTES))
    received = sink.offset
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, 0))
    stream: socket.socket = sock
    with contextlib.ExitStack() as owned:  # this thread owns the socket: others only shut it down
        owned.enter_context(sock)
        if tls is not None:
            try:
                stream = owned.enter_context(tls.wrap_socket(sock, server_side=True))
            except ssl.SSLWantReadError as exc:
                raise TimeoutError(f"no TLS handshake within {seconds} s") from exc
        failed: list[OSError] = []
        while received < sink.size:
            want = min(S5B_BLOCK_BYTES, sink.size - received)
            try:
                count = _fill(stream, block[:want], failed) if tls is not None else stream.recv_into(block[:want], want, socket.MSG_WAITALL)
            except (BlockingIOError, ssl.SSLWantReadError) as exc:  # SO_RCVTIMEO expired with nothing read
                raise TimeoutError(f"no byte for {seconds} s") from exc
            if count:
                sink.write(block[:count])
                received += count
            if failed:
                raise TimeoutError(f"no byte for {seconds} s") if isinstance(failed[0], (BlockingIOError, ssl.SSLWantReadError)) else failed[0]
            if count == 0:
                return  # the sender (or a stop) ended the stream: the sink keeps what came


def _fill(stream: socket.socket, view: memoryview, failed: list[OSError]) -> int:
    """Fill ``view`` from a TLS socket (one record per read); fewer bytes only at the end of the stream or
    before an error, which is then put in ``failed`` (what was authenticated before it is kept first)."""
    filled = 0
    while filled < len(view):
        try:
            count = stream.recv_into(view[filled:], len(view) - filled)
        except ssl.SSLZeroReturnError:
            count = 0
        except OSError as exc:  # timeout, bad record, reset
            if not filled:
                raise
            failed.append(exc)
            return filled
        if count == 0:
            break
        filled += count
    return filled


def _ibb_data(to_attr: str, iq_id: str, seq: int, sid: str, data: bytes) -> str:
    """One XEP-0047 data stanza, written directly (slixmpp's per-character escaping costs 3.7 ms per block)."""
    payload = base64.b64encode(data).decode("ascii")
    return f"<iq type='set' to={to_attr} id='{iq_id}'><data xmlns='{NS_IBB}' seq='{seq}' sid='{sid}'>{payload}</data></iq>"


async def _on_own_thread(name: str, fn: Callable[..., None], *args: object) -> None:
    """Run a long blocking ``fn`` on a new daemon thread (not the loop's shared executor) and await its end."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finish(exc: BaseException | None) -> None:
        if not done.done():
            done.set_exception(exc) if exc is not None else done.set_result(None)

    def run() -> None:
        outcome: BaseException | None = None
        try:
            fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine, which decides
            outcome = exc
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody waits any more
            loop.call_soon_threadsafe(finish, outcome)

    threading.Thread(target=run, name=name, daemon=True).start()
    await done


def _shut(sock: socket.socket | None, close: bool = False) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        if close:
            sock.close()


def _in_thread(progress: Callable[[int, str], None] | None) -> Callable[[int, str], None] | None:
    """Progress callbacks write to the DB: keep them off the event loop, at most one in flight."""
    if progress is None:
        return None
    running: list[asyncio.Future[None]] = []

    def call(position: int, method: str) -> None:
        if running and not running[0].done():
            return
        running[:] = [asyncio.ensure_future(asyncio.to_thread(progress, position, _short(method).lower()))]

    return call


def _short(method: str) -> str:
    return {NS_S5B: "S5B", NS_IBB: "IBB"}.get(method, method or "?")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, IqError):
        return f"{exc.iq['error']['condition']}: {exc.iq['error']['text']}"
    if isinstance(exc, IqTimeout):
        return "no answer (timeout)"
    if isinstance(exc, ssl.SSLError):
        return getattr(exc, "verify_message", "") or str(exc)
    return str(exc) or type(exc).__name__
