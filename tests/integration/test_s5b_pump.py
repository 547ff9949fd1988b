"""The S5B receiver's read loop on a real socket pair: whole stream, early end, and the idle limit."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

from adapters.xmpp.s5b import _pump_s5b


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
