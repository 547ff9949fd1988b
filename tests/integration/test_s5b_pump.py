"""The S5B receiver's read loop on a real socket pair: whole stream, early end, and the idle limit, in the
clear and inside the gateways' end-to-end TLS (the sender's end as ``_secure`` makes it)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapters.xmpp.common import RateFloor
from adapters.xmpp.e2e import (
    Identity,
    client_context,
    ensure_identity,
    server_context,
)
from adapters.xmpp.s5b import _pump_out, _pump_s5b, _secure


class MemorySink:
    def __init__(self, size: int, offset: int = 0) -> None:
        self.size, self.offset = size, offset
        self.digest = hashlib.sha256()
        self.writes = 0

    def write(self, data: bytes | memoryview) -> None:
        self.digest.update(data)
        self.offset += len(data)
        self.writes += 1


def _send_in_pieces(sock: socket.socket, payload: bytes, piece: int, close: bool = True) -> threading.Thread:
    def run() -> None:
        for start in range(0, len(payload), piece):
            sock.sendall(payload[start : start + piece])
        if close:
            sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_the_whole_stream_arrives_in_whole_blocks_whatever_the_relay_piece_size() -> None:
    payload = os.urandom(3 * (1 << 20) + 12345)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        sink = MemorySink(len(payload))
        sender = _send_in_pieces(theirs, payload, 4096)  # stock proxy65 relays 4 KiB at a time
        _pump_s5b(ours, sink, idle_timeout_s=10)
        sender.join()
    assert sink.offset == len(payload)
    assert sink.digest.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert sink.writes == 4  # three whole MiB blocks and the tail


def test_an_early_end_of_stream_leaves_what_came_for_a_resume() -> None:
    payload = os.urandom(100_000)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        sink = MemorySink(len(payload) * 2)
        sender = _send_in_pieces(theirs, payload, 4096)
        _pump_s5b(ours, sink, idle_timeout_s=10)
        sender.join()
    assert sink.offset == len(payload)
    assert sink.digest.hexdigest() == hashlib.sha256(payload).hexdigest()


def test_a_stream_that_goes_quiet_ends_with_a_timeout_and_keeps_its_bytes() -> None:
    payload = os.urandom(5000)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        sink = MemorySink(1 << 20)
        sender = _send_in_pieces(theirs, payload, 5000, close=False)
        with pytest.raises(TimeoutError, match="no byte for 1 s"):
            _pump_s5b(ours, sink, idle_timeout_s=1)
        sender.join()
    assert sink.offset == len(payload)


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> tuple[Identity, Identity]:
    root = tmp_path_factory.mktemp("identities")
    sender, _ = ensure_identity(root / "a.key", root / "a.pem", "sender")
    receiver, _ = ensure_identity(root / "b.key", root / "b.pem", "receiver")
    return sender, receiver


def _tls_sender(sock: socket.socket, identities: tuple[Identity, Identity], payload: bytes, piece: int,
                close: bool = True, pause_s: float = 0.0) -> tuple[threading.Thread, list[BaseException]]:
    """The sender's end as the gateway has it (``_secure``: handshake, the receiver's pin checked), writing
    ``payload`` in ``piece``-byte writes, then ending as the gateway does (no close_notify, a FIN)."""
    sender, receiver = identities
    errors: list[BaseException] = []

    def run() -> None:
        try:
            stream = _secure(sock.dup(), client_context(sender), receiver.fingerprint, "receiver", 10)
            with stream:
                for start in range(0, len(payload), piece):
                    stream.sendall(payload[start : start + piece])
                    time.sleep(pause_s)  # a trickle when asked
                if close:
                    stream.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def _relay(source: socket.socket, target: socket.socket, flip_at: int) -> threading.Thread:
    """Copy ``source`` to ``target`` as a proxy would, changing the byte at stream offset ``flip_at`` (if any)."""
    def run() -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while chunk := bytearray(source.recv(65536)):
                if seen <= flip_at < seen + len(chunk):
                    chunk[flip_at - seen] ^= 0x01
                seen += len(chunk)
                target.sendall(chunk)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _receiver_tls(identities: tuple[Identity, Identity]) -> ssl.SSLContext:
    sender, receiver = identities
    return server_context(receiver, sender.cert_der)


@pytest.mark.parametrize(("size", "announced", "piece", "blocks"), [
    (3 * (1 << 20) + 12345, 3 * (1 << 20) + 12345, 300_000, 4),  # whole: MiB blocks filled record by record, the tail
    (100_000, 200_000, 4096, 1),  # the sender's end before the announced size: what came stays for a resume
], ids=["whole", "cut-early"])
def test_an_encrypted_stream_arrives_exactly_as_far_as_it_was_sent(identities: tuple[Identity, Identity], size: int,
                                                                   announced: int, piece: int, blocks: int) -> None:
    payload = os.urandom(size)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        sink = MemorySink(announced)
        sender, errors = _tls_sender(theirs, identities, payload, piece)
        _pump_s5b(ours, sink, idle_timeout_s=10, tls=_receiver_tls(identities))
        sender.join()
    assert errors == []
    assert sink.offset == len(payload)
    assert sink.digest.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert sink.writes == blocks


@contextlib.contextmanager
def _relayed() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    """(ours, relay_in, relay_out, theirs): the receiver's socket, the relay's two ends, the sender's socket."""
    ours, relay_in = socket.socketpair()
    relay_out, theirs = socket.socketpair()
    with ours, relay_in, relay_out, theirs:
        yield ours, relay_in, relay_out, theirs


def _shut(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _ended_within(seconds: float, run: Callable[[], object]) -> BaseException | None:
    """Run ``run`` on a thread; what it raised, once it ended. A run still going after ``seconds`` (a
    pump that would wait for ever) fails the test instead of hanging the suite; the caller's sockets end it."""
    raised: list[BaseException] = []

    def wrapper() -> None:
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            raised.append(exc)

    thread = threading.Thread(target=wrapper, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s: the idle limit did not apply"
    return raised[0] if raised else None


def test_a_quiet_encrypted_stream_times_out_and_keeps_its_bytes(identities: tuple[Identity, Identity]) -> None:
    """A sender (or a proxy) that stops relaying mid-stream without closing: the receiver's pump ends after
    its idle limit with what came, as in the clear (it blocked for ever inside ``ssl.SSLSocket``, which
    retries a read that ``SO_RCVTIMEO`` ended)."""
    payload = os.urandom(5000)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        sink = MemorySink(1 << 20)
        sender, errors = _tls_sender(theirs, identities, payload, 5000, close=False)
        try:
            raised = _ended_within(30, lambda: _pump_s5b(ours, sink, idle_timeout_s=1, tls=_receiver_tls(identities)))
        finally:
            with contextlib.suppress(OSError):  # (the pump closes its socket when it ends)
                ours.shutdown(socket.SHUT_RDWR)
            sender.join()
    assert isinstance(raised, TimeoutError) and "no byte for 1 s" in str(raised)
    assert errors == []
    assert sink.offset == len(payload)


def test_a_receiver_that_stops_reading_fails_the_encrypted_send_after_the_idle_limit(
        identities: tuple[Identity, Identity]) -> None:
    """The receiver's end (or a proxy) takes the handshake and then no byte: the sending thread's write fails
    after the idle limit (the attempt is cut and resumed later) instead of holding the thread for ever."""
    sender, receiver = identities
    ours, theirs = socket.socketpair()
    with ours, theirs:
        handshaken = threading.Event()

        def receive_nothing() -> None:
            stream = server_context(receiver, sender.cert_der).wrap_socket(theirs.dup(), server_side=True)
            handshaken.set()
            with stream:
                with contextlib.suppress(OSError):
                    stream.recv(1)  # blocks until the test ends it: reads nothing of the stream

        reader = threading.Thread(target=receive_nothing)
        reader.start()
        chunks = iter([os.urandom(1 << 20)] * 64)  # far more than the socket buffers hold
        moved = [0]
        try:
            raised = _ended_within(30, lambda: _pump_out(ours.dup(), chunks, client_context(sender), receiver.fingerprint,
                                                         "receiver", moved, None, 1))
        finally:
            theirs.shutdown(socket.SHUT_RDWR)
            reader.join()
    assert handshaken.is_set()
    assert isinstance(raised, OSError), raised
    assert moved[0] < 64 << 20


def test_a_peer_that_never_starts_the_handshake_times_out(identities: tuple[Identity, Identity]) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        raised = _ended_within(30, lambda: _pump_s5b(ours, MemorySink(1000), idle_timeout_s=1, tls=_receiver_tls(identities)))
    assert isinstance(raised, TimeoutError) and "no TLS handshake within 1 s" in str(raised)


def test_a_tampered_record_ends_the_stream_after_the_bytes_before_it(identities: tuple[Identity, Identity]) -> None:
    """A relay that changes one byte of what it carries: TLS refuses that record; what came authenticated
    before it is kept (for a resume), nothing of it or after it reaches the sink."""
    payload = os.urandom(400_000)
    with _relayed() as (ours, relay_in, relay_out, theirs):
        sink = MemorySink(len(payload))
        sender, _errors = _tls_sender(theirs, identities, payload, 10_000)
        relays = [_relay(relay_out, relay_in, flip_at=200_000), _relay(relay_in, relay_out, flip_at=-1)]
        raised = _ended_within(60, lambda: _pump_s5b(ours, sink, idle_timeout_s=10, tls=_receiver_tls(identities)))
        _shut(ours, relay_in, relay_out, theirs)
        sender.join()
        for relay in relays:
            relay.join()
    assert isinstance(raised, ssl.SSLError), raised
    assert 0 < sink.offset < 200_000
    assert sink.digest.hexdigest() == hashlib.sha256(payload[: sink.offset]).hexdigest()


def test_the_sender_refuses_a_receiver_that_is_not_the_pinned_one(identities: tuple[Identity, Identity],
                                                                  tmp_path: Path) -> None:
    stranger, _ = ensure_identity(tmp_path / "s.key", tmp_path / "s.pem", "stranger")
    sender, _receiver = identities
    ours, theirs = socket.socketpair()
    with ours, theirs:
        served: list[BaseException] = []

        def serve() -> None:
            try:
                server_context(stranger, sender.cert_der).wrap_socket(ours.dup(), server_side=True).close()
            except BaseException as exc:  # noqa: BLE001
                served.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        with pytest.raises(ssl.SSLError, match="does not match the pin"):
            _secure(theirs.dup(), client_context(sender), identities[1].fingerprint, "receiver", 10)
        theirs.shutdown(socket.SHUT_RDWR)
        thread.join()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "tls"])
def test_a_stream_that_trickles_under_the_rate_floor_is_cut_and_keeps_its_bytes(
        identities: tuple[Identity, Identity], encrypted: bool) -> None:
    """A byte now and then, always within the idle limit: once the grace has passed the stream must have
    averaged the floor; a trickle (1 kB/s against 100 kB/s here) is cut with what came kept."""
    payload = os.urandom(20_000)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        sink = MemorySink(len(payload))
        if encrypted:
            sender, _errors = _tls_sender(theirs, identities, payload, 100, pause_s=0.1)
        else:
            def trickle() -> None:
                with contextlib.suppress(OSError):
                    for start in range(0, len(payload), 100):
                        theirs.sendall(payload[start : start + 100])
                        time.sleep(0.1)
            sender = threading.Thread(target=trickle)
            sender.start()
        floor = RateFloor(min_bytes_per_s=100_000, grace_s=0.5)
        raised = _ended_within(30, lambda: _pump_s5b(ours, sink, idle_timeout_s=10, tls=_receiver_tls(identities) if encrypted else None,
                                                     floor=floor))
        with contextlib.suppress(OSError):
            theirs.shutdown(socket.SHUT_RDWR)
        sender.join()
    assert isinstance(raised, TimeoutError) and "bytes/s after" in str(raised), raised
    assert 0 < sink.offset < len(payload)
    assert sink.digest.hexdigest() == hashlib.sha256(payload[: sink.offset]).hexdigest()


def test_a_record_trickled_in_pieces_is_cut_by_the_rate_floor_before_it_is_whole(identities: tuple[Identity, Identity]) -> None:
    """A relay that passes the handshake, then the sender's records 20 bytes every 0.05 s: a 16 KiB record would
    take 40 s to complete; the floor (100 kB/s after 0.5 s here) is checked at every piece, not per record."""
    payload = os.urandom(200_000)
    with _relayed() as (ours, relay_in, relay_out, theirs):
        sink = MemorySink(len(payload))
        sender, _errors = _tls_sender(theirs, identities, payload, 50_000)
        done = threading.Event()

        def slow_relay() -> None:  # the handshake passes whole; then the stream's bytes in small pieces
            seen = 0
            with contextlib.suppress(OSError):
                while not done.is_set() and (chunk := relay_out.recv(20 if seen > 3000 else 65536)):
                    relay_in.sendall(chunk)
                    seen += len(chunk)
                    if seen > 3000:
                        time.sleep(0.05)

        relays = [threading.Thread(target=slow_relay), _relay(relay_in, relay_out, flip_at=-1)]
        relays[0].start()
        started = time.monotonic()
        raised = _ended_within(30, lambda: _pump_s5b(ours, sink, idle_timeout_s=10, tls=_receiver_tls(identities),
                                                     floor=RateFloor(min_bytes_per_s=100_000, grace_s=0.5)))
        elapsed = time.monotonic() - started
        done.set()
        _shut(ours, relay_in, relay_out, theirs)
        sender.join()
        for relay in relays:
            relay.join()
    assert isinstance(raised, TimeoutError) and "bytes/s after" in str(raised), raised
    assert elapsed < 20, elapsed  # cut while a record was still arriving in pieces (one takes ~40 s)
    assert sink.offset < len(payload)
    assert sink.digest.hexdigest() == hashlib.sha256(payload[: sink.offset]).hexdigest()
