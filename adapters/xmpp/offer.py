"""XEP-0095/0096 stream initiation (the study offer), our verdict and the delivery receipt.

Sender (``send_bundle``): one offer per attempt, with an opaque name, the size, the manifest's SHA-256 and
(end to end) our certificate; the receiver answers with the method and the offset to resume from; the
stream goes over S5B and falls back to IBB (resuming) when the proxy path fails; the receiver's verdict
ends the attempt. A pin mismatch ends it at once (no fallback).
Receiver (``on_offer``): a malformed offer is ``bad-request`` before any admission; the core admits or
refuses (``forbidden``, ``not-authorized``, ``not-acceptable``, ``resource-constraint``, ``conflict``); an
admitted offer holds its admission until its sink ends, on every path, also when the stream never starts
(``stream_start_timeout_s``). Verdicts and receipts refer to the bundle, never to a study, and are signed
with the gateway's identity key (``adapters.xmpp.attest``): the sender takes a verdict only from the full
JID its offer was agreed with and a receipt only from the peer's bare JID, each signed by the pinned key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout, XMPPError

from adapters.xmpp import attest, socks5
from adapters.xmpp.common import (
    AwaitedVerdict,
    FramedSink,
    InboundStream,
    Phases,
    Sink,
    TransferCut,
    XmppClient,
    describe,
    log_task_failure,
    progress_in_thread,
    short_method,
    spool_full_said,
)
from adapters.xmpp.e2e import (
    Identity,
    PinMismatch,
    client_context,
    fingerprint,
    server_context,
)
from adapters.xmpp.ibb import InBandBytestreams
from adapters.xmpp.s5b import Socks5Bytestreams, discard_early
from adapters.xmpp.stanzas import (
    NS_IBB,
    NS_RESULT,
    NS_S5B,
    NS_SI,
    Offer,
    Receipt,
    Signature,
    build_accept,
    build_offer,
    build_receipt,
    build_result,
    identity_used,
    offers_frames,
    parse_accept,
    parse_offer,
    parse_receipt,
    parse_result,
    q,
    receipt_signature,
    statement_text,
)
from gateway.logs import set_fields
from gateway.outage import said, unreachable
from gateway.pins import pin_set, pinned_cert
from gateway.transfer import SendOutcome, StreamSuspended
from gateway.wire import Tally

log = logging.getLogger(__name__)
VERDICT_AFTER_CUT_S = 2.0  # a stream the receiver closed: its verdict (why) is awaited this long before giving up on it
SUPERSEDE_GRACE_S = 5.0  # an old stream of a re-offered bundle may drain its socket this long


class StudyOffers:
    """XEP-0095/0096 offers, verdicts and receipts for the agent. Its own state: the inbound offers it accepted
    (``sinks``: where each stream's bytes go), the verdicts the streams we sent wait for, and per peer which of
    our identities it pins (``signing``). It streams through the two transports it is given (S5B first, IBB as
    the fallback) and is their ``StreamEnds``: an inbound stream's end, failure or drop comes back here. It
    uses of the agent only what ``XmppClient`` declares."""

    def __init__(self, client: XmppClient, s5b: Socks5Bytestreams, ibb: InBandBytestreams) -> None:
        self.client = client
        self.s5b, self.ibb = s5b, ibb
        self.sinks: dict[str, InboundStream] = {}  # sid -> accepted inbound offer
        self.verdicts: dict[str, AwaitedVerdict] = {}  # sid -> the verdict a stream we sent waits for
        self.deciding: dict[str, tuple[str, asyncio.Future[None]]] = {}  # sid -> (sender, decided) while we decide
        # bundle -> the closes of its streams running on worker threads (fsyncs, the unit's and the transfer's
        # rows): off the loop, and a new offer of the same bundle opens it only after they have ended.
        self.closing: dict[str, set[asyncio.Future[None]]] = {}

    def session_ended(self) -> None:
        """No verdict comes on a dead stream: the attempts waiting for one fail now."""
        for awaited in list(self.verdicts.values()):
            if not awaited.future.done():
                awaited.future.set_exception(TransferCut("XMPP connection lost before the receiver's verdict"))

    async def writes_ended(self, timeout_s: float = 10.0) -> None:
        """Until the IBB blocks taken are written (their worker threads), at most ``timeout_s``: a stop closes
        the sinks after them."""
        writing = {entry.writing for entry in self.sinks.values() if entry.writing is not None}
        if writing:
            await asyncio.wait(writing, timeout=timeout_s)

    def stop(self) -> None:
        self.s5b.stop()
        for entry in self.sinks.values():
            discard_early(entry.early)
            entry.sink.close("gateway stopping")
        self.sinks.clear()

    async def send_bundle(self, *args: Any, **kwargs: Any) -> SendOutcome:
        """See :meth:`_send_bundle`; runs as a task of its own so that the log fields it sets (the attempt's
        stream id, ``gateway.logs``) stay within it."""
        return await asyncio.create_task(self._send_bundle(*args, **kwargs))

    async def _send_bundle(
        self,
        peer_full_jid: str,
        size: int,
        manifest_sha256: str,
        stream_from: Callable[[int, bool], Iterator[bytes]],
        progress: Callable[[int, str], None] | None = None,
        priority: str = "routine",
    ) -> SendOutcome:
        """Offer and stream one bundle; falls back from S5B to IBB (resuming) when the S5B path fails.
        With a pin for the peer the bundle goes end-to-end encrypted; without one, only if ``require_e2e``
        is off."""
        result = SendOutcome(ok=False)
        peer_bare = peer_full_jid.split("/", 1)[0]
        pin = self.client.inbound.pin_for(peer_bare)
        identities = self.client.identities
        identity = identities.current if identities is not None else None
        if pin is None and self.client.settings.require_e2e:
            result.detail = (f"no pinned certificate for {peer_bare}: nothing is sent unencrypted "
                             f"(dicomgw peers add {peer_bare} --fingerprint SHA256)")
            return result
        encrypted = pin is not None and identity is not None
        methods = tuple(self.client.settings.methods)
        while methods:
            sid = uuid.uuid4().hex
            set_fields(transfer_id=sid)  # every log line of this attempt names it
            previous = identities.previous if encrypted and identities is not None else None
            offer = Offer(sid, f"{sid}.dgwb", size, manifest_sha256, methods,
                          identity.cert_der if encrypted and identity else b"", self.client.settings.compress, priority,
                          previous.cert_der if previous is not None else b"", ",".join(pin_set(pin)) if encrypted else "",
                          self.s5b.proxy if NS_S5B in methods else None,  # known after the first S5B attempt
                          self.s5b.links_early)
            started = time.time()
            attempt: dict[str, object] = {"sid": sid, "methods": list(methods), "started": started}
            result.attempts.append(attempt)
            phases = Phases()  # where the attempt's time goes, and its round trips before the first byte
            # The proxy leg is opened while the offer is answered (S5B is the first choice whenever offered):
            # the SOCKS5 greeting and request cost two round trips to the proxy that then overlap the offer's.
            # On a proxy that links the legs as soon as both are up, the TLS handshake starts on our leg at once
            # (with our current certificate: not while we rotate, when the receiver may pin the previous one).
            early_tls = (client_context(identity) if encrypted and identity and previous is None and self.s5b.links_early
                         else None)
            early = self.s5b.connect_early(peer_full_jid, sid, early_tls, pin or "") if NS_S5B in methods else None
            offering = asyncio.ensure_future(self._offer(peer_full_jid, offer))
            asked = self.s5b.ask_streamhost(peer_full_jid, sid) if NS_S5B in methods else None  # behind the offer
            try:
                method, offset, framed, used = await offering
                phases.mark("offer", 1)
            except XMPPError as exc:
                discard_early(early)
                attempt.update(outcome="held" if exc.condition == "conflict" else "refused", error=f"{exc.condition}: {exc.text}")
                result.detail = f"peer refused the offer: {exc.condition} ({exc.text})"
                return result
            except (IqTimeout, ValueError) as exc:
                discard_early(early)
                attempt.update(outcome="cut", error=describe(exc))
                result.detail = f"offer not answered: {describe(exc)}"
                return result
            if method != NS_S5B:
                discard_early(early)
                early = None
            attempt.update(method=method, offset=offset, compressed=framed)
            result.method, result.offset = method, offset
            verdict = asyncio.get_running_loop().create_future()
            self.verdicts[sid] = AwaitedVerdict(verdict, peer_full_jid, pin)
            # The receiver pins our old certificate while we rotate: present that one (it said which).
            presented = (identities.by_fingerprint(used) if used and identities is not None else None) or identity
            tls = client_context(presented) if encrypted and presented else None
            if early is not None and early.handshakes and presented is not identity:
                # Its early handshake presents a certificate the receiver does not pin (cannot happen while we do not
                # rotate: the early handshake is only started then); the leg goes, and with it the receiver's.
                discard_early(early)
                early = None
            moved = [0]  # stream bytes; study bytes (the bundle's own) are ``chunks.plain_at(moved[0])``
            chunks = Tally(stream_from(offset, framed), framed)
            try:
                stream_started = time.perf_counter()
                report = progress_in_thread(progress, sid, offset, chunks.plain_at)
                if method == NS_S5B:
                    handed, early = early, None  # the S5B half owns it from here (and closes it on every path)
                    sending = self.s5b.send(peer_full_jid, sid, chunks, offset, report, tls, pin, moved, handed, phases, asked)
                else:
                    sending = self.ibb.send(peer_full_jid, sid, chunks, offset, report, tls, pin, moved, phases)
                sent = await _unless_ended_by(verdict, sending)
                attempt["stream_s"] = time.perf_counter() - stream_started
                attempt.update(bytes=chunks.plain_at(sent), wire_bytes=sent)
                result.bytes_sent += chunks.plain_at(sent)
                outcome, detail = await asyncio.wait_for(verdict, self.client.settings.verdict_timeout_s)
                phases.mark("verdict", 0.5)
                if outcome == "incomplete":
                    raise TransferCut(f"receiver got {detail}")
                if tls is not None and presented is not None and outcome == "received":
                    # The receiver took our handshake with ``presented`` (its verdict is signed with its pinned
                    # key): that is what it pins of ours (the accept's ``used`` alone could be forged on the way).
                    self.client.inbound.note_signing(peer_bare, presented.fingerprint)
            except StreamSuspended as exc:
                attempt.update(outcome="suspended", error=str(exc), bytes=chunks.plain_at(moved[0]), wire_bytes=moved[0],
                               stream_s=time.perf_counter() - stream_started)
                log.info("%s stream to %s suspended for a STAT transfer after %d bytes from offset %d",
                         short_method(method), peer_full_jid, moved[0], offset)
                result.suspended, result.bytes_sent = True, result.bytes_sent + chunks.plain_at(moved[0])
                result.detail = f"suspended for a STAT transfer: {exc}"
                return result
            except PinMismatch as exc:
                attempt.update(outcome="refused", error=str(exc), bytes=chunks.plain_at(moved[0]), wire_bytes=moved[0])
                self.client.inbound.security_event(peer_bare, f"end-to-end channel to {peer_full_jid} refused: {exc}")
                result.detail = f"end-to-end channel refused: {exc}"
                return result
            except (TransferCut, socks5.Socks5Error, IqError, IqTimeout, OSError, TimeoutError) as exc:
                if isinstance(exc, (socks5.Socks5Error, OSError)) and not verdict.done():
                    # The receiver closed the stream (its verdict, with why, is on its way through the server).
                    await asyncio.wait({verdict}, timeout=VERDICT_AFTER_CUT_S)
                said = verdict.result()[1] if verdict.done() and not verdict.cancelled() and verdict.exception() is None else ""
                attempt.update(outcome="cut", error=f"receiver: {said}" if said else describe(exc),
                               bytes=chunks.plain_at(moved[0]), wire_bytes=moved[0])
                log.warning("%s transfer %s to %s failed: %s", short_method(method), sid, peer_full_jid,
                            f"receiver: {said}" if said else describe(exc))
                if method == NS_S5B and NS_IBB in methods and not spool_full_said(said):
                    methods = (NS_IBB,)
                    continue
                result.detail = f"{short_method(method)} failed: " + (f"receiver: {said}" if said else describe(exc))
                return result
            finally:
                self.verdicts.pop(sid, None)
                discard_early(early)
                attempt["phases_ms"] = phases.table()
                log.info("%s attempt %s to %s: %s", short_method(method), sid, peer_full_jid, phases.describe())
            attempt.update(outcome=outcome, error=detail)
            log.info("%s stream to %s: %s, %d bytes from offset %d", short_method(method), peer_full_jid, outcome,
                     int(attempt.get("bytes", 0) or 0), offset)
            result.ok = outcome == "received"
            result.detail = detail
            return result
        result.detail = "no stream method left"
        return result

    async def _offer(self, peer: str, offer: Offer) -> tuple[str, int, bool, str]:
        iq = self.client.make_iq_set(ito=peer)
        iq.xml.append(build_offer(offer))
        try:
            response = await self.client.send_iq(iq)
        except IqError as exc:
            error = exc.iq["error"]
            raise XMPPError(error["condition"] or "undefined-condition", error["text"] or "") from exc
        accept = response.xml.find(q(NS_SI, "si"))
        method, offset = parse_accept(accept)
        if method not in offer.methods or offset < 0 or offset > offer.size:
            raise XMPPError("bad-request", f"peer chose {method!r} at offset {offset}")
        return method, offset, offer.compress and offers_frames(accept), identity_used(accept)

    async def on_offer(self, iq: slixmpp.Iq) -> None:
        if iq["type"] != "set":
            return
        peer = iq["from"]
        arrived = time.perf_counter()
        try:  # a malformed offer is refused before anything is admitted
            offer = parse_offer(iq.xml.find(q(NS_SI, "si")))
        except ValueError as exc:
            raise XMPPError("bad-request", str(exc)) from exc
        if offer.sid in self.sinks or offer.sid in self.ibb.outbound or offer.sid in self.deciding:
            raise XMPPError("conflict", "this stream id is in use")
        set_fields(peer=peer.bare, transfer_id=offer.sid)  # every log line of this offer names them
        decided = asyncio.get_running_loop().create_future()
        self.deciding[offer.sid] = (peer.full, decided)  # its streamhost query may come before we decide
        try:
            await self._decide(iq, peer, offer, arrived)
        finally:
            del self.deciding[offer.sid]
            decided.set_result(None)

    async def offer_decided(self, sid: str, peer: str) -> None:
        """A streamhost query sent right behind its offer waits until we have decided that offer (the same
        sender only, at most ``iq_timeout_s``); any other finds the offer as it is."""
        pending = self.deciding.get(sid)
        if pending is not None and pending[0] == peer:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pending[1]), self.client.settings.iq_timeout_s)

    async def _decide(self, iq: slixmpp.Iq, peer: slixmpp.JID, offer: Offer, arrived: float) -> None:
        refusal = self.client.inbound.screen(peer.bare, offer)  # from memory: a flood from a stranger costs no I/O here
        early = None
        if refusal is None and NS_S5B in offer.methods and offer.streamhost is not None:
            # An allowed peer with its pin: our leg to the proxy its offer names opens while we decide (its two
            # SOCKS5 exchanges are the longest step before the stream); closed again if we refuse.
            early = self.s5b.connect_streamhost_early(offer.sid, peer.full, offer.streamhost, offer.pipelined)
        try:
            await self._admit(iq, peer, offer, arrived, refusal, early)
        except BaseException:
            discard_early(early)
            raise

    async def _admit(self, iq: slixmpp.Iq, peer: slixmpp.JID, offer: Offer, arrived: float,
                     refusal: tuple[str, str] | None, early: asyncio.Future[Any] | None) -> None:
        if refusal is None:
            try:
                refusal = await asyncio.to_thread(self.client.inbound.authorize, peer.bare, offer)
            except Exception as exc:
                if not unreachable(exc):
                    raise
                refusal = _database_busy(peer.bare, offer, exc)
            if refusal is None and (offer.sid in self.sinks or offer.sid in self.ibb.outbound):
                self.client.inbound.release(offer)  # the same stream id was taken while we looked
                refusal = ("conflict", "this stream id is in use")
        if refusal is not None:
            condition, text = refusal
            raise XMPPError(condition, text, etype="wait" if condition == "resource-constraint" else "cancel")
        method = next(m for m in (NS_S5B, NS_IBB) if m in offer.methods)  # parse_offer made sure there is one
        await self._supersede(peer.bare, offer.manifest_sha256)
        await self.closed(offer.manifest_sha256)  # a cut stream's close first: the resume starts where it ended
        try:  # from here on the admission is the sink's: every path below ends it
            tls, used, ours_fp = None, "", ""
            if offer.cert_der and self.client.identities is not None:
                # The sender's certificate we pin (its current or, while it rotates, its previous one), and ours
                # that it pins (our previous one while we rotate and it has not pinned the new one yet).
                sender_cert = pinned_cert(offer, self.client.inbound.pin_for(peer.bare))
                ours = self.client.identities.choose(offer.expect)
                tls = server_context(ours, sender_cert)
                used = fingerprint(sender_cert) if sender_cert != offer.cert_der else ""
                ours_fp = ours.fingerprint
            sink = await self._open_sink(peer.bare, offer, method)
        except Exception as exc:
            if unreachable(exc):
                raise XMPPError(*_database_busy(peer.bare, offer, exc), etype="wait") from exc
            log.exception("could not open a sink for an offer from %s", peer)
            raise XMPPError("internal-server-error", f"receiver could not take the offer: {type(exc).__name__}") from exc
        framed = offer.compress and self.client.settings.compress
        if offer.priority == "stat":
            self._reset_routine_streams(peer.bare)
        self.sinks[offer.sid] = InboundStream(peer.full, FramedSink(sink) if framed else sink, method, tls,
                                               priority=offer.priority, start_offset=sink.offset, ours=ours_fp)
        if method == NS_S5B and early is not None:
            self.sinks[offer.sid].early, self.sinks[offer.sid].early_for = early, offer.streamhost
        reply = iq.reply()
        reply.xml.append(build_accept(method, sink.offset, framed, used))
        reply.send()
        log.info("offer %s from %s accepted (%s from offset %d) in %.0f ms", offer.sid, peer.full, short_method(method),
                 sink.offset, (time.perf_counter() - arrived) * 1000)
        loop = asyncio.get_running_loop()
        loop.call_later(self.client.settings.stream_start_timeout_s, self._check_started, offer.sid)
        if tls is not None:
            loop.call_later(self.client.settings.handshake_timeout_s, self._check_secured, offer.sid, self.sinks[offer.sid])

    async def _open_sink(self, peer_bare: str, offer: Offer, method: str) -> Sink:
        """The sink, made on a worker thread: a resume reads and hashes what came before and writes the unit's
        row. Should the offer's task be cancelled meanwhile (the session or the gateway ends), the sink made is closed."""
        opening = asyncio.ensure_future(asyncio.to_thread(self.client.inbound.open_sink, peer_bare, offer, method))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(lambda done: done.cancelled() or done.exception() is not None
                                      or done.result().close("the offer was cancelled"))  # here: the loop may be ending
            raise

    async def _supersede(self, peer_bare: str, bundle_sha256: str) -> None:
        """One writer per bundle: a new offer of it (from any of the sender's processes) ends the old stream.
        An S5B reader still draining what reached our socket before the sender saw its stream cut gets
        ``SUPERSEDE_GRACE_S`` to finish on its own, so the new offer resumes after those bytes, not before."""
        old = [sid for sid, entry in self.sinks.items()
               if entry.peer.split("/", 1)[0] == peer_bare and getattr(entry.sink, "bundle_key", None) == bundle_sha256]
        readers = [self.s5b.readers[sid] for sid in old if sid in self.s5b.readers]
        if readers:
            await asyncio.wait(readers, timeout=SUPERSEDE_GRACE_S)
        for sid in old:
            if sid in self.sinks:
                self.drop(sid, "superseded by a new offer of the same bundle")

    def _check_started(self, sid: str) -> None:
        entry = self.sinks.get(sid)
        if entry is not None and not entry.started:
            log.warning("offer %s from %s: no stream within %.0f s; released", sid, entry.peer, self.client.settings.stream_start_timeout_s)
            self.drop(sid, f"the stream did not start within {self.client.settings.stream_start_timeout_s:g} s")

    def _check_secured(self, sid: str, entry: InboundStream) -> None:
        """An end-to-end offer must finish its TLS handshake within ``handshake_timeout_s`` of its acceptance:
        whoever offers a peer's (public) certificate without its key holds the admission only that long."""
        if self.sinks.get(sid) is entry and not entry.secured:
            reason = f"no end-to-end TLS handshake within {self.client.settings.handshake_timeout_s:g} s"
            log.warning("offer %s from %s: %s; released", sid, entry.peer, reason)
            self.client.inbound.security_event(entry.peer.split("/", 1)[0], f"end-to-end channel from {entry.peer} refused: {reason}")
            self.drop(sid, reason)

    async def complete(self, sid: str, reason: str = "") -> None:
        """The stream ended: the verdict goes to the sender on every path, also when we fail ourselves.
        ``reason``: why it ended early, when we know (the spool full), for the verdict and the unit."""
        entry = self.sinks.get(sid)
        if entry is None:
            return
        while entry.writing is not None and not entry.writing.done():  # IBB: the blocks taken are written first
            await asyncio.wait([entry.writing])
        if self.sinks.get(sid) is not entry:
            return  # ended meanwhile (a block's write failed, or another end came first)
        del self.sinks[sid]
        discard_early(entry.early)
        reason = reason or entry.ended_for
        sink = entry.sink
        if (entry.tls is not None or entry.pipe is not None) and entry.secured and sink.offset == entry.start_offset:
            # The sender ended the channel right after the handshake, before a byte: it refused our certificate
            # (its pin for us is not our certificate: after `dicomgw keys rotate`, or a wrong pin).
            signing = self._identity_for(entry.peer, entry.ours)
            ours = signing.fingerprint if signing is not None else "?"
            self.client.inbound.security_event(entry.peer.split("/", 1)[0], (
                f"end-to-end channel from {entry.peer} closed by the sender after the handshake, before any byte: "
                f"it does not accept this gateway's certificate SHA-256 {ours} (its pin for us differs?)"))
        ended = time.perf_counter()
        try:
            if sink.offset < sink.size:
                detail = f"{sink.offset} of {sink.size} bytes before the stream ended" + (f" ({reason})" if reason else "")
                await self.close_sink(sink, detail)  # kept: the sender re-offers and resumes at our offset
                outcome = "incomplete"
            else:
                ok, detail = await asyncio.to_thread(sink.finish)
                outcome = "received" if ok else "rejected"
                if ok and entry.ours:  # the bundle came whole under the handshake with the sender's pinned key:
                    self.client.inbound.note_signing(entry.peer.split("/", 1)[0], entry.ours)  # its receipts: that key
                log.info("stream %s from %s: verified and stored %.0f ms after its last byte", sid, entry.peer,
                         (time.perf_counter() - ended) * 1000)
        except Exception as exc:  # our failure (the database, the disk): logged, and the sender resumes later
            outcome, detail = "incomplete", _our_failure(exc, f"stream {sid} from {entry.peer}: the receiver failed to end it")
            with contextlib.suppress(Exception):
                await self.close_sink(sink, detail)
        await self.send_verdict(entry.peer, sid, outcome, detail, entry.ours)
        log.info("stream %s from %s: verdict %s answered %.0f ms after its last byte", sid, entry.peer, outcome,
                 (time.perf_counter() - ended) * 1000)

    async def fail_stream(self, sid: str, exc: BaseException) -> None:
        """A stream task met an error of ours: logged with its traceback, the stream closed, the sender told."""
        entry = self.sinks.get(sid)
        detail = _our_failure(exc, f"stream {sid} from {entry.peer if entry else '?'} failed in the receiver")
        if entry is not None:
            self.s5b.readers.pop(sid, None)  # called from the reader task itself: drop must not cancel it (nor the verdict)
            verdict = asyncio.ensure_future(self.send_verdict(entry.peer, sid, "incomplete", detail, entry.ours))  # on the wire first
            self.drop(sid, detail)
            await verdict

    async def send_verdict(self, peer: str, sid: str, outcome: str, detail: str, ours: str = "") -> None:
        """Signed with ``ours`` (the identity the stream's handshake presented) when given."""
        iq = self.client.make_iq_set(ito=peer)
        signature = self._sign("verdict", peer, sid, outcome, statement_text(detail), ours=ours)
        iq.xml.append(build_result(sid, outcome, detail, signature))
        with contextlib.suppress(IqError, IqTimeout):
            await self.client.send_iq(iq)

    def _identity_for(self, peer: str, ours: str = "") -> Identity | None:
        """Our identity that ``peer`` pins, as its last completed exchange showed (with this process or another of
        the site, before a restart too: ``note_signing``), looked up in the identities as they are now (a rotation replaced
        the files since); the current one otherwise. ``ours``: the identity a stream's handshake presented
        (its verdict is signed with it)."""
        if self.client.identities is None:
            return None
        remembered = ours or self.client.inbound.signing_for(peer.split("/", 1)[0])
        return (self.client.identities.by_fingerprint(remembered) if remembered else None) or self.client.identities.current

    def _sign(self, kind: str, addressee: str, *fields: str, ours: str = "") -> Signature | None:
        """Our signature of a statement to ``addressee`` (``adapters.xmpp.attest``); None without an identity."""
        identity = self._identity_for(addressee, ours)
        if identity is None:
            return None
        data = attest.canonical(kind, self.client.boundjid.bare, addressee.split("/", 1)[0], *fields)
        return Signature(*attest.sign(identity, data))

    def _check_signed(self, kind: str, sender: slixmpp.JID, signature: Signature, *fields: str) -> None:
        """Raise :class:`attest.Unattested` unless a peer with a pin signed this statement with that key."""
        pin = self.client.inbound.pin_for(sender.bare)
        if pin is None:
            if self.client.settings.require_e2e:
                raise attest.Unattested(f"no certificate pinned for {sender.bare}")
            return  # lab mode: plaintext peers without a pin send unsigned statements
        data = attest.canonical(kind, sender.bare, self.client.boundjid.bare, *fields)
        attest.verify(pin, signature.cert_b64, signature.sig_b64, data, sender.bare)

    def _refuse_statement(self, sender: slixmpp.JID, what: str, reason: str, condition: str) -> XMPPError:
        text = f"{what} from {sender.full} refused: {reason}"
        log.warning("%s", text)
        self.client.inbound.statement_refused(sender.bare, text)
        return XMPPError(condition, reason)

    def _reset_routine_streams(self, peer_bare: str) -> None:
        """A STAT offer from ``peer_bare``: its sender has suspended its routine streams to us; reset ours (a
        TCP RST, so the proxy drops what it still holds of them instead of sending it ahead of the STAT
        study). What arrived is kept; the sender resumes from it later."""
        for sid, entry in list(self.sinks.items()):
            if entry.priority != "stat" and entry.peer.split("/", 1)[0] == peer_bare and self.s5b.reset(sid):
                log.info("S5B stream %s from %s reset: a STAT study from it comes first", sid, entry.peer)

    def drop(self, sid: str, reason: str) -> None:
        self.s5b.release(sid)
        entry = self.sinks.pop(sid, None)
        if entry is not None:
            discard_early(entry.early)
            self.close_sink(entry.sink, reason, after=entry.writing)

    def close_sink(self, sink: Sink, reason: str, after: asyncio.Future[None] | None = None) -> asyncio.Future[None]:
        """Close an inbound stream's sink on a worker thread: a cut or refused stream (hostile input among them)
        costs the loop no fsync and no database write. ``after``: the stream's last IBB block write, which
        ends first. Once handed to the thread it runs to its end, also when the gateway stops meanwhile (the
        loop's executor is waited for)."""
        key = getattr(sink, "bundle_key", None) or f"sink:{id(sink)}"

        async def close() -> None:
            if after is not None:
                await asyncio.wait([after])
            await asyncio.to_thread(sink.close, reason)

        task = asyncio.ensure_future(close())
        pending = self.closing.setdefault(key, set())
        pending.add(task)

        def ended(done: asyncio.Future[None]) -> None:
            pending.discard(done)
            if not pending and self.closing.get(key) is pending:
                del self.closing[key]

        task.add_done_callback(ended)
        task.add_done_callback(log_task_failure)
        return task

    async def closed(self, bundle_key: str) -> None:
        """Until the closes of ``bundle_key``'s streams have ended (its offset and rows are then final)."""
        while pending := self.closing.get(bundle_key):
            await asyncio.wait(set(pending))

    def on_verdict(self, iq: slixmpp.Iq) -> None:
        """The receiver's verdict on a stream we sent: only from the full JID the offer was agreed with, with
        an outcome from the closed set, signed by the key pinned for it; anything else refused and audited."""
        if iq["type"] != "set":
            return
        sender = iq["from"]
        try:
            verdict = parse_result(iq.xml.find(q(NS_RESULT, "result")))
        except ValueError as exc:
            raise self._refuse_statement(sender, "verdict", str(exc), "bad-request") from exc
        awaited = self.verdicts.get(verdict.sid)
        if awaited is None or awaited.future.done():
            raise XMPPError("item-not-found", "no transfer with this stream id")
        if sender.full != awaited.peer:
            raise self._refuse_statement(sender, "verdict", f"the stream was agreed with {awaited.peer}", "not-authorized")
        try:
            self._check_signed("verdict", sender, verdict.signature, verdict.sid, verdict.outcome, verdict.detail)
        except attest.Unattested as exc:
            raise self._refuse_statement(sender, "verdict", str(exc), "not-authorized") from exc
        awaited.future.set_result((verdict.outcome, verdict.detail))
        iq.reply().send()

    async def on_receipt(self, iq: slixmpp.Iq) -> None:
        """A delivery receipt: acted on only when signed by the key pinned for the sender's bare JID (any of
        its resources: a receiver with several processes sends it from whichever finished the import)."""
        if iq["type"] != "set":
            return
        sender = iq["from"]
        el = iq.xml.find(q(NS_RESULT, "receipt"))
        try:
            receipt = parse_receipt(el)
            signature = receipt_signature(el)
        except ValueError as exc:
            raise self._refuse_statement(sender, "receipt", str(exc), "bad-request") from exc
        try:
            self._check_signed("receipt", sender, signature, receipt.bundle_sha256, str(receipt.instances),
                               "delivered" if receipt.delivered else "failed", receipt.detail)
        except attest.Unattested as exc:
            raise self._refuse_statement(sender, "receipt", str(exc), "not-authorized") from exc
        outcome = await asyncio.to_thread(self.client.inbound.receipt, sender.bare, receipt)
        if outcome == "unknown":
            raise XMPPError("item-not-found", f"no bundle {receipt.bundle_sha256[:12]} was sent to you")
        iq.reply().send()

    async def send_receipt(self, peer_full_jid: str, receipt: Receipt) -> tuple[bool, str]:
        """(acknowledged, detail): True when the sender answered (result, or item-not-found: not its study)."""
        iq = self.client.make_iq_set(ito=peer_full_jid)
        signature = self._sign("receipt", peer_full_jid, receipt.bundle_sha256, str(receipt.instances),
                               "delivered" if receipt.delivered else "failed", statement_text(receipt.detail))
        iq.xml.append(build_receipt(receipt, signature))
        try:
            await self.client.send_iq(iq)
        except IqError as exc:
            condition = exc.iq["error"]["condition"]
            return condition == "item-not-found", f"{condition}: {exc.iq['error']['text']}"
        except IqTimeout:
            return False, "no answer (timeout)"
        return True, "acknowledged"


async def _unless_ended_by(verdict: asyncio.Future[tuple[str, str]], sending: Awaitable[int]) -> int:
    """The stream's bytes sent, unless the receiver ended the stream first: an ``incomplete`` verdict (it cut
    the stream before its end: silent, or under its rate floor) or the loss of the connection the verdict
    would come on, while we still send (a relay that takes a byte now and then keeps a write going within
    the idle limit). The send is then stopped (its socket shut) and the attempt is cut with what the
    receiver said. Any other verdict came after every byte: the send ends by itself, as before."""
    task = asyncio.ensure_future(sending)
    try:
        await asyncio.wait({task, verdict}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            if verdict.cancelled():
                raise TransferCut("the wait for the receiver's verdict was cancelled")
            failure = verdict.exception()
            if failure is not None:
                raise failure
            outcome, detail = verdict.result()
            if outcome == "incomplete":
                raise TransferCut(f"receiver cut the stream while we sent: {detail}")
        return await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _database_busy(peer_bare: str, offer: Offer, exc: BaseException) -> tuple[str, str]:
    """An offer this gateway cannot record (its queue database unreachable, read-only or its disk full): busy,
    as a full spool is, so that the sender waits with its backoff and offers again (it used to get slixmpp's
    'undefined-condition: Slixmpp got into trouble' after a traceback). One line each; the outage itself is said
    once by the gateway's own loops (gateway.outage)."""
    log.warning("refused an offer of bundle %s from %s: %s", offer.manifest_sha256[:12] or "?", peer_bare, said(exc))
    return "resource-constraint", "busy: " + said(exc).replace("the queue database", "the receiver's queue database", 1)


def _our_failure(exc: BaseException, what: str) -> str:
    """A stream this gateway could not take or end: logged (one line while the queue database cannot be used,
    else with its traceback); returns the verdict's detail for the sender, which offers it again."""
    if unreachable(exc):
        log.error("%s: %s", what, said(exc))
        return said(exc).replace("the queue database", "the receiver's queue database", 1) + "; offer it again"
    log.error("%s", what, exc_info=exc)
    return f"the receiver failed ({type(exc).__name__}); offer it again"

