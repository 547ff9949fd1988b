"""The proxy65 variant in conf/prosody against Prosody's stock module, on a real Prosody: what the gateway relies
on when the variant says ``urn:dicomgw:proxy65:early-link`` (a pipelined SOCKS5 request; the two legs linked as
soon as both are connected, before any activation; a third leg refused), and that the stock module refuses a
pipelined request, which is why a gateway pipelines only where the proxy says it may."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from adapters.lab.localpeers import Prosody
from adapters.xmpp import socks5

VARIANT = Path(__file__).resolve().parents[2] / "conf" / "prosody" / "plugins"


@contextmanager
def running(tmp_path: Path, variant: bool) -> Iterator[Prosody]:
    prosody = Prosody(tmp_path / "prosody", domain="helsenett.test", plugin_paths=[VARIANT] if variant else [])
    prosody.start()
    try:
        yield prosody
    finally:
        prosody.stop()


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    sock.settimeout(60)  # a deadline for a loaded machine; the bytes are already on their way
    data = b""
    while len(data) < count:
        piece = sock.recv(count - len(data))
        if not piece:
            break
        data += piece
    return data


@pytest.mark.parametrize("variant", [False, True], ids=["stock-proxy65", "dicomgw-proxy65"])
def test_a_pipelined_socks5_request_is_taken_only_by_the_variant(tmp_path: Path, variant: bool) -> None:
    digest = socks5.dst_addr("sid-1", "a@helsenett.test/gw1", "b@helsenett.test/gw1")
    with running(tmp_path, variant) as server:
        if not variant:
            with pytest.raises(socks5.Socks5Error, match="no-authentication|closed the connection"):
                socks5.connect_blocking("127.0.0.1", server.proxy_port, digest, pipelined=True)
            socks5.connect_blocking("127.0.0.1", server.proxy_port, digest).close()  # XEP-0065's way: taken
            return
        socks5.connect_blocking("127.0.0.1", server.proxy_port, digest, pipelined=True).close()


def test_the_variant_links_both_legs_before_any_activation_and_refuses_a_third(tmp_path: Path) -> None:
    digest = socks5.dst_addr("sid-2", "a@helsenett.test/gw1", "b@helsenett.test/gw1")
    with running(tmp_path, variant=True) as server:
        first = socks5.connect_blocking("127.0.0.1", server.proxy_port, digest, pipelined=True)
        hello = os.urandom(300_000)  # sent before the other leg exists: it waits in the proxy (the leg is paused)
        first.sendall(hello[:1000])
        second = socks5.connect_blocking("127.0.0.1", server.proxy_port, digest)  # XEP-0065's two exchanges
        with first, second:
            first.sendall(hello[1000:])
            assert _read_exactly(second, len(hello)) == hello
            answer = os.urandom(70_000)
            second.sendall(answer)
            assert _read_exactly(first, len(answer)) == answer
            with pytest.raises(socks5.Socks5Error, match="status 2"):
                socks5.connect_blocking("127.0.0.1", server.proxy_port, digest)
            first.sendall(b"still linked")  # the refused third leg did not take either place
            assert _read_exactly(second, 12) == b"still linked"
