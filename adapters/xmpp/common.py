"""What the XMPP adapter's parts share: settings, the ports to the core, the state of a stream, helpers.

- :class:`XmppSettings`: the agent's configuration (built by the composition root from ``gateway.settings``).
- :class:`InboundPort`: what the agent asks the core (admission, sinks, receipts, pins, audit, status);
  :class:`Sink`: where an accepted bundle's bytes go.
- :class:`InboundStream` / :class:`OutboundStream`: one accepted inbound offer, one end-to-end IBB stream we send.
- :class:`TransferCut`: a bytestream failed after it started; the next offer resumes at the receiver's offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from slixmpp.exceptions import IqError, IqTimeout

from adapters.xmpp.e2e import Identity, TlsPipe
from adapters.xmpp.stanzas import (
    NS_IBB,
    NS_S5B,
    Offer,
    Receipt,
)
from gateway.outage import reason, said, unreachable
from gateway.retry import PEER_SPOOL_FULL
from gateway.wire import FrameDecoder

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
    ibb_idle_timeout_s: float = 120.0  # an open inbound IBB stream with no block for this long counts as cut
    iq_timeout_s: float = 30.0
    proxy_address: tuple[str, int] | None = None  # override the address the proxy advertises (NAT, relays)
    ca_file: str = ""  # PEM CA bundle for the server's certificate; empty: the system store
    server_cert_sha256: str = ""  # optional pin of the server's certificate (64 hex digits)
    identity: Identity | None = None  # this gateway's end-to-end identity
    require_e2e: bool = True  # no pinned peer certificate, no exchange
    stream_start_timeout_s: float = 60.0  # an accepted offer whose stream does not start is released
    handshake_timeout_s: float = 15.0  # ... and one whose end-to-end TLS handshake is not done by then
    compress: bool = True  # offer and accept the bundle as compressed frames (gateway.wire)
    servers: tuple[tuple[str, int], ...] = ()  # the server's nodes, tried in turn; empty: (host, port)
    dns_servers: tuple[str, ...] = ()  # resolvers for the SRV lookup ("ip:port"); empty: the system's
    reconnect_s: float = 5.0  # the longest wait between connection attempts (the next node is tried at once)
    presence_min_interval_s: float = 2.0  # flow-control presence at most this often (presence.FlowControl)

    @property
    def from_dns(self) -> bool:
        """No host and no servers: the nodes are looked up in DNS (``srv.py``)."""
        return not self.servers and not self.host

    def server_list(self) -> tuple[tuple[str, int], ...]:
        return () if self.from_dns else self.servers or ((self.host, self.port),)


class Sink(Protocol):
    """Where an accepted inbound bundle's bytes go (see ``adapters.inbox``)."""

    offset: int
    size: int
    bundle_key: str  # the manifest SHA-256: one sink per bundle at a time
    wire_bytes: int | None  # set by FramedSink: the stream's bytes when compressed (``offset`` counts the bundle's)

    def write(self, data: bytes | memoryview) -> None: ...
    def finish(self) -> tuple[bool, str]: ...
    def close(self, reason: str) -> None: ...


class InboundPort(Protocol):
    def screen(self, peer_jid: str, offer: Offer) -> tuple[str, str] | None:
        """From memory, on the event loop: None to go on to ``authorize``, else (condition, text)."""

    def authorize(self, peer_jid: str, offer: Offer) -> tuple[str, str] | None:
        """None to accept, else (stanza error condition, text). Blocking: called on a worker thread."""

    def release(self, offer: Offer) -> None:
        """Give back an admission ``authorize`` gave when no sink was opened for it."""

    def open_sink(self, peer_jid: str, offer: Offer, method: str) -> Sink:
        """Called only after ``authorize`` accepted; the sink's ``finish``/``close`` ends the admission."""

    def receipt(self, peer_jid: str, receipt: Receipt) -> str:
        """A delivery receipt from a peer we sent to: 'delivered' | 'failed' | 'noted' | 'unknown'."""

    def pin_for(self, peer_jid: str) -> str | None:
        """The pinned certificate fingerprint of a peer gateway (bare JID), if any."""

    def signing_for(self, peer_jid: str) -> str | None:
        """The fingerprint of our identity the peer pins, as its last completed exchange showed (kept across restarts)."""

    def note_signing(self, peer_jid: str, fingerprint: str) -> None:
        """The identity of ours the peer pins: a bundle from it came under that handshake, or its signed verdict
        took ours."""

    def security_event(self, peer_jid: str, text: str) -> None:
        """A refused end-to-end channel (pin mismatch, failed handshake): audited."""

    def statement_refused(self, peer_jid: str, text: str) -> None:
        """A verdict or receipt refused (wrong sender, bad signature, outcome outside the set): audited
        ``receipt_refused``, counted in memory (called on the event loop: no I/O)."""

    def status_changed(self, status: dict[str, Any]) -> None:
        """The XMPP connection's state changed (``GatewayAgent.status``)."""

    def server_announcement(self, server: str, text: str) -> None:
        """A message from the XMPP server itself (its bare domain): an operator's broadcast."""


STREAM_GRACE_S = 60.0  # an inbound stream may start slowly for this long ...
MIN_STREAM_BYTES_PER_S = 1024  # ... then must have averaged this (the DICOM SCP's floor for a data set)


def spool_full(exc: BaseException) -> str:
    """What an inbound stream's error means when it is this gateway's spool being full (said in the verdict and
    the log instead of the OS error), else ""."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return PEER_SPOOL_FULL
    return ""


def spool_full_said(text: str) -> bool:
    """The receiver said its spool is full: another method would meet the same disk (no fallback to IBB)."""
    return PEER_SPOOL_FULL in text


class RateFloor:
    """The bytes of one inbound stream against a floor: once ``STREAM_GRACE_S`` have passed since it began, it
    must have averaged ``MIN_STREAM_BYTES_PER_S``; :meth:`add` raises ``TimeoutError`` otherwise. The idle
    limits end a stream that stops; this ends one that trickles (a byte now and then, within the idle limit),
    which would otherwise hold its inbound slot for as long as its sender or a relaying proxy liked."""

    def __init__(self, min_bytes_per_s: float | None = None, grace_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.min_bytes_per_s = MIN_STREAM_BYTES_PER_S if min_bytes_per_s is None else min_bytes_per_s
        self.grace_s = STREAM_GRACE_S if grace_s is None else grace_s
        self._clock = clock
        self._started = clock()
        self.total = 0

    def add(self, count: int) -> None:
        self.total += count
        elapsed = self._clock() - self._started
        if elapsed > self.grace_s and self.total < self.min_bytes_per_s * elapsed:
            raise TimeoutError(f"stream at {self.total / elapsed:.0f} bytes/s after {elapsed:.0f} s "
                               f"(at least {self.min_bytes_per_s:.0f} required)")


@dataclass
class InboundStream:
    """An accepted offer: where its bytes go, and its end-to-end channel."""

    peer: str  # full JID of the sender
    sink: Sink
    method: str
    tls: ssl.SSLContext | None  # None: plaintext (lab only)
    pipe: TlsPipe | None = None  # IBB: TLS over the blocks
    next_seq: int = 0  # XEP-0047: the seq the next block from the sender must carry
    out_seq: int = 0  # our blocks back to the sender (TLS handshake records)
    started: bool = False  # the bytestream was opened
    secured: bool = False  # the end-to-end TLS handshake finished (set by the reader thread for S5B)
    priority: str = "routine"  # the offer's: a STAT offer resets the sender's routine streams (StudyOffers)
    start_offset: int = 0  # the sink's offset when the offer was accepted (a stream that brought nothing)
    ours: str = ""  # fingerprint of our identity its handshake presents (the one the sender pins): its verdict's key
    last_block_at: float = 0.0  # IBB: time.monotonic() of the stream's opening or its last data block
    floor: RateFloor | None = None  # IBB: its rate since it opened
    # IBB: blocks are written to the sink on worker threads, one after the other (``InBandBytestreams``):
    accepted: int = 0  # the sink's offset once every block taken so far is written
    writing: asyncio.Future[None] | None = None  # the last block's write (each waits for the one before)
    queued: int = 0  # blocks taken whose write has not ended
    write_failed: bool = False  # a write failed: the blocks behind it are not written
    ended_for: str = ""  # why a write ended the stream (the spool full): said by whichever end runs first
    # S5B: our leg to the proxy the offer named (``Offer.streamhost``), opened while we answered it; taken by
    # the XEP-0065 query that names the same streamhost, closed otherwise (``s5b.discard_early``).
    early: asyncio.Future[socket.socket] | None = None
    early_for: tuple[str, str, int] | None = None


@dataclass
class AwaitedVerdict:
    """A stream we sent whose verdict we wait for: only ``peer`` (the full JID the offer was agreed with) may
    give it, signed with the key pinned as ``pin`` when there is one (``adapters.xmpp.attest``)."""

    future: asyncio.Future[tuple[str, str]]
    peer: str
    pin: str | None


@dataclass
class OutboundStream:
    """An IBB stream we send on end to end: the receiver's TLS records come back on it."""

    peer: str
    pipe: TlsPipe
    handshake: asyncio.Future[None]
    next_seq: int = 0
    pending: list[bytes] = field(default_factory=list)


class FramedSink:
    """A sink that takes the bundle as compressed frames (``gateway.wire``) and hands the original bytes to
    ``inner``; ``offset`` and ``size`` stay those of the original bundle. A frame that is not valid raises
    :class:`gateway.wire.FrameError` (a ValueError: the stream is closed with a verdict)."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.decoder = FrameDecoder()
        self.bundle_key = getattr(inner, "bundle_key", None)

    @property
    def offset(self) -> int:
        return self.inner.offset

    @property
    def size(self) -> int:
        return self.inner.size

    def wanted(self) -> int:
        """Wire bytes that complete the frame under way (so a reader never waits past the last frame)."""
        return self.decoder.wanted()

    def write(self, data: bytes | memoryview) -> None:
        for piece in self.decoder.feed(data):
            if self.inner.offset + len(piece) > self.inner.size:
                raise OverflowError(f"data past the announced size of {self.inner.size} bytes")
            self.inner.write(piece)
        self.inner.wire_bytes = self.decoder.wire_bytes  # the transfer row's wire bytes (study bytes: ``offset``)

    def close(self, reason: str) -> None:
        self.inner.close(reason)

    def finish(self) -> tuple[bool, str]:
        if self.decoder.pending:
            self.inner.close("a partial frame at the end of the stream")
            return False, "a partial frame at the end of the stream"
        return self.inner.finish()


class StreamLost(IqTimeout):
    """The XMPP connection dropped while an IQ waited for its answer (or none could be sent): failed at
    once instead of waiting out the IQ timeout."""

    def __str__(self) -> str:
        return "XMPP connection lost"


class TransferCut(ConnectionError):
    """A bytestream failed after it started; the next offer resumes at the receiver's offset."""


async def on_own_thread(name: str, fn: Callable[..., Any], *args: object) -> Any:
    """Run a long blocking ``fn`` on a new daemon thread (not the loop's shared executor) and await its end
    (its result, or its exception). It runs in a copy of the caller's context, so its log lines carry the same
    fields (``gateway.logs``)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def finish(result: object, exc: BaseException | None) -> None:
        if not done.done():
            done.set_exception(exc) if exc is not None else done.set_result(result)

    def run() -> None:
        result, outcome = None, None
        try:
            result = context.run(fn, *args)
        except BaseException as exc:  # handed to the awaiting coroutine, which decides
            outcome = exc
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody waits any more
            loop.call_soon_threadsafe(finish, result, outcome)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done


def log_task_failure(task: asyncio.Future[Any]) -> None:
    """A done-callback: no exception of a background task is lost; it is logged with its traceback."""
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        if unreachable(exc):  # one line: the outage itself is said once (gateway.outage)
            log.error("background task failed: %s (%s)", said(exc), reason(exc))
            return
        log.error("background task failed: %s", describe(exc), exc_info=exc)


def abort(sock: socket.socket) -> None:
    """End a TCP connection with a reset (SO_LINGER 0): queued bytes are dropped at both ends, not sent."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    shut(sock)


def shut(sock: socket.socket | None, close: bool = False) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        if close:
            sock.close()


def progress_in_thread(progress: Callable[..., None] | None, sid: str = "", offset: int = 0,
                       plain_at: Callable[[int], int] = lambda wire: wire) -> Callable[..., None] | None:
    """Progress callbacks write to the DB: keep them off the event loop, at most one in flight. The callback
    gets (position, method, sid, offset): the stream attempt it belongs to and where that attempt started;
    ``position`` in the bundle's own bytes (``plain_at`` turns the stream's bytes since ``offset`` into them).
    A position that comes while a write is in flight waits, the latest one, and is written after it; the
    ``final`` one (every byte handed to the network) also gets ``final=True``, which the writer does not thin
    out. Without both, a busy machine's pump that handed the rest of a study to the socket buffers during one
    slow write left the queue at `sending 0.2 %` for the whole stream (the buffers held megabytes)."""
    if progress is None:
        return None
    running: list[asyncio.Future[None]] = []
    waiting: list[tuple[tuple[int, str, str, int], bool]] = []  # the latest position that came meanwhile

    def write(args: tuple[int, str, str, int], final: bool) -> None:
        job = asyncio.to_thread(progress, *args, final=True) if final else asyncio.to_thread(progress, *args)
        running[:] = [asyncio.ensure_future(job)]
        running[0].add_done_callback(written)

    def written(_done: asyncio.Future[None]) -> None:
        if waiting:
            write(*waiting.pop())

    def call(position: int, method: str, final: bool = False) -> None:
        args = (offset + plain_at(position - offset), short_method(method).lower(), sid, offset)
        if running and not running[0].done():
            if not (waiting and waiting[0][1]):  # nothing comes after the final position
                waiting[:] = [(args, final)]
            return
        write(args, final)

    return call


def short_method(method: str) -> str:
    return {NS_S5B: "S5B", NS_IBB: "IBB"}.get(method, method or "?")


def describe(exc: BaseException) -> str:
    if isinstance(exc, StreamLost):
        return str(exc)
    if isinstance(exc, IqError):
        return f"{exc.iq['error']['condition']}: {exc.iq['error']['text']}"
    if isinstance(exc, IqTimeout):
        return "no answer (timeout)"
    if isinstance(exc, ssl.SSLError):
        return getattr(exc, "verify_message", "") or str(exc)
    return str(exc) or type(exc).__name__


class Phases:
    """Where one attempt's time goes (sender side): each step's milliseconds since the previous one and the
    exchanges with the far side it waited for (an IQ answered through the server, a SOCKS5 reply, a TLS
    flight pair), so that the round trips before the first byte are counted per attempt and logged."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.steps: list[tuple[str, float, float]] = []  # (step, ms, exchanges awaited)

    def mark(self, step: str, exchanges: float = 0.0) -> None:
        now = time.perf_counter()
        self.steps.append((step, (now - self._last) * 1000.0, exchanges))
        self._last = now

    def round_trips_before_data(self) -> float:
        total = 0.0
        for step, _ms, exchanges in self.steps:
            if step == "stream":
                break
            total += exchanges
        return total

    def table(self) -> dict[str, float]:
        found: dict[str, float] = {}
        for step, ms, _exchanges in self.steps:
            found[step] = round(found.get(step, 0.0) + ms, 1)
        found["round_trips_before_data"] = self.round_trips_before_data()
        return found

    def describe(self) -> str:
        steps = ", ".join(f"{step} {ms:.0f} ms" for step, ms, _ in self.steps)
        trips = self.round_trips_before_data()
        return f"{steps}; {trips:g} round trip{'' if trips == 1 else 's'} before the first byte"


class XmppClient(Protocol):
    """What the protocol parts (``Socks5Bytestreams``, ``InBandBytestreams``, ``StudyOffers``) use of the agent:
    its session (stanzas, IQs and their answers, handlers), its settings, the gateway behind it and our
    end-to-end identities. Nothing else of the agent is theirs to touch."""

    settings: XmppSettings
    inbound: InboundPort
    identities: Any  # adapters.xmpp.e2e.Identities | None: replaced whole when the key files change
    boundjid: Any
    plugin: Any

    def make_iq_set(self, *args: Any, **kwargs: Any) -> Any: ...
    def make_iq_get(self, *args: Any, **kwargs: Any) -> Any: ...
    async def send_iq(self, iq: Any, timeout_s: float | None = None) -> Any: ...
    def send_stanza_text(self, data: str) -> None: ...
    def new_id(self) -> str: ...
    def register_handler(self, handler: Any) -> None: ...
    def track(self, future: asyncio.Future[Any], iq: Any) -> None: ...
    def spawn(self, coro: Any) -> None: ...


class StreamEnds(Protocol):
    """Where a transport hands an inbound stream's end (``StudyOffers``: the verdict goes from there)."""

    sinks: dict[str, InboundStream]

    async def complete(self, sid: str, reason: str = "") -> None: ...
    async def fail_stream(self, sid: str, exc: BaseException) -> None: ...
    def drop(self, sid: str, reason: str) -> None: ...
    async def send_verdict(self, peer: str, sid: str, outcome: str, detail: str, ours: str = "") -> None: ...
    async def offer_decided(self, sid: str, peer: str) -> None: ...
