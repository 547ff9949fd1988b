"""The lab's free ports: a server the tests start binds its port seconds after it was picked, so the pick must not
be one the kernel hands to outgoing connections, nor one another test worker picks meanwhile (CI saw a gateway's
XMPP stream answered by another test's SOCKS5 proxy on the XMPP server's port)."""

from __future__ import annotations

import contextlib
import socket

import pytest

from adapters.lab import localpeers
from adapters.lab.localpeers import free_port


def test_ports_are_below_the_ephemeral_range_and_never_handed_out_twice_while_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    low = 32768  # Debian's default (this machine's: localpeers.ephemeral_low())
    monkeypatch.setattr(localpeers, "ephemeral_low", lambda: low)
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(300):
            port = free_port()
            listener = held.enter_context(socket.socket())
            listener.bind(("127.0.0.1", port))  # free, as said
            listener.listen(1)
            ports.append(port)
        assert len(set(ports)) == 300
        assert all(20000 <= port < low for port in ports)


def test_without_room_below_the_ephemeral_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localpeers, "ephemeral_low", lambda: 20500)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))  # free, as said


def test_a_port_someone_bound_is_skipped() -> None:
    free_port()  # the block and its cursor are set
    block = localpeers._port_block()
    taken = block[localpeers._port_offset]  # type: ignore[index]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        assert free_port() != taken


def test_two_test_workers_pick_from_blocks_that_do_not_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = []
    for worker in ("gw0", "gw1", "gw2", "gw3"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        blocks.append(localpeers._port_block())
    assert all(len(block) == 1000 for block in blocks)
    for i, block in enumerate(blocks):
        for other in blocks[i + 1:]:
            assert not set(block) & set(other)
