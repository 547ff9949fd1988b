"""The XMPP agent's parts hold their own state and end it themselves when the session ends (issue 18 §5):
built here on a stand-in for the agent (``common.XmppClient``), no server needed."""

from __future__ import annotations

import asyncio
import base64
import errno
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from slixmpp.exceptions import XMPPError

from adapters.xmpp.common import (
    AwaitedVerdict,
    InboundStream,
    OutboundStream,
    TransferCut,
    progress_in_thread,
)
from adapters.xmpp.ibb import InBandBytestreams
from adapters.xmpp.offer import StudyOffers
from adapters.xmpp.s5b import Socks5Bytestreams
from adapters.xmpp.stanzas import NS_IBB, NS_S5B, q
from gateway.retry import PEER_SPOOL_FULL


class Client:
    """Only what ``XmppClient`` declares; a part reaching for anything else fails the test."""

    settings: Any = None
    inbound: Any = None
    identities: Any = None
    boundjid: Any = None
    plugin: Any = None

    def __init__(self) -> None:
        self.spawned: list[Any] = []

    def spawn(self, coro: Any) -> None:
        self.spawned.append(coro)


def parts() -> tuple[Socks5Bytestreams, InBandBytestreams, StudyOffers]:
    client = Client()
    s5b, ibb = Socks5Bytestreams(client), InBandBytestreams(client)  # type: ignore[arg-type]
    offers = StudyOffers(client, s5b, ibb)  # type: ignore[arg-type]
    s5b.ends = ibb.ends = offers
    return s5b, ibb, offers


def test_the_session_ending_ends_what_each_part_holds() -> None:
    async def run() -> None:
        s5b, ibb, offers = parts()
        loop = asyncio.get_running_loop()
        s5b.proxy, s5b.links_early = ("proxy.helsenett.test", "127.0.0.1", 5000), True
        verdict = AwaitedVerdict(loop.create_future(), "b@helsenett.test/gw1", None)
        offers.verdicts["sid1"] = verdict
        handshake: asyncio.Future[None] = loop.create_future()
        ibb.outbound["sid2"] = OutboundStream("b@helsenett.test/gw1", None, handshake)  # type: ignore[arg-type]
        s5b.session_ended()
        offers.session_ended()
        ibb.session_ended(TransferCut("XMPP connection lost"))
        assert s5b.proxy is None and not s5b.links_early  # the next session may be on another node, another proxy
        with pytest.raises(TransferCut, match="before the receiver's verdict"):
            verdict.future.result()
        with pytest.raises(TransferCut, match="connection lost"):
            handshake.result()

    asyncio.run(run())


def test_an_inbound_socket_is_the_s5b_parts_to_reset_and_release() -> None:
    s5b, _ibb, offers = parts()
    assert not s5b.reset("unknown") and offers.s5b is s5b
    s5b.release("unknown")  # nothing held: nothing to do
    ours, theirs = socket.socketpair()
    try:
        s5b.sockets["sid1"] = ours
        assert s5b.reset("sid1")  # a STAT study first: a reset, the reader sees its stream end
        s5b.release("sid1")
        assert "sid1" not in s5b.sockets and ours.fileno() == -1
    finally:
        theirs.close()


def test_the_receivers_early_proxy_leg_opens_only_for_an_allowed_peer_and_is_closed_when_the_offer_is_refused() -> None:
    """The leg to the proxy an offer names opens while the receiver decides, once the offer passed the
    in-memory screen (an allowed peer, its pin); a stranger's offer opens none, and a refused one's is closed."""
    import slixmpp
    from slixmpp.exceptions import XMPPError

    from adapters.xmpp.stanzas import NS_S5B, Offer

    class Inbound:
        def __init__(self, screen: tuple[str, str] | None, authorize: tuple[str, str] | None) -> None:
            self._screen, self._authorize = screen, authorize

        def screen(self, _peer: str, _offer: object) -> tuple[str, str] | None:
            return self._screen

        def authorize(self, _peer: str, _offer: object) -> tuple[str, str] | None:
            return self._authorize

    async def run(screen: tuple[str, str] | None, authorize: tuple[str, str] | None) -> list[socket.socket]:
        s5b, _ibb, offers = parts()
        opened: list[socket.socket] = []

        def leg(*_args: object) -> asyncio.Future[socket.socket]:
            ours, theirs = socket.socketpair()
            theirs.close()
            opened.append(ours)
            future: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
            future.set_result(ours)
            return future

        s5b.connect_streamhost_early = leg  # type: ignore[method-assign]
        offers.client.inbound = Inbound(screen, authorize)  # type: ignore[attr-defined]
        offer = Offer("sid1", "sid1.dgwb", 1000, "ab" * 32, (NS_S5B,), streamhost=("proxy.x", "127.0.0.1", 5000))
        with pytest.raises(XMPPError):
            await offers._decide(None, slixmpp.JID("a@x/gw1"), offer, 0.0)  # type: ignore[arg-type]
        return opened

    assert asyncio.run(run(("forbidden", "not an allowed peer"), None)) == []  # a stranger: no connection at all
    (leg,) = asyncio.run(run(None, ("resource-constraint", "busy: 2 inbound transfer(s) running")))
    assert leg.fileno() == -1  # opened while deciding, closed with the refusal


def test_a_streamhost_query_waits_for_the_pending_offer_of_its_own_sender_only() -> None:
    """The query sent right behind an offer waits until that offer is decided; a query from anyone else
    naming the same stream id does not wait (it finds no accepted offer of its own, as before)."""
    async def run() -> None:
        _s5b, _ibb, offers = parts()
        offers.client.settings = type("S", (), {"iq_timeout_s": 30.0})()  # type: ignore[attr-defined]
        decided: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        offers.deciding["sid1"] = ("radiology.hospital-a@x/gw1", decided)
        await offers.offer_decided("sid1", "mallory@x/evil")  # a stranger: at once, the offer still pending
        await offers.offer_decided("sid2", "radiology.hospital-a@x/gw1")  # no such pending offer: at once
        assert not decided.done()
        waiting = asyncio.ensure_future(offers.offer_decided("sid1", "radiology.hospital-a@x/gw1"))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done()  # the sender's own query waits for the decision
        decided.set_result(None)
        await asyncio.wait_for(waiting, 30)

    asyncio.run(run())


def test_an_early_legs_handshake_ends_when_the_attempt_goes_another_way_and_a_finished_one_is_closed() -> None:
    """``OutboundLeg``: the handshake started on our leg as soon as it is up (a proxy that links early) blocks on
    its own thread until the receiver answers; discarding the leg (a refused offer, an IBB answer) ends it at
    once through the second descriptor, and a handshake that had finished leaves no socket open."""
    from adapters.xmpp.s5b import OutboundLeg

    async def run() -> None:
        ours, far = socket.socketpair()
        started = asyncio.Event()
        loop = asyncio.get_running_loop()

        def blocked_handshake(sock: socket.socket) -> Any:
            loop.call_soon_threadsafe(started.set)
            if sock.recv(1) == b"":  # the far side never answers: only a shutdown ends this
                raise ConnectionError("the leg was shut")
            raise AssertionError("no byte was sent")

        async def connect() -> socket.socket:
            return ours

        leg = OutboundLeg(connect, blocked_handshake, "test-tls")
        assert await leg.connected is ours
        await asyncio.wait_for(started.wait(), 30)
        leg.discard()
        with pytest.raises(ConnectionError, match="shut"):
            await asyncio.wait_for(leg.secured, 30)  # type: ignore[arg-type]
        far.close()

        one, two = socket.socketpair()

        async def connect_two() -> socket.socket:
            return one

        done = OutboundLeg(connect_two, lambda sock: sock, "test-tls")  # a handshake that ends at once
        assert await asyncio.wait_for(done.secured if done.secured else done.connected, 30) is one
        await asyncio.wait_for(done.secured, 30)  # type: ignore[arg-type]
        done.discard()
        await asyncio.sleep(0)  # the close runs as a done-callback
        assert one.fileno() == -1  # closed: nobody took it
        two.close()

    asyncio.run(run())


@pytest.mark.parametrize("text", [
    "x" * 100_000,  # oversized
    "line one\nline two\r\nthree",  # newlines: one line in the attempt row
    "spool is full\u0000\u001b[2J\ud800\U0010ffff",  # NUL, ESC, a lone surrogate, a non-character
    "é" * 1000,  # non-ASCII repeated
    "",  # no text: the condition alone
])
def test_a_receivers_ibb_refusal_text_goes_into_the_attempt_bounded_and_on_one_line(text: str) -> None:
    """A peer's text on a refused IBB block is untrusted: it reaches the attempt row (and the queue) as one line
    of at most 200 characters XML can carry, after its condition."""
    from adapters.xmpp.ibb import _refusal

    said = _refusal({"error": {"condition": "resource-constraint", "text": text}})
    assert said.startswith("resource-constraint") and "\n" not in said and "\r" not in said
    assert len(said) <= len("resource-constraint: ") + 200
    assert not any(ch in said for ch in "\u0000\u001b\ud800")
    assert _refusal(None) == "cancelled"


class SlowSink:
    """A sink whose close (fsyncs, the unit's and the transfer's rows) takes until the test lets it end."""

    def __init__(self, bundle_key: str, log: list[str], gate: threading.Event) -> None:
        self.bundle_key, self.log, self.gate = bundle_key, log, gate
        self.offset, self.size = 10, 100

    def close(self, reason: str) -> None:
        self.log.append(f"{id(self)} start on {'the loop' if threading.current_thread() is threading.main_thread() else 'a worker'}")
        assert self.gate.wait(30)
        self.log.append(f"{id(self)} end: {reason}")


def test_a_dropped_streams_close_runs_off_the_loop_and_the_next_open_of_its_bundle_waits_for_it() -> None:
    async def run() -> None:
        _s5b, _ibb, offers = parts()
        log: list[str] = []
        gate = threading.Event()
        sink, other = SlowSink("b" * 64, log, gate), SlowSink("c" * 64, log, threading.Event())
        offers.sinks["sid1"] = InboundStream("a@helsenett.test/gw1", sink, "ibb", None)  # type: ignore[arg-type]
        offers.drop("sid1", "IBB block out of order")  # a refusal of hostile input: returns at once
        assert "sid1" not in offers.sinks
        waiting = asyncio.ensure_future(offers.closed("b" * 64))  # what a new offer of the bundle waits for
        await asyncio.wait_for(_until(lambda: bool(log)), 60)
        assert log == [f"{id(sink)} start on a worker"]
        await asyncio.wait_for(offers.closed(other.bundle_key), 60)  # another bundle's offer does not wait
        assert not waiting.done()
        gate.set()
        await asyncio.wait_for(waiting, 60)
        assert log == [f"{id(sink)} start on a worker", f"{id(sink)} end: IBB block out of order"]
        assert offers.closing == {}

    asyncio.run(run())


def test_a_sink_is_opened_on_a_worker_thread() -> None:
    async def run() -> None:
        _s5b, _ibb, offers = parts()
        threads: list[threading.Thread] = []

        class Inbound:
            def open_sink(self, _peer: str, _offer: object, _method: str) -> str:
                threads.append(threading.current_thread())  # a resume hashes what came before: never on the loop
                return "sink"

        offers.client.inbound = Inbound()
        assert await offers._open_sink("a@helsenett.test", object(), "ibb") == "sink"  # type: ignore[arg-type]
        assert threads and threads[0] is not threading.main_thread()

    asyncio.run(run())


def test_a_sink_opened_for_an_offer_cancelled_meanwhile_is_closed() -> None:
    async def run() -> None:
        _s5b, _ibb, offers = parts()
        gate, closed = threading.Event(), threading.Event()

        class Made:
            def close(self, reason: str) -> None:
                assert reason == "the offer was cancelled"
                closed.set()

        class Inbound:
            def open_sink(self, _peer: str, _offer: object, _method: str) -> Made:
                assert gate.wait(30)
                return Made()

        offers.client.inbound = Inbound()
        opening = asyncio.ensure_future(offers._open_sink("a@helsenett.test", object(), "s5b"))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        opening.cancel()  # the session ends while the worker thread still makes the sink
        with pytest.raises(asyncio.CancelledError):
            await opening
        gate.set()
        await asyncio.wait_for(_until(closed.is_set), 60)  # its admission and files are not left behind

    asyncio.run(run())


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("final", [True, False])
def test_the_last_progress_of_a_stream_is_written_when_it_came_while_a_write_was_in_flight(final: bool) -> None:
    """A busy machine's slow first progress write while the pump hands the whole study to the socket buffers:
    the latest position that came meanwhile is written after it, and the final one (all handed on) is marked so
    that the writer's once-a-second thinning keeps it (the queue said `sending 0.2 %` for a whole stream)."""
    async def run() -> None:
        gate = threading.Event()
        written: list[tuple[int, bool]] = []

        def progress(position: int, method: str, sid: str, offset: int, final: bool = False) -> None:
            assert gate.wait(30) and (method, sid, offset) == ("s5b", "sid1", 0)
            written.append((position, final))

        report = progress_in_thread(progress, "sid1", 0)
        assert report is not None
        for position in (10_827, 2_000_000, 4_000_000):  # the pump hands everything on during the first write
            report(position, NS_S5B)
        report(5_300_187, NS_S5B, final)
        gate.set()
        await asyncio.wait_for(_until(lambda: len(written) == 2), 60)
        await asyncio.sleep(0.2)  # nothing more comes
        assert written == [(10_827, False), (5_300_187, final)]

    asyncio.run(run())


def test_the_writer_thins_progress_to_once_a_second_but_keeps_the_final_position() -> None:
    from gateway.dispatch import _ProgressWriter

    class Store:
        def __init__(self) -> None:
            self.progress: list[int] = []

        def transition(self, *_args: object, **_kwargs: object) -> None:
            pass

        def set_progress(self, _unit_id: int, position: int, _method: str) -> None:
            self.progress.append(position)

    store = Store()
    writer = _ProgressWriter(store, 1, "b@helsenett.test/gw1")  # type: ignore[arg-type]
    writer.update(10_827, "s5b")
    writer.update(4_000_000, "s5b")  # within the second: thinned out
    writer.update(5_300_187, "s5b", final=True)
    assert store.progress == [10_827, 5_300_187]


class BlockSink:
    """An IBB stream's sink that records each write (and on which thread), holds the first until ``gate`` is set
    (a disk or a database that stalls) and fails the block that is ``fail_at`` (1-based)."""

    def __init__(self, gate: threading.Event, fail_at: int = 0, failure: OSError | None = None) -> None:
        self.gate, self.fail_at = gate, fail_at
        self.failure = failure or OSError(errno.EIO, "Input/output error")
        self.offset, self.size, self.log = 0, 1000, []  # type: ignore[var-annotated]
        self.on_loop = False

    def write(self, data: bytes) -> None:
        self.on_loop |= threading.current_thread() is threading.main_thread()
        if not self.log and not self.on_loop:
            assert self.gate.wait(30)
        if len([e for e in self.log if e.startswith("write")]) + 1 == self.fail_at:
            raise self.failure
        self.offset += len(data)
        self.log.append(f"write {data.decode()}")

    def close(self, reason: str) -> None:
        self.log.append(f"close: {reason}")


class BlockIq:
    """What the IBB handler reads of a data stanza, and the answer it gives."""

    def __init__(self, seq: int, data: bytes, answers: list[str], sid: str = "sid1") -> None:
        self.xml = ET.Element("iq")
        ET.SubElement(self.xml, q(NS_IBB, "data"), {"sid": sid, "seq": str(seq)}).text = base64.b64encode(data).decode()
        self.sender = SimpleNamespace(full="a@helsenett.test/gw1", bare="a@helsenett.test")
        self.answers, self.seq = answers, seq

    def __getitem__(self, key: str) -> Any:
        assert key == "from"
        return self.sender

    def reply(self) -> BlockIq:
        return self

    def send(self) -> None:
        self.answers.append(f"{self.seq}: result")

    def exception(self, exc: Any) -> None:
        self.answers.append(f"{self.seq}: {exc.condition}")


def ibb_stream(sink: BlockSink) -> tuple[InBandBytestreams, StudyOffers, list[asyncio.Future[Any]]]:
    _s5b, ibb, offers = parts()
    tasks: list[asyncio.Future[Any]] = []
    offers.client.spawn = lambda coro: tasks.append(asyncio.ensure_future(coro))  # type: ignore[method-assign]
    entry = InboundStream("a@helsenett.test/gw1", sink, "ibb", None)  # type: ignore[arg-type]
    entry.started = True
    offers.sinks["sid1"] = entry
    return ibb, offers, tasks


def test_ibb_blocks_are_written_off_the_loop_in_order_and_each_is_answered_once_written() -> None:
    """The IBB fallback's file writes, its unit row and its progress rows are the sink's: a stalled disk or
    database holds the stream's blocks (and the sender's window), not the loop that serves every peer."""
    async def run() -> None:
        gate = threading.Event()
        sink = BlockSink(gate)
        ibb, _offers, _tasks = ibb_stream(sink)
        answers: list[str] = []
        for seq, data in enumerate([b"one", b"two", b"three"]):
            ibb.on_data(BlockIq(seq, data, answers))  # type: ignore[arg-type]
        ticks = 0
        while ticks < 20:  # the loop runs on while the first write waits for its disk
            await asyncio.sleep(0.005)
            ticks += 1
        assert answers == [] and sink.log == []
        gate.set()
        await asyncio.wait_for(_until(lambda: len(answers) == 3), 60)
        assert sorted(answers) == ["0: result", "1: result", "2: result"]
        assert sink.log == ["write one", "write two", "write three"] and not sink.on_loop

    asyncio.run(run())


def test_an_ibb_block_whose_write_fails_ends_the_stream_and_the_blocks_behind_it_are_not_written() -> None:
    async def run() -> None:
        gate = threading.Event()
        gate.set()
        sink = BlockSink(gate, fail_at=2)
        ibb, offers, _tasks = ibb_stream(sink)
        failed: list[BaseException] = []

        async def fail_stream(sid: str, exc: BaseException) -> None:
            failed.append(exc)

        offers.fail_stream = fail_stream  # type: ignore[method-assign]
        answers: list[str] = []
        for seq, data in enumerate([b"one", b"two", b"three"]):
            ibb.on_data(BlockIq(seq, data, answers))  # type: ignore[arg-type]
        await asyncio.wait_for(_until(lambda: len(answers) == 3 and bool(failed)), 60)
        assert sorted(answers) == ["0: result", "1: internal-server-error", "2: not-acceptable"]
        assert sink.log == ["write one"] and [type(e) for e in failed] == [OSError]

    asyncio.run(run())


def test_a_dropped_ibb_streams_sink_closes_after_the_blocks_it_took() -> None:
    """A refusal (a block out of order here) closes the sink on a worker thread, after the writes before it:
    never a close racing a write of the same bundle."""
    async def run() -> None:
        gate = threading.Event()
        sink = BlockSink(gate)
        ibb, offers, tasks = ibb_stream(sink)
        verdicts: list[str] = []

        async def send_verdict(peer: str, sid: str, outcome: str, detail: str, ours: str = "") -> None:
            verdicts.append(outcome)

        offers.send_verdict = send_verdict  # type: ignore[method-assign]
        answers: list[str] = []
        ibb.on_data(BlockIq(0, b"one", answers))  # type: ignore[arg-type]
        with pytest.raises(XMPPError):
            ibb.on_data(BlockIq(5, b"six", answers))  # type: ignore[arg-type]
        assert "sid1" not in offers.sinks
        await asyncio.sleep(0.05)
        assert sink.log == []
        gate.set()
        await asyncio.wait_for(offers.closed(f"sink:{id(sink)}"), 60)
        await asyncio.wait_for(_until(lambda: len(sink.log) == 2), 60)
        assert sink.log == ["write one", "close: IBB block out of order: seq '5', expected 1"]
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert verdicts == ["incomplete"] and answers == ["0: result"]

    asyncio.run(run())


def test_the_senders_close_of_an_ibb_stream_waits_for_its_writes_before_the_verdict() -> None:
    async def run() -> None:
        gate = threading.Event()
        sink = BlockSink(gate)
        sink.size = 3
        ibb, offers, _tasks = ibb_stream(sink)
        verdicts: list[tuple[str, str]] = []

        async def send_verdict(peer: str, sid: str, outcome: str, detail: str, ours: str = "") -> None:
            verdicts.append((outcome, detail))

        offers.send_verdict = send_verdict  # type: ignore[method-assign]
        sink.finish = lambda: (sink.log.append("finish"), (True, "verified"))[1]  # type: ignore[attr-defined]
        answers: list[str] = []
        ibb.on_data(BlockIq(0, b"one", answers))  # type: ignore[arg-type]
        ending = asyncio.ensure_future(offers.complete("sid1"))  # the sender's close came behind its last block
        await asyncio.sleep(0.05)
        assert not ending.done() and "sid1" in offers.sinks
        gate.set()
        await asyncio.wait_for(ending, 60)
        assert sink.log == ["write one", "finish"] and verdicts == [("received", "verified")]

    asyncio.run(run())


def test_a_full_spool_met_by_a_write_behind_the_senders_close_is_said_in_the_verdict() -> None:
    """The sender's close came while its last blocks still waited for the disk, and a write found the spool
    full: whichever end runs first, the verdict (and so the sender's queue) says the spool is full, not only
    how many bytes came."""
    async def run() -> None:
        gate = threading.Event()
        sink = BlockSink(gate, fail_at=2, failure=OSError(errno.ENOSPC, "No space left on device"))
        ibb, offers, tasks = ibb_stream(sink)
        verdicts: list[tuple[str, str]] = []

        async def send_verdict(peer: str, sid: str, outcome: str, detail: str, ours: str = "") -> None:
            verdicts.append((outcome, detail))

        offers.send_verdict = send_verdict  # type: ignore[method-assign]
        answers: list[str] = []
        ibb.on_data(BlockIq(0, b"one", answers))  # type: ignore[arg-type]
        ibb.on_data(BlockIq(1, b"two", answers))  # type: ignore[arg-type]
        ibb.on_data(BlockIq(2, b"three", answers))  # type: ignore[arg-type]
        ending = asyncio.ensure_future(offers.complete("sid1"))  # the sender's close, behind its last block
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait_for(ending, 60)
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        assert sorted(answers) == ["0: result", "1: resource-constraint", "2: not-acceptable"]
        assert verdicts == [("incomplete", f"3 of 1000 bytes before the stream ended ({PEER_SPOOL_FULL})")]
        assert sink.log == ["write one", f"close: 3 of 1000 bytes before the stream ended ({PEER_SPOOL_FULL})"]

    asyncio.run(run())


def test_a_stop_waits_for_the_ibb_blocks_taken_before_it_closes_the_sinks() -> None:
    async def run() -> None:
        gate = threading.Event()
        sink = BlockSink(gate)
        ibb, offers, tasks = ibb_stream(sink)
        answers: list[str] = []
        ibb.on_data(BlockIq(0, b"one", answers))  # type: ignore[arg-type]
        ending = asyncio.ensure_future(offers.writes_ended())  # what the agent's stop awaits first
        await asyncio.sleep(0.05)
        assert not ending.done()
        gate.set()
        await asyncio.wait_for(ending, 60)
        offers.stop()
        assert sink.log == ["write one", "close: gateway stopping"]
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    asyncio.run(run())
