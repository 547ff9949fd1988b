"""The gateway's XMPP agent (slixmpp): connection, presence, study offers and both bytestream methods.

Events and behaviour
- Connects with SASL (PLAIN over the server's TLS, or without TLS on loopback when ``use_tls`` is off),
  reconnects with backoff, answers XEP-0199 pings, publishes presence (``dnd`` with a status text while
  the inbound side is at its limit) and tracks every peer's presence (``peer_status``).
- Sending (``send_study``): one XEP-0096 offer per study unit, carrying name, size, the SHA-256 of the
  bundle manifest (XEP-0300) and an empty ``<range/>``; the receiver answers with the method and the offset
  it wants (resume). Methods: XEP-0065 mediated through the server's proxy (found with disco#items and a
  bytestreams query), then XEP-0047 in-band. A failure of the S5B path (no proxy, connect refused,
  activation error, connection cut) re-offers the same bundle with IBB only, resuming at the receiver's
  offset. The sender then waits for the receiver's verdict (``urn:dicomgw:transfer:1``).
- Receiving: offers are passed to ``InboundPort.authorize`` (allowlist, size, capacity) and refused with a
  stanza error (``forbidden``, ``not-acceptable``, ``resource-constraint``) or accepted with the offset
  from ``InboundPort.open_sink``; the bytes of either method go to the sink; at the announced size the
  sink verifies and the verdict goes back to the sender.

Handlers are registered in one block in ``__init__``. Config: the ``XmppSettings`` given to the constructor.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import struct
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol
from xml.sax.saxutils import quoteattr

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout, XMPPError
from slixmpp.xmlstream.handler import Callback, CoroutineCallback
from slixmpp.xmlstream.matcher import MatchXPath
from slixmpp.xmlstream.matcher.id import MatcherId

from adapters.xmpp import socks5
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


class TransferCut(ConnectionError):
    """A bytestream failed after it started; the next offer resumes at the receiver's offset."""


class GatewayAgent(slixmpp.ClientXMPP):
    def __init__(self, settings: XmppSettings, inbound: InboundPort) -> None:
        super().__init__(settings.jid, settings.password)
        self.settings = settings
        self.inbound = inbound
        self.enable_direct_tls = False
        self.enable_starttls = settings.use_tls
        self.enable_plaintext = not settings.use_tls
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0199", {"keepalive": True, "interval": 60, "timeout": 20})
        self.register_plugin("xep_0198")  # stream management, used when the server offers it
        if not settings.use_tls:
            self.plugin["feature_mechanisms"].unencrypted_plain = True
        self.peer_status: dict[str, dict[str, str]] = {}  # bare JID -> {resource: show}
        self._online = asyncio.Event()
        self._sinks: dict[str, tuple[str, Sink, str]] = {}  # sid -> (peer full JID, sink, method)
        self._verdicts: dict[str, asyncio.Future[tuple[str, str]]] = {}
        self._proxy: tuple[str, str, int] | None = None
        self._status = ("", "ready")
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._reconnects = 0
        self._readers: dict[str, asyncio.Future[None]] = {}
        self._sockets: dict[str, socket.socket] = {}  # sid -> inbound S5B socket, read on its own thread
        self.stream_managed = False  # XEP-0198 enabled by the server on this session

        self.add_event_handler("session_start", self._on_session_start)
        self.add_event_handler("disconnected", self._on_disconnected)
        self.add_event_handler("presence", self._on_presence)
        self.add_event_handler("sm_enabled", lambda _e: setattr(self, "stream_managed", True))
        self.register_handler(CoroutineCallback("si offer", MatchXPath(f"{IQ}/{q(NS_SI, 'si')}"), self._on_offer))
        self.register_handler(CoroutineCallback("s5b", MatchXPath(f"{IQ}/{q(NS_S5B, 'query')}"), self._on_s5b))
        self.register_handler(Callback("ibb open", MatchXPath(f"{IQ}/{q(NS_IBB, 'open')}"), self._on_ibb_open))
        self.register_handler(Callback("ibb data", MatchXPath(f"{IQ}/{q(NS_IBB, 'data')}"), self._on_ibb_data))
        self.register_handler(Callback("ibb close", MatchXPath(f"{IQ}/{q(NS_IBB, 'close')}"), self._on_ibb_close))
        self.register_handler(Callback("verdict", MatchXPath(f"{IQ}/{q(NS_RESULT, 'result')}"), self._on_verdict))
        self.register_handler(CoroutineCallback("receipt", MatchXPath(f"{IQ}/{q(NS_RESULT, 'receipt')}"), self._on_receipt))

    # -- connection -----------------------------------------------------------------------------
    async def start(self, timeout_s: float = 30.0) -> None:
        self.connect(self.settings.host, self.settings.port)
        await asyncio.wait_for(self._online.wait(), timeout_s)

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        for sock in list(self._sockets.values()):
            _shut(sock)  # the reader threads see the end of their stream and return
        for _peer, sink, _m in self._sinks.values():
            sink.close("gateway stopping")
        self._sinks.clear()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.disconnect(), 5)

    async def _on_session_start(self, _event: object) -> None:
        self.send_presence(pshow=self._status[0] or None, pstatus=self._status[1])
        await self.get_roster()
        self._online.set()
        self._reconnects = 0
        log.info("XMPP session up as %s", self.boundjid.full)

    def _on_disconnected(self, _event: object) -> None:
        self._online.clear()
        self.peer_status.clear()
        if not self._stopping:
            delay = min(60.0, 1.0 * 2 ** min(self._reconnects, 6))
            self._reconnects += 1
            log.warning("XMPP connection lost; reconnecting in %.0f s", delay)
            asyncio.get_running_loop().call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        if not self._stopping and not self._online.is_set():
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
        name: str,
        size: int,
        manifest_sha256: str,
        study_instance_uid: str,
        stream_from: Callable[[int], Iterator[bytes]],
        progress: Callable[[int, str], None] | None = None,
    ) -> SendOutcome:
        """Offer and stream one bundle; falls back from S5B to IBB (resuming) when the S5B path fails."""
        result = SendOutcome(ok=False)
        methods = tuple(self.settings.methods)
        while methods:
            sid = uuid.uuid4().hex
            offer = Offer(sid, name, size, manifest_sha256, study_instance_uid, methods)
            started = time.time()
            attempt: dict[str, object] = {"sid": sid, "methods": list(methods), "started": started}
            result.attempts.append(attempt)
            try:
                method, offset = await self._offer(peer_full_jid, offer)
            except XMPPError as exc:
                attempt.update(outcome="held" if exc.condition == "conflict" else "refused", error=f"{exc.condition}: {exc.text}")
                result.detail = f"peer refused the offer: {exc.condition} ({exc.text})"
                return result
            attempt.update(method=method, offset=offset)
            result.method, result.offset = method, offset
            verdict = asyncio.get_running_loop().create_future()
            self._verdicts[sid] = verdict
            try:
                stream_started = time.perf_counter()
                sent = await (self._send_s5b if method == NS_S5B else self._send_ibb)(
                    peer_full_jid, sid, stream_from(offset), offset, _in_thread(progress)
                )
                attempt["stream_s"] = time.perf_counter() - stream_started
                attempt["bytes"] = sent
                result.bytes_sent += sent
                outcome, detail = await asyncio.wait_for(verdict, self.settings.verdict_timeout_s)
                if outcome == "incomplete":
                    raise TransferCut(f"receiver got {detail}")
            except (TransferCut, socks5.Socks5Error, IqError, IqTimeout, OSError, TimeoutError) as exc:
                attempt.update(outcome="cut", error=_describe(exc))
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

    async def _send_s5b(self, peer: str, sid: str, chunks: Iterator[bytes], offset: int, progress: Callable[[int, str], None] | None) -> int:
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
            sent = 0
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
                if progress is not None:
                    progress(offset + sent, "s5b")
            writer.write_eof()
            await writer.drain()
            return sent
        except (ConnectionError, OSError) as exc:
            raise TransferCut(f"SOCKS5 stream cut: {_describe(exc)}") from exc
        finally:
            writer.close()

    async def _send_ibb(self, peer: str, sid: str, chunks: Iterator[bytes], offset: int, progress: Callable[[int, str], None] | None) -> int:
        block = self.settings.ibb_block_bytes
        iq = self.make_iq_set(ito=peer)
        ET.SubElement(iq.xml, q(NS_IBB, "open"), {"sid": sid, "block-size": str(block), "stanza": "iq"})
        await iq.send(timeout=self.settings.iq_timeout_s)
        window = asyncio.Semaphore(self.settings.ibb_window)
        pending: set[asyncio.Future[object]] = set()
        failure: list[BaseException] = []
        to_attr = quoteattr(peer)
        seq = sent = 0
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
            payload = base64.b64encode(data).decode("ascii")
            self.send_raw(
                f"<iq type='set' to={to_attr} id='{iq_id}'><data xmlns='{NS_IBB}' seq='{seq}' sid='{sid}'>{payload}</data></iq>"
            )
            seq = (seq + 1) % 65536

        for chunk in chunks:
            buffer += chunk
            while len(buffer) >= block:
                await send_block(bytes(buffer[:block]))
                del buffer[:block]
                sent += block
                if progress is not None:
                    progress(offset + sent, "ibb")
        if buffer:
            await send_block(bytes(buffer))
            sent += len(buffer)
        deadline = time.monotonic() + self.settings.iq_timeout_s
        while pending and time.monotonic() < deadline and not failure:
            await asyncio.wait(set(pending), timeout=max(0.0, deadline - time.monotonic()))
        if failure or pending:
            raise failure[0] if failure else TransferCut("IBB acknowledgements timed out")
        close = self.make_iq_set(ito=peer)
        ET.SubElement(close.xml, q(NS_IBB, "close"), {"sid": sid})
        await close.send(timeout=self.settings.iq_timeout_s)
        return sent

    # -- receiving ------------------------------------------------------------------------------
    async def _on_offer(self, iq: slixmpp.Iq) -> None:
        if iq["type"] != "set":
            return
        peer = iq["from"]
        try:
            offer = parse_offer(iq.xml.find(q(NS_SI, "si")))
        except ValueError as exc:
            raise XMPPError("bad-request", str(exc)) from exc
        refusal = self.inbound.authorize(peer.bare, offer)
        if refusal is not None:
            condition, text = refusal
            raise XMPPError(condition, text, etype="wait" if condition == "resource-constraint" else "cancel")
        method = next((m for m in (NS_S5B, NS_IBB) if m in offer.methods), None)
        if method is None:
            raise XMPPError("bad-request", "no acceptable stream method (XEP-0065 or XEP-0047)")
        for old_sid, (old_peer, old_sink, _m) in list(self._sinks.items()):
            if old_peer == peer.full and getattr(old_sink, "bundle_key", None) == offer.manifest_sha256:
                self._drop(old_sid, "superseded by a new offer of the same bundle")
        sink = self.inbound.open_sink(peer.bare, offer, method)
        self._sinks[offer.sid] = (peer.full, sink, method)
        reply = iq.reply()
        reply.xml.append(build_accept(method, sink.offset))
        reply.send()

    async def _on_s5b(self, iq: slixmpp.Iq) -> None:
        if iq["type"] != "set":
            return
        query = iq.xml.find(q(NS_S5B, "query"))
        sid = query.get("sid", "") if query is not None else ""
        entry = self._sinks.get(sid)
        if entry is None or entry[0] != iq["from"].full:
            raise XMPPError("item-not-found", "no accepted offer with this stream id")
        hosts = [h for h in query.iterfind(q(NS_S5B, "streamhost")) if h.get("host") and h.get("port")]
        for host in hosts:
            try:
                sock = await asyncio.to_thread(
                    socks5.connect_blocking,
                    host.get("host", ""), int(host.get("port", "0")), socks5.dst_addr(sid, entry[0], self.boundjid.full),
                )
            except socks5.Socks5Error as exc:
                log.warning("streamhost %s unusable: %s", host.get("jid"), exc)
                continue
            if self._sinks.get(sid) is not entry:  # dropped or superseded while we connected
                sock.close()
                raise XMPPError("item-not-found", "the offer was withdrawn")
            reply = iq.reply()
            ET.SubElement(ET.SubElement(reply.xml, q(NS_S5B, "query"), {"sid": sid}), q(NS_S5B, "streamhost-used"), {"jid": host.get("jid", "")})
            reply.send()
            self._sockets[sid] = sock
            self._readers[sid] = asyncio.ensure_future(self._receive_s5b(sid, sock))
            self._readers[sid].add_done_callback(lambda _t, sid=sid: self._readers.pop(sid, None))
            return
        self._drop(sid, "no streamhost reachable")
        raise XMPPError("item-not-found", "none of the streamhosts could be reached")

    async def _receive_s5b(self, sid: str, sock: socket.socket) -> None:
        """The stream is read on a thread of its own (see :func:`_pump_s5b`); the loop only waits for its end."""
        peer, sink, _method = self._sinks[sid]
        try:
            await _on_own_thread(f"s5b-{sid[:8]}", _pump_s5b, sock, sink, self.settings.s5b_idle_timeout_s)
        except (ConnectionError, OSError, ValueError) as exc:
            log.warning("S5B stream %s from %s cut: %s", sid, peer, exc)
        finally:
            self._sockets.pop(sid, None)  # the reading thread closes the socket itself when it returns
        await self._complete(sid)

    def _ibb_stream(self, iq: slixmpp.Iq, tag: str) -> tuple[ET.Element, str, tuple[str, Sink, str]]:
        """The IBB element, its sid, and the accepted offer it belongs to (from the same full JID)."""
        el = iq.xml.find(q(NS_IBB, tag))
        sid = el.get("sid", "") if el is not None else ""
        entry = self._sinks.get(sid)
        if el is None or entry is None or entry[0] != iq["from"].full:
            raise XMPPError("item-not-found", "no accepted offer with this stream id")
        return el, sid, entry

    def _on_ibb_open(self, iq: slixmpp.Iq) -> None:
        el, _sid, _entry = self._ibb_stream(iq, "open")
        if int(el.get("block-size", "0")) > 65535 or el.get("stanza", "iq") != "iq":
            raise XMPPError("resource-constraint", "block-size up to 65535 with stanza='iq' only", etype="modify")
        iq.reply().send()

    def _on_ibb_data(self, iq: slixmpp.Iq) -> None:
        el, sid, entry = self._ibb_stream(iq, "data")
        try:
            entry[1].write(base64.b64decode(el.text or "", validate=True))
        except ValueError as exc:
            self._drop(sid, f"bad IBB data: {exc}")
            raise XMPPError("bad-request", "data is not valid base64") from exc
        iq.reply().send()

    def _on_ibb_close(self, iq: slixmpp.Iq) -> None:
        _el, sid, _entry = self._ibb_stream(iq, "close")
        iq.reply().send()
        self._spawn(self._complete(sid))

    async def _complete(self, sid: str) -> None:
        entry = self._sinks.pop(sid, None)
        if entry is None:
            return
        peer, sink, _method = entry
        if sink.offset < sink.size:
            detail = f"{sink.offset} of {sink.size} bytes before the stream ended"
            sink.close(detail)  # kept: the sender re-offers and resumes at our offset
            outcome = "incomplete"
        else:
            ok, detail = await asyncio.to_thread(sink.finish)
            outcome = "received" if ok else "rejected"
        iq = self.make_iq_set(ito=peer)
        iq.xml.append(build_result(sid, outcome, detail))
        with contextlib.suppress(IqError, IqTimeout):
            await iq.send(timeout=self.settings.iq_timeout_s)

    def _drop(self, sid: str, reason: str) -> None:
        _shut(self._sockets.pop(sid, None))
        reader = self._readers.pop(sid, None)
        if reader is not None:
            reader.cancel()
        entry = self._sinks.pop(sid, None)
        if entry is not None:
            entry[1].close(reason)

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
            raise XMPPError("item-not-found", f"no study {receipt.study_instance_uid} with this bundle was sent to you")
        iq.reply().send()


S5B_BLOCK_BYTES = 1 << 20


def _pump_s5b(sock: socket.socket, sink: Sink, idle_timeout_s: float) -> None:
    """Read an inbound S5B stream into ``sink`` until its announced size, the sender's end of stream, or
    ``idle_timeout_s`` without a byte (then ``TimeoutError``). Blocking ``recv_into`` with MSG_WAITALL
    fills a whole 1 MiB block per system call whatever piece size the proxy relays (stock proxy65: 4 KiB),
    and the sink splits, hashes and writes it on this same thread (all of which release the GIL)."""
    seconds = max(1, int(idle_timeout_s))
    block = memoryview(bytearray(S5B_BLOCK_BYTES))
    received = sink.offset
    with sock:  # this thread owns the socket: others only shut it down to end the stream
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, 0))
        while received < sink.size:
            want = min(S5B_BLOCK_BYTES, sink.size - received)
            try:
                count = sock.recv_into(block[:want], want, socket.MSG_WAITALL)
            except BlockingIOError as exc:  # SO_RCVTIMEO expired with nothing read
                raise TimeoutError(f"no byte for {seconds} s") from exc
            if count == 0:
                return  # the sender (or a stop) ended the stream: the sink keeps what came
            sink.write(block[:count])
            received += count


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


def _shut(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


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
    return str(exc) or type(exc).__name__
