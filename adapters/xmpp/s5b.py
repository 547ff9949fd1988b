"""XEP-0065 SOCKS5 Bytestreams, mediated through the server's proxy (the only mode slixmpp's plugin and
Prosody's mod_proxy65 offer between two clients behind NAT).

Sender: find the proxy (disco#items, then a bytestreams query; cached), send the streamhost to the
receiver, connect to the proxy with DST.ADDR = SHA1(sid + initiator + target) (XEP-0065 5.3.2), activate,
then (end to end) TLS 1.3 as the client, the receiver's pin checked before the first byte, and stream.
On a proxy that links the two legs as soon as both are connected (disco feature ``NS_EARLY_LINK``: the
variant in conf/prosody) both legs send their SOCKS5 greeting and request in one packet and the sender's
TLS handshake starts as soon as its leg is up, so that it ends about when the receiver's leg is there.
Receiver: connect to the offered streamhost (at most four tried), answer ``streamhost-used``, read the
stream on a thread of its own (``_pump_s5b``: whole 1 MiB blocks, an idle limit, TLS server side when the
offer carried a certificate) into the sink; its end, or its failure, ends in a verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import threading
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout, XMPPError

from adapters.xmpp import socks5
from adapters.xmpp.common import (
    Phases,
    RateFloor,
    Sink,
    StreamEnds,
    TransferCut,
    XmppClient,
    abort,
    describe,
    log_task_failure,
    on_own_thread,
    shut,
    spool_full,
)
from adapters.xmpp.e2e import PinMismatch, TlsSocket, check_pin
from adapters.xmpp.stanzas import NS_S5B, q
from gateway.logs import set_fields
from gateway.transfer import StreamSuspended

log = logging.getLogger(__name__)

NS_EARLY_LINK = "urn:dicomgw:proxy65:early-link"  # the proxy's disco feature (conf/prosody/plugins/mod_proxy65.lua)


class OutboundLeg:
    """Our leg to the proxy for one attempt, opened while the offer is answered. ``connected``: the socket once
    the proxy answered its SOCKS5 request. With ``handshake`` (a proxy that links the legs as soon as both are
    connected) the end-to-end TLS handshake then starts on it at once, on a thread of its own: ``secured``
    gives the TLS socket (its flights wait in the proxy until the receiver's leg joins). ``control``, a second
    descriptor of the socket, shuts it from the loop whichever thread holds it; :meth:`discard` ends a leg the
    attempt does not use, on every path (closed now, or when its thread ends)."""

    def __init__(self, connect: Callable[[], Awaitable[socket.socket]],
                 handshake: Callable[[socket.socket], TlsSocket] | None, name: str) -> None:
        self.control: socket.socket | None = None
        self.secured: asyncio.Future[TlsSocket] | None = None
        self._lock = threading.Lock()
        self._discarded = False
        self._handshake, self._name = handshake, name
        self.connected: asyncio.Future[socket.socket] = asyncio.ensure_future(self._connect(connect))

    @property
    def handshakes(self) -> bool:
        """Whether the TLS handshake runs on this leg as soon as it is up."""
        return self._handshake is not None

    async def _connect(self, connect: Callable[[], Awaitable[socket.socket]]) -> socket.socket:
        sock = await connect()
        with self._lock:
            if self._discarded:
                sock.close()
                raise socks5.Socks5Error("the attempt went another way")
            self.control = sock.dup()
        if self._handshake is not None:
            self.secured = asyncio.ensure_future(on_own_thread(self._name, self._secure, sock))
            self.secured.add_done_callback(lambda done: done.cancelled() or done.exception())  # read, if unused
        return sock

    def _secure(self, sock: socket.socket) -> TlsSocket:
        assert self._handshake is not None
        stream = self._handshake(sock)
        with self._lock:
            if self._discarded:  # discarded while the handshake ran: nobody takes it
                stream.close()
                raise socks5.Socks5Error("the attempt went another way")
        return stream

    def take_control(self) -> socket.socket:
        """The second descriptor, now the caller's to shut and close (the leg is handed over)."""
        assert self.control is not None
        control, self.control = self.control, None
        return control

    def discard(self) -> None:
        with self._lock:
            self._discarded = True
            control, self.control = self.control, None
        shut(control, close=True)  # ends a handshake blocked on its thread
        if self.secured is None:
            discard_early(self.connected)
        else:  # the handshake's thread owns the socket (closing it here could close a reused descriptor)
            discard_early(self.secured)


class Socks5Bytestreams:
    """XEP-0065 for the agent: its own state is the proxy of this session (looked up once, forgotten when the
    session ends), and per inbound stream the reading task and the socket the loop may shut down. It uses of
    the agent only what ``XmppClient`` declares; an inbound stream's end goes to ``ends`` (the offers)."""

    def __init__(self, client: XmppClient) -> None:
        self.client = client
        self.ends: StreamEnds = None  # type: ignore[assignment]  # the offers, set by the agent once they exist
        self.proxy: tuple[str, str, int] | None = None  # (jid, host, port) of this session's proxy65
        self.links_early = False  # that proxy says NS_EARLY_LINK (pipelined SOCKS5, legs linked when both are up)
        self.readers: dict[str, asyncio.Future[None]] = {}  # sid -> the task reading an inbound stream
        self.sockets: dict[str, socket.socket] = {}  # sid -> inbound socket (a dup) to shut from the loop

    def session_ended(self) -> None:
        self.proxy = None  # the next session may be on another node, with its own proxy65
        self.links_early = False

    def release(self, sid: str) -> None:
        """An inbound stream dropped: its socket shut (the reading thread returns) and its task cancelled."""
        shut(self.sockets.pop(sid, None), close=True)
        reader = self.readers.pop(sid, None)
        if reader is not None:
            reader.cancel()

    def reset(self, sid: str) -> bool:
        """A TCP reset of an inbound stream (a STAT study from its sender comes first); False if none runs."""
        sock = self.sockets.get(sid)
        if sock is None:
            return False
        abort(sock)
        return True

    def stop(self) -> None:
        for sock in list(self.sockets.values()):
            shut(sock)  # the reader threads see the end of their stream and return

    async def discover_proxy(self) -> tuple[str, str, int]:
        if self.proxy is None:
            items = await self.client.plugin["xep_0030"].get_items(jid=self.client.boundjid.domain, timeout=self.client.settings.iq_timeout_s)
            for item in items["disco_items"]["items"]:
                iq = self.client.make_iq_get(ito=item[0])
                ET.SubElement(iq.xml, q(NS_S5B, "query"))
                try:
                    response = await self.client.send_iq(iq)
                except (IqError, IqTimeout):
                    continue
                host = response.xml.find(f"{q(NS_S5B, 'query')}/{q(NS_S5B, 'streamhost')}")
                if host is not None and host.get("host") and host.get("port"):
                    address = self.client.settings.proxy_address or (host.get("host", ""), int(host.get("port", "0")))
                    self.links_early = await self._links_early(host.get("jid", item[0]))
                    self.proxy = (host.get("jid", item[0]), address[0], address[1])
                    break
            if self.proxy is None:
                raise TransferCut("the server offers no SOCKS5 proxy (XEP-0065)")
        return self.proxy

    async def _links_early(self, proxy_jid: str) -> bool:
        """Whether the proxy says it links the legs as soon as both are connected (its disco#info)."""
        try:
            info = await self.client.plugin["xep_0030"].get_info(jid=proxy_jid, timeout=self.client.settings.iq_timeout_s)
        except (IqError, IqTimeout):
            return False
        return NS_EARLY_LINK in info["disco_info"]["features"]

    def connect_early(self, peer: str, sid: str, tls: ssl.SSLContext | None = None, pin: str = "") -> OutboundLeg:
        """Our leg to the proxy of this session (known: looked up at session start), opened while the offer is
        answered (nothing is relayed before both legs are there). The proxies we run on (Prosody's mod_proxy65
        and its variant, ejabberd's) pair the two legs by DST.ADDR in either order. With ``tls`` on a proxy that
        links the legs early, the handshake starts at once too (see :class:`OutboundLeg`)."""
        digest = socks5.dst_addr(sid, self.client.boundjid.full, peer)

        async def connect() -> socket.socket:
            _jid, host, port = await self.discover_proxy()  # known already, unless the lookup at start failed
            return await asyncio.to_thread(socks5.connect_blocking, host, port, digest, pipelined=self.links_early)

        idle_s = self.client.settings.s5b_idle_timeout_s
        early_tls = tls is not None and self.proxy is not None and self.links_early
        return OutboundLeg(connect, (lambda sock: _secure(sock, tls, pin, peer, idle_s)) if early_tls else None,
                           f"s5b-tls-{sid[:8]}")

    def connect_streamhost_early(self, sid: str, peer: str, streamhost: tuple[str, str, int],
                                 pipelined: bool = False) -> asyncio.Future[socket.socket]:
        """The receiver's leg to the proxy an accepted offer named, opened while the accept travels (the sender's
        XEP-0065 query then finds it ready). Only for an admitted offer; the query still decides. ``pipelined``:
        the offer says that proxy takes the SOCKS5 greeting and request in one packet."""
        return asyncio.ensure_future(asyncio.to_thread(
            socks5.connect_blocking, streamhost[1], streamhost[2], socks5.dst_addr(sid, peer, self.client.boundjid.full),
            pipelined=pipelined))

    def ask_streamhost(self, peer: str, sid: str) -> asyncio.Future[Any] | None:
        """The streamhost query, sent right behind the offer (before its answer) when this session's proxy is
        known: the receiver answers it once it has accepted the offer and its own leg is up, so the query costs
        no round trip of its own. None when the proxy is not known yet (:meth:`send` asks after the offer)."""
        if self.proxy is None:
            return None
        answer = asyncio.ensure_future(self.client.send_iq(self._streamhost_query(peer, sid, self.proxy)))
        answer.add_done_callback(lambda done: done.cancelled() or done.exception())  # an unused one's error is read
        return answer

    def _streamhost_query(self, peer: str, sid: str, proxy: tuple[str, str, int]) -> slixmpp.Iq:
        iq = self.client.make_iq_set(ito=peer)
        query = ET.SubElement(iq.xml, q(NS_S5B, "query"), {"sid": sid, "mode": "tcp"})
        ET.SubElement(query, q(NS_S5B, "streamhost"), {"jid": proxy[0], "host": proxy[1], "port": str(proxy[2])})
        return iq

    async def send(self, peer: str, sid: str, chunks: Iterator[bytes], offset: int,
                        progress: Callable[..., None] | None, tls: ssl.SSLContext | None, pin: str | None,
                        moved: list[int], early: OutboundLeg | None = None,
                        phases: Phases | None = None, asked: asyncio.Future[Any] | None = None) -> int:
        """Stream through the proxy. ``early``: our leg, opened while the offer was answered (its TLS handshake
        too, on a proxy that links early); ``asked``: the streamhost query sent behind the offer
        (:meth:`ask_streamhost`), asked again here if that one failed."""
        phases = phases or Phases()
        if early is None:
            early = self.connect_early(peer, sid)
        try:
            proxy_jid, host, port = await self.discover_proxy()
            answered = False
            if asked is not None:
                with contextlib.suppress(IqError, IqTimeout):  # a receiver that looked for it before deciding
                    await asked                                # the offer (an older version): asked once more
                    answered = True
                    phases.mark("streamhost", 0)  # its round trip overlapped the offer's
            if not answered:  # answered once the receiver's leg is up (its SOCKS5 exchanges inside)
                await self.client.send_iq(self._streamhost_query(peer, sid, (proxy_jid, host, port)))
                phases.mark("streamhost", 1)
            waited = not early.connected.done()
            sock = await early.connected
            # our own SOCKS5 greeting and request (one exchange when pipelined), if not done meanwhile
            phases.mark("proxy", (1 if self.links_early else 2) if waited else 0)
            control = early.take_control()
        except BaseException:
            early.discard()
            raise
        loop = asyncio.get_running_loop()
        report = ((lambda position, final=False: loop.call_soon_threadsafe(progress, offset + position, "s5b", final))
                  if progress else None)
        pump: asyncio.Future[Any] | None = None
        # ``control``: a second descriptor of the socket, which a TLS wrap on another thread takes over; it can
        # still shut it (and so end a handshake or a write blocked on its thread).
        try:
            activate = self.client.make_iq_set(ito=proxy_jid)
            ET.SubElement(ET.SubElement(activate.xml, q(NS_S5B, "query"), {"sid": sid}), q(NS_S5B, "activate")).text = peer
            activation = asyncio.ensure_future(self.client.send_iq(activate))
            if early.secured is not None:
                # The handshake ran since our leg was up; the proxy linked the legs when the receiver's joined.
                # The activation is sent all the same (a proxy that did not link early links now). Its answer
                # counts only while the handshake has not ended (a refusal then ends it): a finished handshake
                # shows the legs are linked, and a small study may be through (its legs closed, the proxy's
                # answer then item-not-found) before the proxy reads the activation.
                activation.add_done_callback(lambda done: done.cancelled() or done.exception())  # read, not raised
                try:
                    await asyncio.wait([early.secured, activation], return_when=asyncio.FIRST_COMPLETED)
                    if not early.secured.done() and (refused := activation.exception()) is not None:
                        raise refused
                    sock = await early.secured
                except BaseException:
                    shut(control)  # a handshake still waiting on its thread ends now
                    raise
                phases.mark("tls", 0)  # its round trip overlapped the offer's and the streamhost's
                tls, secured = None, None  # the pump sends on the TLS socket as it is
            else:
                # The TLS handshake starts behind the activation: both proxies hold what a leg sends before it
                # (Prosody pauses the leg, ejabberd stops reading it) and relay it once the legs are linked.
                secured = (lambda: loop.call_soon_threadsafe(phases.mark, "tls", 1)) if tls is not None else None
            pump = asyncio.ensure_future(on_own_thread(f"s5b-out-{sid[:8]}", _pump_out, sock, chunks, tls, pin or "",
                                                       peer, moved, report, self.client.settings.s5b_idle_timeout_s, secured))
            if early.secured is None:
                try:
                    await activation
                except BaseException as exc:
                    if not (self.links_early and _pair_gone(exc) and await _through(pump, ACTIVATION_GRACE_S)):
                        shut(control)  # the handshake waits for an answer that cannot come: it ends now
                        await _ended(pump)
                        raise
                    # A proxy that links early linked the legs when both were up: a small study was through
                    # and its legs closed before the proxy read the activation ("item-not-found"). The pump
                    # ended well; the receiver's verdict decides, as on every other path.
                phases.mark("activate", 0 if tls is not None else 1)  # with TLS: its round trip is inside the handshake's
            await pump
            phases.mark("stream")
            return moved[0]
        except PinMismatch:
            raise
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            raise TransferCut(f"SOCKS5 stream cut: {describe(exc)}") from exc
        finally:
            if pump is not None and not pump.done():  # cancelled: the sending thread ends with its socket
                shut(control)
                await _ended(pump)
            shut(sock)  # not handed to a thread (closed by it otherwise)
            control.close()

    async def on_query(self, iq: slixmpp.Iq) -> None:
        if iq["type"] != "set":
            return
        query = iq.xml.find(q(NS_S5B, "query"))
        sid = query.get("sid", "") if query is not None else ""
        await self.ends.offer_decided(sid, iq["from"].full)  # sent right behind its offer: that offer first
        entry = self.ends.sinks.get(sid)
        if entry is None or entry.peer != iq["from"].full or entry.started:
            raise XMPPError("item-not-found", "no accepted offer with this stream id")
        entry.started = True
        set_fields(peer=entry.peer.split("/", 1)[0], transfer_id=sid)  # and of its stream (the reader inherits them)
        hosts = [h for h in query.iterfind(q(NS_S5B, "streamhost")) if h.get("host") and (h.get("port") or "").isdigit()]
        for host in hosts[:4]:
            named = (host.get("jid", ""), host.get("host", ""), int(host.get("port", "0")[:6]))
            early, entry.early = (entry.early, None) if entry.early_for == named else (None, entry.early)
            try:
                try:
                    if early is None:
                        raise socks5.Socks5Error("no early leg")
                    sock = await early  # opened while we answered the offer (its hint named this streamhost)
                except (socks5.Socks5Error, OSError, ValueError):  # (a proxy that refused a pipelined request too)
                    sock = await asyncio.to_thread(
                        socks5.connect_blocking, named[1], named[2], socks5.dst_addr(sid, entry.peer, self.client.boundjid.full))
            except (socks5.Socks5Error, ValueError, OverflowError) as exc:
                log.warning("streamhost %s unusable: %s", host.get("jid"), exc)
                continue
            if self.ends.sinks.get(sid) is not entry:  # dropped or superseded while we connected
                sock.close()
                raise XMPPError("item-not-found", "the offer was withdrawn")
            reply = iq.reply()
            ET.SubElement(ET.SubElement(reply.xml, q(NS_S5B, "query"), {"sid": sid}), q(NS_S5B, "streamhost-used"), {"jid": host.get("jid", "")})
            reply.send()
            self.sockets[sid] = sock.dup()  # to shut the stream down from the loop (the reader may wrap it in TLS)
            self.readers[sid] = asyncio.ensure_future(self._receive(sid, sock))
            self.readers[sid].add_done_callback(lambda _t, sid=sid: self.readers.pop(sid, None))
            self.readers[sid].add_done_callback(log_task_failure)
            return
        self.ends.drop(sid, "no streamhost reachable")
        raise XMPPError("item-not-found", "none of the streamhosts could be reached")

    async def _receive(self, sid: str, sock: socket.socket) -> None:
        """The stream is read on a thread of its own (see :func:`_pump_s5b`); the loop only waits for its end."""
        entry = self.ends.sinks[sid]
        failure: BaseException | None = None
        reason = ""
        try:
            await on_own_thread(f"s5b-{sid[:8]}", _pump_s5b, sock, entry.sink, self.client.settings.s5b_idle_timeout_s, entry.tls,
                                lambda: setattr(entry, "secured", True))
        except ssl.SSLError as exc:
            log.warning("S5B stream %s from %s: end-to-end TLS failed: %s", sid, entry.peer, exc)
            self.client.inbound.security_event(entry.peer.split("/")[0], f"end-to-end channel from {entry.peer} failed: {describe(exc)}")
        except (ConnectionError, OSError, ValueError) as exc:
            reason = spool_full(exc)
            log.warning("S5B stream %s from %s cut: %s", sid, entry.peer, reason or exc)
        except Exception as exc:  # ours (the sink's database, the disk): never lost in the task
            failure = exc
        finally:
            shut(self.sockets.pop(sid, None), close=True)  # the reading thread closes its own socket
        if failure is not None:
            await self.ends.fail_stream(sid, failure)
        else:
            await self.ends.complete(sid, reason)


S5B_BLOCK_BYTES = 1 << 20
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)  # Linux 3.12+
NOTSENT_LOWAT_BYTES = 256 << 10


def _pump_s5b(sock: socket.socket, sink: Sink, idle_timeout_s: float, tls: ssl.SSLContext | None = None,
              on_secured: Callable[[], None] | None = None, floor: RateFloor | None = None) -> None:
    """Read an inbound S5B stream into ``sink`` until its announced size, the sender's end of stream,
    ``idle_timeout_s`` without a byte, or a rate under ``floor`` (:class:`RateFloor`, from the end of the
    handshake; then ``TimeoutError``, what came kept). Plaintext: blocking ``recv_into`` with
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
                stream = TlsSocket(sock, tls, server_side=True).handshake()  # type: ignore[assignment]
            except BlockingIOError as exc:  # SO_RCVTIMEO
                raise TimeoutError(f"no TLS handshake within {seconds} s") from exc
            if on_secured is not None:
                on_secured()
        floor = floor or RateFloor()
        if isinstance(stream, TlsSocket):
            stream.on_pull = lambda _count: floor.add(0)  # the average so far, at every piece of a record
        failed: list[OSError] = []
        framed = getattr(sink, "wanted", None)  # compressed frames: read up to the end of the frame under way
        while sink.offset < sink.size:
            want = min(S5B_BLOCK_BYTES, framed() if framed else sink.size - received)
            try:
                count = _fill(stream, block[:want], failed, floor) if tls is not None else stream.recv_into(block[:want], want, socket.MSG_WAITALL)
            except (BlockingIOError, ssl.SSLWantReadError) as exc:  # SO_RCVTIMEO expired with nothing read
                raise TimeoutError(f"no byte for {seconds} s") from exc
            if count:
                sink.write(block[:count])
                received += count
                if tls is None:
                    floor.add(count)  # (inside TLS, _fill counts record by record)
            if failed:
                raise TimeoutError(f"no byte for {seconds} s") if isinstance(failed[0], (BlockingIOError, ssl.SSLWantReadError)) else failed[0]
            if count == 0:
                return  # the sender (or a stop) ended the stream: the sink keeps what came


ACTIVATION_GRACE_S = 5.0  # how long a pump may still take to end after the proxy no longer knows its pair


def _pair_gone(exc: BaseException) -> bool:
    """The proxy's answer to an activation of a pair it no longer (or never) knew."""
    return isinstance(exc, IqError) and exc.condition == "item-not-found"


async def _through(pump: asyncio.Future[Any], grace_s: float) -> bool:
    """The sending thread ended without an error within ``grace_s`` (every byte written and the receiver's
    close seen); False if it did not (it goes on: the caller shuts it)."""
    done, _pending = await asyncio.wait([pump], timeout=grace_s)
    return bool(done) and not pump.cancelled() and pump.exception() is None


async def _ended(task: asyncio.Future[Any]) -> None:
    """Wait for a sending thread we stopped; its error (the socket we shut) is read, not raised."""
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()


def _secure(sock: socket.socket, tls: ssl.SSLContext, pin: str, peer: str, idle_timeout_s: float) -> TlsSocket:
    """The end-to-end TLS handshake as the client on our leg (on its own thread), the receiver's certificate
    checked against ``pin``; the TLS socket comes back blocking, without a timeout (the pump sets its own)."""
    try:
        sock.settimeout(idle_timeout_s)
        stream = TlsSocket(sock, tls, server_side=False).handshake()
    except BaseException:
        sock.close()
        raise
    try:
        check_pin(stream, pin, peer)  # type: ignore[arg-type]
        stream.settimeout(None)
    except BaseException:
        stream.close()
        raise
    return stream


def discard_early(early: OutboundLeg | asyncio.Future[Any] | None) -> None:
    """An early proxy leg the attempt does not use (never one handed to a sending thread): closed now, or
    when its connect (or handshake) ends."""
    if isinstance(early, OutboundLeg):
        early.discard()
        return
    if early is None:
        return

    def close(task: asyncio.Future[socket.socket]) -> None:
        if not task.cancelled() and task.exception() is None:
            task.result().close()

    if early.done():
        close(early)
    else:
        early.add_done_callback(close)  # a connect on its thread cannot be cancelled: its socket is closed after


def _pump_out(sock: socket.socket, chunks: Iterator[bytes], tls: ssl.SSLContext | None, pin: str, peer: str,
              moved: list[int], report: Callable[..., object] | None, idle_timeout_s: float,
              secured: Callable[[], object] | None = None) -> None:
    """Send a bundle on an activated S5B socket (a thread of its own, blocking writes). End to end: TLS 1.3
    as the client, the receiver's certificate checked against ``pin`` before the first byte. Then a TCP
    half-close (no TLS close_notify: the receiver stops at the announced size) and a wait for the
    receiver to close, so that every byte was taken before the socket goes: a FIN, unlike a TLS alert, is
    an event Prosody's stock proxy65 acts on (its paused link otherwise leaves the tail unrelayed until the
    next event on the socket: 30 s of asyncio's TLS shutdown timeout, seen here)."""
    seconds = max(1, int(idle_timeout_s))
    with contextlib.ExitStack() as owned:
        owned.enter_context(sock)
        # A receiver (or a proxy) that stops reading without closing must not hold the sender for ever: a
        # write that makes no progress for the idle timeout fails the attempt (resumed later).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, 0))
        # Keep at most NOTSENT_LOWAT_BYTES not yet sent in the kernel (the bytes in flight still grow with the
        # link): progress then counts what went on the wire, and a STAT stream is not queued behind megabytes
        # of a routine one in our own send buffer.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)
        stream: socket.socket = sock
        if tls is not None:
            sock.settimeout(idle_timeout_s)
            stream = TlsSocket(sock, tls, server_side=False).handshake()  # type: ignore[assignment]
            check_pin(stream, pin, peer)  # type: ignore[arg-type]
            stream.settimeout(None)
            if secured is not None:
                secured()
        if hasattr(chunks, "on_suspend"):  # a routine stream: a STAT transfer resets it (gateway.dispatch)
            # A reset, not a FIN: what is queued in buffers along the path is dropped. The TLS socket owns the
            # descriptor once wrapped. The block source raises StreamSuspended, or a write fails meanwhile.
            chunks.on_suspend = lambda: abort(stream)
        try:
            for chunk in chunks:
                stream.sendall(chunk)
                moved[0] += len(chunk)
                if report is not None:
                    report(moved[0])
        except OSError as exc:  # ssl.SSLError too
            if getattr(chunks, "suspended", False):  # our own reset for a STAT transfer, not a cut
                raise StreamSuspended("suspended for a STAT transfer") from exc
            raise
        if report is not None:  # all handed on (the socket buffers may hold megabytes): said while B reads them
            report(moved[0], True)
        stream.shutdown(socket.SHUT_WR)  # on a TLS socket: drops the TLS layer, then the TCP half-close
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, 0))
        with contextlib.suppress(OSError):
            while stream.recv(65536):
                pass


def _fill(stream: socket.socket, view: memoryview, failed: list[OSError], floor: RateFloor | None = None) -> int:
    """Fill ``view`` from a TLS socket (one record per read, each counted against ``floor``); fewer bytes only
    at the end of the stream or before an error, which is then put in ``failed`` (what was authenticated
    before it is kept first)."""
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
        if floor is not None:
            try:
                floor.add(count)
            except TimeoutError as exc:
                failed.append(exc)
                return filled
    return filled
