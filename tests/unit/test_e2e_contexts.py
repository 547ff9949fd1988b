"""The end-to-end TLS contexts are made once per identity (and peer certificate) and reused by every transfer;
a rotated identity (a new certificate and key at the same paths) gets a context of its own, which presents
the new certificate in a real handshake."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from adapters.xmpp.e2e import (
    client_context,
    ensure_identity,
    rotate_identity,
    server_context,
)


def _handshake(client_ctx, server_ctx) -> tuple[bytes, bytes]:
    """(the certificate the server saw, the one the client saw) after a TLS 1.3 handshake on a socket pair."""
    left, right = socket.socketpair()
    seen: dict[str, bytes] = {}

    def serve() -> None:
        with server_ctx.wrap_socket(right, server_side=True) as tls:
            seen["by_server"] = tls.getpeercert(binary_form=True)
            tls.recv(1)

    thread = threading.Thread(target=serve)
    thread.start()
    with client_ctx.wrap_socket(left) as tls:
        seen["by_client"] = tls.getpeercert(binary_form=True)
        tls.sendall(b"x")
    thread.join(30)
    return seen["by_server"], seen["by_client"]


def test_contexts_are_made_once_per_identity_and_a_rotated_identity_presents_its_new_certificate(tmp_path: Path) -> None:
    sender, _ = ensure_identity(tmp_path / "a" / "gateway.key", tmp_path / "a" / "gateway.crt", "a")
    receiver, _ = ensure_identity(tmp_path / "b" / "gateway.key", tmp_path / "b" / "gateway.crt", "b")
    other, _ = ensure_identity(tmp_path / "c" / "gateway.key", tmp_path / "c" / "gateway.crt", "c")
    assert client_context(sender) is client_context(sender)
    assert server_context(receiver, sender.cert_der) is server_context(receiver, sender.cert_der)
    assert server_context(receiver, other.cert_der) is not server_context(receiver, sender.cert_der)
    by_server, by_client = _handshake(client_context(sender), server_context(receiver, sender.cert_der))
    assert (by_server, by_client) == (sender.cert_der, receiver.cert_der)

    rotated, old = rotate_identity(sender.key_path, sender.cert_path, "a", overlap_s=3600)
    new = rotated.current
    assert old == sender.fingerprint and new.cert_der != sender.cert_der and new.key_path == sender.key_path
    assert client_context(new) is not client_context(sender)
    by_server, _ = _handshake(client_context(new), server_context(receiver, new.cert_der))
    assert by_server == new.cert_der
    previous = rotated.previous  # the old pair, moved aside: its context presents the old certificate still
    assert previous is not None and previous.cert_der == sender.cert_der
    by_server, _ = _handshake(client_context(previous), server_context(receiver, sender.cert_der))
    assert by_server == sender.cert_der
