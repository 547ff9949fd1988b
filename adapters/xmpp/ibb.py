"""XEP-0047 In-Band Bytestreams (IQ stanzas): the fallback when the proxy path fails.

Sender: open with 65535-byte blocks, keep ``ibb_window`` blocks in flight, close at the end; end to end,
a :class:`adapters.xmpp.e2e.TlsPipe` turns plaintext into the blocks' bytes and the receiver's TLS
records come back on the same stream. Receiver: sequence numbers are checked (a gap or a replay closes the
stream with ``unexpected-request`` and a verdict, XEP-0047 2.2), data past the announced size is refused,
every block is written on a worker thread (in order) and answered once written; ``close`` ends the stream
after those writes and brings the verdict.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Any
from xml.sax.saxutils import quoteattr

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout, XMPPError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher.id import MatcherId

from adapters.xmpp.common import (
    InboundStream,
    OutboundStream,
    Phases,
    RateFloor,
    StreamEnds,
    TransferCut,
    XmppClient,
    describe,
    spool_full,
)
from adapters.xmpp.e2e import PinMismatch, TlsPipe, check_pin
from adapters.xmpp.stanzas import NS_IBB, q, statement_text
from gateway.transfer import StreamSuspended

log = logging.getLogger(__name__)
MAX_QUEUED_BLOCKS = 256  # blocks of one stream taken but not yet written (our sender keeps `ibb_window` <= 64 in flight)


class _NotWritten(Exception):
    """A block behind a block whose write failed."""


class InBandBytestreams:
    """XEP-0047 for the agent: its own state is the streams we send end to end encrypted (their TLS pipe
    waits for the receiver's handshake records on the same IBB session). It uses of the agent only what
    ``XmppClient`` declares; an inbound stream's end goes to ``ends`` (the offers)."""

    def __init__(self, client: XmppClient) -> None:
        self.client = client
        self.ends: StreamEnds = None  # type: ignore[assignment]  # the offers, set by the agent once they exist
        self.outbound: dict[str, OutboundStream] = {}  # sid -> our end-to-end IBB stream

    def sending(self, sid: str) -> bool:
        return sid in self.outbound

    def session_ended(self, exc: BaseException) -> None:
        for sid in list(self.outbound):
            self.fail_outbound(sid, exc)

    async def send(self, peer: str, sid: str, chunks: Iterator[bytes], offset: int,
                        progress: Callable[..., None] | None, tls: ssl.SSLContext | None, pin: str | None,
                        moved: list[int], phases: Phases | None = None) -> int:
        phases = phases or Phases()
        block = self.client.settings.ibb_block_bytes
        iq = self.client.make_iq_set(ito=peer)
        ET.SubElement(iq.xml, q(NS_IBB, "open"), {"sid": sid, "block-size": str(block), "stanza": "iq"})
        await self.client.send_iq(iq)
        phases.mark("open", 1)
        window = asyncio.Semaphore(self.client.settings.ibb_window)
        pending: set[asyncio.Future[object]] = set()
        failure: list[BaseException] = []
        to_attr = quoteattr(peer)
        seq = 0
        buffer = bytearray()

        def acked(fut: asyncio.Future[object]) -> None:
            pending.discard(fut)
            window.release()
            if not fut.cancelled() and fut.exception() is not None:  # the connection dropped (StreamLost)
                failure.append(TransferCut(describe(fut.exception())))  # type: ignore[arg-type]
                return
            stanza = None if fut.cancelled() else fut.result()
            if stanza is None or stanza["type"] != "result":  # type: ignore[index]
                failure.append(TransferCut(f"IBB block refused: {_refusal(stanza)}"))

        async def send_block(data: bytes) -> None:
            nonlocal seq
            await window.acquire()
            if failure:
                raise failure[0]
            iq_id = self.client.new_id()
            fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            self.client.register_handler(Callback(f"ibb-ack-{iq_id}", MatcherId(iq_id), fut.set_result, once=True))
            fut.add_done_callback(acked)
            self.client.track(fut, None)
            pending.add(fut)
            self.client.send_stanza_text(_ibb_data(to_attr, iq_id, seq, sid, data))
            seq = (seq + 1) % 65536

        async def flush(final: bool) -> None:
            while len(buffer) >= block or (final and buffer):
                piece = bytes(buffer[:block])
                del buffer[:block]
                await send_block(piece)

        channel: OutboundStream | None = None
        try:
            if tls is not None:
                channel = OutboundStream(peer, TlsPipe(tls, server_side=False), asyncio.get_running_loop().create_future())
                self.outbound[sid] = channel
                buffer += channel.pipe.start()
                await flush(True)
                await asyncio.wait_for(asyncio.shield(channel.handshake), self.client.settings.iq_timeout_s)
                check_pin(channel.pipe.ssl, pin or "", peer)
                phases.mark("tls", 1)
                buffer += channel.pipe.outgoing()  # our Certificate and Finished
            for chunk in chunks:
                buffer += channel.pipe.encrypt(chunk) if channel is not None else chunk
                await flush(False)
                moved[0] += len(chunk)
                if progress is not None:
                    progress(offset + moved[0], "ibb")
            await flush(True)
            if progress is not None:  # all handed on: the queue says so while the acknowledgements come
                progress(offset + moved[0], "ibb", True)
            deadline = time.monotonic() + self.client.settings.iq_timeout_s
            while pending and time.monotonic() < deadline and not failure:
                await asyncio.wait(set(pending), timeout=max(0.0, deadline - time.monotonic()))
            if failure or pending:
                raise failure[0] if failure else TransferCut("IBB acknowledgements timed out")
        except ssl.SSLError as exc:
            if isinstance(exc, PinMismatch):
                raise
            raise TransferCut(f"end-to-end TLS over IBB failed: {describe(exc)}") from exc
        except StreamSuspended:  # the receiver keeps what came (its offset for the resume)
            close = self.client.make_iq_set(ito=peer)
            ET.SubElement(close.xml, q(NS_IBB, "close"), {"sid": sid})
            with contextlib.suppress(IqError, IqTimeout):  # StreamLost is an IqTimeout
                await self.client.send_iq(close)
            raise
        finally:
            self.outbound.pop(sid, None)
        close = self.client.make_iq_set(ito=peer)
        ET.SubElement(close.xml, q(NS_IBB, "close"), {"sid": sid})
        await self.client.send_iq(close)
        phases.mark("stream")
        return moved[0]

    def fail_outbound(self, sid: str, exc: BaseException) -> None:
        channel = self.outbound.get(sid)
        if channel is not None and not channel.handshake.done():
            channel.handshake.set_exception(exc)

    def _stream(self, iq: slixmpp.Iq, tag: str) -> tuple[ET.Element, str, InboundStream]:
        """The IBB element, its sid, and the accepted offer it belongs to (from the same full JID)."""
        el = iq.xml.find(q(NS_IBB, tag))
        sid = el.get("sid", "") if el is not None else ""
        entry = self.ends.sinks.get(sid)
        if el is None or entry is None or entry.peer != iq["from"].full:
            raise XMPPError("item-not-found", "no accepted offer with this stream id")
        return el, sid, entry

    def on_open(self, iq: slixmpp.Iq) -> None:
        el, sid, entry = self._stream(iq, "open")
        block = el.get("block-size", "")
        if not block.isdigit() or not 0 < int(block) <= 65535 or el.get("stanza", "iq") != "iq":
            raise XMPPError("resource-constraint", "block-size 1..65535 with stanza='iq' only", etype="modify")
        if entry.started:
            raise XMPPError("not-acceptable", "this stream is already open")
        entry.started = True
        entry.accepted = entry.sink.offset
        if entry.tls is not None:
            entry.pipe = TlsPipe(entry.tls, server_side=True)
        entry.last_block_at = time.monotonic()
        entry.floor = RateFloor()
        self._watch_idle(sid, entry, self.client.settings.ibb_idle_timeout_s)
        iq.reply().send()

    def _watch_idle(self, sid: str, entry: InboundStream, after_s: float) -> None:
        """End an open inbound stream that brought no block for ``ibb_idle_timeout_s`` as cut (what came is
        kept; the verdict tells the sender, whose next offer resumes from it), as a silent S5B stream ends:
        a sender that went quiet without a close would otherwise hold its inbound slot until it offers the
        bundle again. One timer per stream, set again for the rest of the limit while blocks come."""
        def check() -> None:
            if self.ends.sinks.get(sid) is not entry:
                return  # ended meanwhile
            limit = self.client.settings.ibb_idle_timeout_s
            quiet = time.monotonic() - entry.last_block_at
            if quiet < limit:
                self._watch_idle(sid, entry, limit - quiet)
                return
            log.warning("IBB stream %s from %s: no block for %.0f s; cut (kept for a resume)", sid, entry.peer, quiet)
            self.client.spawn(self.ends.complete(sid))

        asyncio.get_running_loop().call_later(after_s, check)

    def on_data(self, iq: slixmpp.Iq) -> None:
        el = iq.xml.find(q(NS_IBB, "data"))
        if el is not None and el.get("sid", "") in self.outbound:
            self._on_reply_data(iq, el)
            return
        el, sid, entry = self._stream(iq, "data")
        seq = el.get("seq", "")
        if not entry.started or not seq.isdigit() or int(seq) != entry.next_seq:  # XEP-0047 2.2: gap or replay
            self.ends.drop(sid, f"IBB block out of order: seq {seq[:8]!r}, expected {entry.next_seq}")
            self.client.spawn(self.ends.send_verdict(entry.peer, sid, "incomplete", "IBB stream closed: block out of order", entry.ours))
            raise XMPPError("unexpected-request", f"expected seq {entry.next_seq}; the stream is closed", etype="cancel")
        entry.next_seq = (entry.next_seq + 1) % 65536
        entry.last_block_at = time.monotonic()
        try:
            data = base64.b64decode(el.text or "", validate=True)
            if entry.floor is not None:
                entry.floor.add(len(data))
            if entry.pipe is not None:
                plain = entry.pipe.feed(data)
                entry.secured = entry.pipe.handshaken
                back = entry.pipe.outgoing()
                if back:  # handshake records for the sender, on the same IBB session
                    self.client.send_stanza_text(_ibb_data(quoteattr(entry.peer), self.client.new_id(), entry.out_seq, sid, back))
                    entry.out_seq = (entry.out_seq + 1) % 65536
                data = plain
            if not hasattr(entry.sink, "wanted") and entry.accepted + len(data) > entry.sink.size:  # framed: checks itself
                raise OverflowError(f"data past the announced size of {entry.sink.size} bytes")
            if entry.queued >= MAX_QUEUED_BLOCKS:  # ahead of the disk by more than any window of ours
                raise TimeoutError(f"{entry.queued} blocks still waiting for the disk")
        except ssl.SSLError as exc:
            self.client.inbound.security_event(iq["from"].bare, f"end-to-end channel from {entry.peer} failed: {describe(exc)}")
            self.ends.drop(sid, f"end-to-end TLS failed: {describe(exc)}")
            self.client.spawn(self.ends.send_verdict(entry.peer, sid, "refused", "end-to-end TLS failed", entry.ours))
            raise XMPPError("not-acceptable", "end-to-end TLS failed", etype="cancel") from exc
        except TimeoutError as exc:  # too slow (RateFloor) or too far ahead: cut, what came kept for a resume
            log.warning("IBB stream %s from %s: %s; cut (kept for a resume)", sid, entry.peer, exc)
            self.client.spawn(self.ends.complete(sid))
            raise XMPPError("not-acceptable", f"{exc}; the stream is closed", etype="cancel") from exc
        except (ValueError, OverflowError) as exc:
            self._write_failed(sid, entry, exc)
            raise _block_error(exc) from exc
        if not data:  # handshake records only
            iq.reply().send()
            return
        entry.accepted += len(data)
        entry.writing = self._write(sid, entry, data)
        self.client.spawn(self._answer(iq, entry.writing))

    def _write(self, sid: str, entry: InboundStream, data: bytes) -> asyncio.Future[None]:
        """Write one block to the sink on a worker thread once the block before it is written: the file
        writes, the unit's row when the manifest arrives and the progress rows cost the loop nothing. A write
        that fails ends the stream as the block's own error would; the blocks behind it are not written."""
        before = entry.writing
        entry.queued += 1

        async def write() -> None:
            try:
                if before is not None:
                    await asyncio.wait([before])
                if entry.write_failed:
                    raise _NotWritten("an earlier block of this stream was not written; the stream is closed")
                await asyncio.to_thread(entry.sink.write, data)
            except (asyncio.CancelledError, _NotWritten):
                raise
            except BaseException as exc:
                entry.write_failed = True
                self._write_failed(sid, entry, exc)
                raise
            finally:
                entry.queued -= 1

        return asyncio.ensure_future(write())

    def _write_failed(self, sid: str, entry: InboundStream, exc: BaseException) -> None:
        """The stream's end for a block that is bad data or that the sink refused (the disk, our database)."""
        if self.ends.sinks.get(sid) is not entry:
            return  # already ended (the sender's close waits for the writes, then finds the stream gone)
        full = spool_full(exc)
        if isinstance(exc, (ValueError, OverflowError)):
            self.ends.drop(sid, f"bad IBB data: {exc}")
            self.client.spawn(self.ends.send_verdict(entry.peer, sid, "rejected", f"bad IBB data: {exc}", entry.ours))
        elif full:  # a full spool is said as such, what came kept for a resume
            entry.ended_for = full  # also when the sender's close, waiting for the same writes, ends it first
            log.warning("IBB stream %s from %s: %s; cut (kept for a resume)", sid, entry.peer, full)
            self.client.spawn(self.ends.complete(sid))
        else:  # ours (the disk, the sink's database): logged, the stream closed, the sender told
            self.client.spawn(self.ends.fail_stream(sid, exc))

    async def _answer(self, iq: slixmpp.Iq, writing: asyncio.Future[None]) -> None:
        """A block is answered once it is written (the sender's window is the bound on blocks in flight)."""
        try:
            await writing
        except Exception as exc:
            iq.exception(_block_error(exc))
        else:
            iq.reply().send()

    def _on_reply_data(self, iq: slixmpp.Iq, el: ET.Element) -> None:
        """A TLS record from the receiver on an IBB stream we send (its handshake flight)."""
        sid = el.get("sid", "")
        channel = self.outbound[sid]
        seq = el.get("seq", "")
        if channel.peer != iq["from"].full or not seq.isdigit() or int(seq) != channel.next_seq:
            self.fail_outbound(sid, TransferCut("IBB block from the receiver out of order"))
            raise XMPPError("unexpected-request", "unexpected block", etype="cancel")
        channel.next_seq = (channel.next_seq + 1) % 65536
        try:
            channel.pipe.feed(base64.b64decode(el.text or "", validate=True))
        except (ssl.SSLError, ValueError) as exc:
            self.fail_outbound(sid, exc if isinstance(exc, ssl.SSLError) else TransferCut(str(exc)))
            raise XMPPError("not-acceptable", "end-to-end TLS failed", etype="cancel") from exc
        if channel.pipe.handshaken and not channel.handshake.done():
            channel.handshake.set_result(None)
        iq.reply().send()

    def on_close(self, iq: slixmpp.Iq) -> None:
        _el, sid, _entry = self._stream(iq, "close")
        iq.reply().send()
        self.client.spawn(self.ends.complete(sid))


def _ibb_data(to_attr: str, iq_id: str, seq: int, sid: str, data: bytes) -> str:
    """One XEP-0047 data stanza, written directly (slixmpp's per-character escaping costs 3.7 ms per block)."""
    payload = base64.b64encode(data).decode("ascii")
    return f"<iq type='set' to={to_attr} id='{iq_id}'><data xmlns='{NS_IBB}' seq='{seq}' sid='{sid}'>{payload}</data></iq>"


def _block_error(exc: BaseException) -> XMPPError:
    """The answer to a data block that was not taken (``_write_failed`` has ended its stream)."""
    if isinstance(exc, _NotWritten):
        return XMPPError("not-acceptable", str(exc), etype="cancel")
    if isinstance(exc, (ValueError, OverflowError)):
        return XMPPError("bad-request", str(exc))
    full = spool_full(exc)
    if full:
        return XMPPError("resource-constraint", f"{full}; offer it again later", etype="wait")
    return XMPPError("internal-server-error", "the receiver failed; offer it again", etype="wait")


def _refusal(stanza: Any) -> str:
    """The receiver's error on a block: its condition and, when it gave one, its text (bounded: a hostile
    receiver's text is not ours to relay whole)."""
    if stanza is None:
        return "cancelled"
    condition, text = stanza["error"]["condition"], statement_text(str(stanza["error"]["text"] or ""))[:200]
    return f"{condition}: {text}" if text else condition
