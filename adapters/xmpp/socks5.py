"""A SOCKS5 client for XEP-0065 (RFC 1928 CONNECT with the domain-name address type, no authentication).

The destination address is SHA1(SID + initiator full JID + target full JID) in lower-case hex (XEP-0065
section 5.3.2); the port is 0. Both parties connect to the proxy this way; the initiator then activates.
``connect`` gives asyncio streams (the sender writes with back-pressure); ``connect_blocking`` gives a plain
blocking socket for a receiver that reads on its own thread (``recv_into`` with MSG_WAITALL: one system
call per MiB instead of one event-loop turn per 4 KiB relay piece).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket


class Socks5Error(ConnectionError):
    pass


def dst_addr(sid: str, initiator: str, target: str) -> bytes:
    return hashlib.sha1(f"{sid}{initiator}{target}".encode()).hexdigest().encode("ascii")


METHODS = b"\x05\x01\x00"  # version 5, one method: no authentication


def _connect_request(digest: bytes) -> bytes:
    return b"\x05\x01\x00\x03" + bytes([len(digest)]) + digest + b"\x00\x00"


def connect_blocking(host: str, port: int, digest: bytes, timeout_s: float = 10.0, pipelined: bool = False) -> socket.socket:
    """The same negotiation on a blocking socket (call it from a worker thread). The socket comes back in
    blocking mode without a timeout; the caller sets its own idle limit. ``pipelined``: the greeting and the
    CONNECT request go in one packet (one round trip to the proxy instead of two), for a proxy that says it
    takes them so (the dicomgw proxy65 variant; Prosody's stock module closes such a connection)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise Socks5Error(f"SOCKS5 connection to {host}:{port} failed: {exc}") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(METHODS + _connect_request(digest) if pipelined else METHODS)
        if _recv_exactly(sock, 2) != b"\x05\x00":
            raise Socks5Error("proxy refused the no-authentication method")
        if not pipelined:
            sock.sendall(_connect_request(digest))
        reply = _recv_exactly(sock, 5)
        if reply[1] != 0:
            raise Socks5Error(f"proxy answered CONNECT with status {reply[1]}")
        _recv_exactly(sock, reply[4] + 2)
        sock.settimeout(None)
        return sock
    except Socks5Error:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise Socks5Error(f"SOCKS5 negotiation with {host}:{port} failed: {exc}") from exc


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        piece = sock.recv(count - len(data))
        if not piece:
            raise Socks5Error("proxy closed the connection during the SOCKS5 negotiation")
        data += piece
    return data


async def connect(host: str, port: int, digest: bytes, timeout_s: float = 10.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), timeout_s)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        writer.write(METHODS)
        if await asyncio.wait_for(reader.readexactly(2), timeout_s) != b"\x05\x00":
            raise Socks5Error("proxy refused the no-authentication method")
        writer.write(_connect_request(digest))
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
