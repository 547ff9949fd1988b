"""A SOCKS5 client for XEP-0065 (RFC 1928 CONNECT with the domain-name address type, no authentication).

The destination address is SHA1(SID + initiator full JID + target full JID) in lower-case hex (XEP-0065
section 5.3.2); the port is 0. Both parties connect to the proxy this way; the initiator then activates.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket


class Socks5Error(ConnectionError):
    pass


def dst_addr(sid: str, initiator: str, target: str) -> bytes:
    return hashlib.sha1(f"{sid}{initiator}{target}".encode()).hexdigest().encode("ascii")


async def connect(host: str, port: int, digest: bytes, timeout_s: float = 10.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), timeout_s)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        writer.write(b"\x05\x01\x00")
        if await asyncio.wait_for(reader.readexactly(2), timeout_s) != b"\x05\x00":
            raise Socks5Error("proxy refused the no-authentication method")
        writer.write(b"\x05\x01\x00\x03" + bytes([len(digest)]) + digest + b"\x00\x00")
        reply = await asyncio.wait_for(reader.readexactly(5), timeout_s)
        if reply[1] != 0:
            raise Socks5Error(f"proxy answered CONNECT with status {reply[1]}")
        await asyncio.wait_for(reader.readexactly(reply[4] + 2), timeout_s)
    except (asyncio.IncompleteReadError, TimeoutError, OSError) as exc:
        writer.close()
        raise Socks5Error(f"SOCKS5 negotiation with {host}:{port} failed: {exc}") from exc
    except Socks5Error:
        writer.close()
        raise
    return reader, writer
