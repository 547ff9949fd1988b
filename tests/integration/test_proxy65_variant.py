"""The proxy65 variant in conf/prosody against Prosody's stock module, on a real Prosody: what the gateway relies
on when the variant says ``urn:dicomgw:proxy65:early-link`` (a pipelined SOCKS5 request; the two legs linked as
soon as both are connected, before any activation; a third leg refused), and that the stock module refuses a
pipelined request, which is why a gateway pipelines only where the proxy says it may."""

from __future__ import annotations

import contextlib
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
        try:
            piece = sock.recv(count - len(data))
        except TimeoutError:  # what arrived by then is what the test compares
            break
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
        odd = b"\xff\xfe" * 20  # any 40 bytes are an address (the proxy cannot tell a hash from noise): a leg
        for _ in range(3):  # opened and closed again leaves nothing behind
            socks5.connect_blocking("127.0.0.1", server.proxy_port, odd, pipelined=True).close()
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


def test_the_variant_relays_every_byte_of_streams_that_wrote_before_the_link_without_a_half_close(
    tmp_path: Path,
) -> None:
    # Prosody 0.12's server.link resumed a paused leg through epoll alone, so bytes LuaSocket had already taken
    # off the socket stayed in its buffer until more arrived: a stream whose legs wrote before the link (as ours
    # do with the early TLS handshake) lost its tail now and then, until the S5B idle timeout (seen in the 2nd,
    # 6th or 19th of such streams in a row). The leg that waits here for its last bytes sends no more and does
    # not half-close, as a TLS peer waiting for an answer does not.
    with running(tmp_path, variant=True) as server:
        for n in range(60):
            digest = socks5.dst_addr(f"sid-tail-{n}", "a@helsenett.test/gw1", "b@helsenett.test/gw1")
            early = 1 + (n * 397) % 2000  # what the first leg sent before the second existed
            first = socks5.connect_blocking("127.0.0.1", server.proxy_port, digest, pipelined=True)
            onward, back = os.urandom(300_000), os.urandom(300_000)
            first.sendall(onward[:early])
            second = socks5.connect_blocking("127.0.0.1", server.proxy_port, digest)
            with first, second:
                first.sendall(onward[early:])
                got = _read_exactly(second, len(onward))
                assert (n, len(got), got == onward) == (n, len(onward), True)
                second.sendall(back)
                got = _read_exactly(first, len(back))
                assert (n, len(got), got == back) == (n, len(back), True)


def test_the_variant_refuses_hostile_socks5_input_and_keeps_linking_streams(tmp_path: Path) -> None:
    """What a stranger can send the proxy in place of a greeting or a request: empty methods, no
    no-authentication method, a truncated or oversized request, control characters and bytes that are not
    UTF-8 as the address, a megabyte of garbage, the same bad greeting from 1000 connections. Each is answered
    with a SOCKS5 error and closed (or just closed), none is granted; a well-formed request whose address is
    noise is a leg like any other. The proxy still links the next two legs."""
    digest = socks5.dst_addr("sid-3", "a@helsenett.test/gw1", "b@helsenett.test/gw1")
    request = b"\x05\x01\x00\x03\x28" + digest + b"\x00\x00"
    hostile = [
        b"\x05\x00",  # no methods
        b"\x05\x01\x02",  # username/password only
        b"\x05\x01\x00" + request[:20],  # pipelined, request cut short
        b"\x05\x01\x00" + request + b"x" * 5000,  # a request with more after it
        b"\x05\x01\x00\x05\x01\x00\x03\x28" + b"\x1b[2J\x00\x07" * 5 + b"\x00\x00",  # control characters as the address
        b"\x05\x01\x00\x05\x01\x00\x03\x29" + b"\xff" * 41 + b"\x00\x00",  # not UTF-8, one byte over
        os.urandom(1 << 20),
    ] + [b"\x04\x01\x00\x50"] * 1000  # SOCKS4, repeated
    with running(tmp_path, variant=True) as server:
        for payload in hostile:
            with socket.create_connection(("127.0.0.1", server.proxy_port), timeout=30) as sock:
                with contextlib.suppress(OSError):
                    sock.sendall(payload)
                answer = b""
                with contextlib.suppress(OSError):
                    while piece := sock.recv(4096):  # the proxy closes: the loop ends (60 s at most per read)
                        answer += piece
                assert answer[:2] in (b"", b"\x05\x00", b"\x05\xff"), (payload[:16], answer[:16])
                assert b"\x05\x00\x00\x03" not in answer, (payload[:16], answer[:16])  # never a CONNECT granted
        odd = b"\xff\xfe" * 20  # any 40 bytes are an address (the proxy cannot tell a hash from noise): a leg
        for _ in range(3):  # opened and closed again leaves nothing behind
            socks5.connect_blocking("127.0.0.1", server.proxy_port, odd, pipelined=True).close()
        first = socks5.connect_blocking("127.0.0.1", server.proxy_port, digest, pipelined=True)
        second = socks5.connect_blocking("127.0.0.1", server.proxy_port, digest)
        with first, second:
            first.sendall(b"still serving")
            assert _read_exactly(second, 13) == b"still serving"
