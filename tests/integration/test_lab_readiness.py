"""The lab waits for the server it started, not for any listener on that server's port: CI saw a test's gateway
read ``\\x05\\xff`` (a SOCKS5 proxy's answer) from the port the lab had started Prosody's c2s on, after the lab's
readiness check (the port accepts) had passed for another test's proxy there."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from adapters.lab.localpeers import Prosody, free_port, socks5_answers, xmpp_answers
from tests.integration.test_xmpp_transfer import DOMAIN, running_prosody


@contextmanager
def listener(answer: bytes | None) -> Iterator[int]:
    """A loopback listener that answers every connection's first bytes with ``answer`` (None: says nothing)."""
    server = socket.create_server(("127.0.0.1", free_port()))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        held = []
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            held.append(conn)
            if answer is not None:
                conn.settimeout(1)
                try:
                    conn.recv(4096)
                    conn.sendall(answer)
                except OSError:
                    pass
        for conn in held:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_the_checks_tell_the_xmpp_server_its_proxy_and_a_stranger_apart(tmp_path: Path) -> None:
    with running_prosody(tmp_path / "prosody") as prosody:
        assert xmpp_answers(prosody.c2s_port, DOMAIN) and socks5_answers(prosody.proxy_port)
        assert not xmpp_answers(prosody.proxy_port, DOMAIN)  # the proxy on the server's port is not the server
        assert not socks5_answers(prosody.c2s_port)
        assert not xmpp_answers(prosody.c2s_port, "other.test")  # a server, but not for our domain
    with listener(None) as silent, listener(b"\x05\xff") as refusing_proxy:
        assert not xmpp_answers(silent, DOMAIN) and not socks5_answers(silent)
        assert not xmpp_answers(refusing_proxy, DOMAIN) and not socks5_answers(refusing_proxy)


def test_a_prosody_whose_port_another_proxy_holds_is_not_taken_as_ready(tmp_path: Path) -> None:
    """Prosody logs that it could not bind its c2s port and runs on: the lab must not hand it to a test."""
    with listener(b"\x05\xff") as taken:
        server = Prosody(tmp_path / "prosody", domain=DOMAIN)
        server.c2s_port = taken
        try:
            with pytest.raises((TimeoutError, RuntimeError)):
                server.start(timeout_s=8)
        finally:
            server.stop()  # also when it was taken as ready: no server is left running
        assert server.proc is not None and server.proc.poll() is not None  # stopped by PID, ready or not
