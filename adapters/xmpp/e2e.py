"""The end-to-end channel between two gateways: mutual TLS 1.3 inside the bytestream (XEP-0065 or XEP-0047).

The XMPP server and its SOCKS5 proxy route bytes; they are a third party and never see a study. So the
bundle (manifest and instances) travels inside a TLS 1.3 session whose two ends are the gateways:

- Identity: each gateway has an EC P-256 key (file mode 0600) and a self-signed certificate
  (:func:`ensure_identity`); its fingerprint is the SHA-256 of the certificate's DER (``gateway.pins``).
- Roles: the offer's receiver is the TLS server, the sender the client. The offer carries the sender's
  certificate (public). The receiver admits the offer only when that certificate's fingerprint is the
  pin it holds for the sender, and then requires exactly that certificate in the handshake
  (``CERT_REQUIRED`` with it as the only trust anchor: the handshake proves the sender holds its key).
  The sender checks the receiver's certificate against its own pin after the handshake and before the
  first byte of the bundle (:func:`check_pin`): a mismatch ends the attempt with :class:`PinMismatch`.
- TLS 1.3 only, no session tickets, no resumption: every attempt is a fresh session, and resume offsets
  (XEP-0096 ``<range offset>``) count plaintext bytes of the bundle, so a cut stream resumes exactly.
- Over S5B each end's blocking socket carries the session through memory BIOs (:class:`TlsSocket`: a
  megabyte of records per system call); over IBB a :class:`TlsPipe` (``ssl.MemoryBIO``/``SSLObject``)
  turns plaintext into the blocks' bytes and back, both directions on the same IBB session.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.pins import pin_set

CERT_DAYS = 3650


class PinMismatch(ssl.SSLError):
    """The peer's certificate is not the one pinned for it (or none is pinned)."""

    def __str__(self) -> str:  # OSError's own str of a one-argument SSLError is the tuple "('...',)"
        return str(self.args[0]) if self.args else "certificate does not match the pin"


@dataclass(frozen=True)
class Identity:
    key_path: Path
    cert_path: Path
    cert_der: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_der)


def fingerprint(cert_der: bytes) -> str:
    return hashlib.sha256(cert_der).hexdigest()


def ensure_identity(key_path: Path, cert_path: Path, common_name: str) -> tuple[Identity, bool]:
    """Load this gateway's identity, creating key and certificate when neither exists: (identity, created).
    A key file that others may read is refused (``PermissionError``), as is one half of a pair missing."""
    if key_path.exists() != cert_path.exists():
        missing = cert_path if key_path.exists() else key_path
        raise FileNotFoundError(f"identity incomplete: {missing} is missing (restore it, or remove both files to make a new identity)")
    created = False
    if not key_path.exists():
        _create(key_path, cert_path, common_name)
        created = True
    mode = key_path.stat().st_mode & 0o077
    if mode:
        raise PermissionError(f"{key_path} is readable by others (mode {key_path.stat().st_mode & 0o777:o}); chmod 600 it")
    return Identity(key_path, cert_path, ssl.PEM_cert_to_DER_cert(cert_path.read_text())), created


@dataclass(frozen=True)
class Identities:
    """This gateway's identity, and while a rotation runs (`dicomgw keys rotate`) the previous one, usable
    until ``previous_until``: a peer that still pins the old certificate is served with it (``choose``)."""

    current: Identity
    previous: Identity | None = None
    previous_until: datetime.datetime | None = None

    def all(self) -> tuple[Identity, ...]:
        return (self.current,) if self.previous is None else (self.current, self.previous)

    def by_fingerprint(self, fp: str) -> Identity | None:
        return next((i for i in self.all() if i.fingerprint == fp), None)

    def choose(self, expected: str) -> Identity:
        """The identity a peer pinning ``expected`` (comma-separated; "" = unknown) accepts: the current one
        when it does (or when nothing is known), else the previous one if it does."""
        try:
            pins = pin_set(expected)
        except ValueError:
            pins = ()
        if not pins or self.current.fingerprint in pins or self.previous is None:
            return self.current
        return self.previous if self.previous.fingerprint in pins else self.current


def previous_paths(key_path: Path, cert_path: Path) -> tuple[Path, Path, Path]:
    """Where the previous identity of a rotation lives: key, certificate, and its ``until`` (JSON)."""
    return (key_path.with_name(key_path.name + ".previous"), cert_path.with_name(cert_path.name + ".previous"),
            cert_path.with_name(cert_path.name + ".previous.json"))


def load_identities(key_path: Path, cert_path: Path, common_name: str,
                    now: datetime.datetime | None = None) -> tuple[Identities, bool, str | None]:
    """(identities, created, retired): the current identity (made on first use), the previous one while its
    overlap runs; a previous one whose overlap has ended is retired here (its key removed, its certificate
    kept as ``.retired``) and its fingerprint returned for the audit."""
    import json

    current, created = ensure_identity(key_path, cert_path, common_name)
    old_key, old_cert, meta = previous_paths(key_path, cert_path)
    if not (old_key.exists() and old_cert.exists()):
        return Identities(current), created, None
    try:
        until = datetime.datetime.fromisoformat(json.loads(meta.read_text())["until"])
    except (OSError, ValueError, KeyError, TypeError):
        until = datetime.datetime.min.replace(tzinfo=datetime.UTC)  # unreadable: retire it rather than keep it for ever
    previous = Identity(old_key, old_cert, ssl.PEM_cert_to_DER_cert(old_cert.read_text()))
    if (now or datetime.datetime.now(datetime.UTC)) < until:
        return Identities(current, previous, until), created, None
    old_key.unlink()
    old_cert.replace(old_cert.with_name(f"{cert_path.name}.retired-{previous.fingerprint[:12]}"))
    meta.unlink(missing_ok=True)
    return Identities(current), created, previous.fingerprint


def rotate_identity(key_path: Path, cert_path: Path, common_name: str, overlap_s: float,
                    now: datetime.datetime | None = None) -> tuple[Identities, str]:
    """A new key and certificate; the old pair stays usable for ``overlap_s`` (``load_identities``). Refused
    while an earlier rotation's overlap still runs. Returns (the identities, the old fingerprint)."""
    import json

    moment = now or datetime.datetime.now(datetime.UTC)
    identities, _created, _retired = load_identities(key_path, cert_path, common_name, moment)
    if identities.previous is not None:
        raise RuntimeError(f"a rotation is under way: the previous certificate SHA-256 {identities.previous.fingerprint} "
                           f"stays usable until {identities.previous_until:%Y-%m-%d %H:%M} UTC; rotate again after that")
    old_key, old_cert, meta = previous_paths(key_path, cert_path)
    until = moment + datetime.timedelta(seconds=overlap_s)
    os.replace(key_path, old_key)
    os.replace(cert_path, old_cert)
    meta.write_text(json.dumps({"until": until.isoformat(), "fingerprint": identities.current.fingerprint}))
    _create(key_path, cert_path, common_name)
    return load_identities(key_path, cert_path, common_name, moment)[0], identities.current.fingerprint


def _create(key_path: Path, cert_path: Path, common_name: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "dicomgw")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _base(purpose: int, identity: Identity) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(identity.cert_path, identity.key_path)
    return context


_CONTEXTS: dict[tuple[str, ...], ssl.SSLContext] = {}  # made once per identity (and peer certificate), ~0.6 ms each
_CONTEXTS_KEPT = 64


def _kept(key: tuple[str, ...], make: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """A context is configuration only (each connection has its own state): one per key serves every
    transfer; a rotated identity has another fingerprint, so another key."""
    context = _CONTEXTS.get(key)
    if context is None:
        if len(_CONTEXTS) >= _CONTEXTS_KEPT:
            _CONTEXTS.clear()
        context = _CONTEXTS[key] = make()
    return context


def server_context(identity: Identity, peer_cert_der: bytes) -> ssl.SSLContext:
    """The receiver's side: requires the client to present exactly ``peer_cert_der`` (checked against the
    pin before this is called)."""

    def make() -> ssl.SSLContext:
        context = _base(ssl.PROTOCOL_TLS_SERVER, identity)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=peer_cert_der)
        context.num_tickets = 0
        return context

    return _kept(("server", identity.fingerprint, str(identity.key_path), fingerprint(peer_cert_der)), make)


def client_context(identity: Identity) -> ssl.SSLContext:
    """The sender's side: presents our certificate; the server's is checked by :func:`check_pin`."""

    def make() -> ssl.SSLContext:
        context = _base(ssl.PROTOCOL_TLS_CLIENT, identity)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # no CA for self-signed gateway certificates: the pin decides
        return context

    return _kept(("client", identity.fingerprint, str(identity.key_path)), make)


def check_pin(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, pin: str, peer: str) -> None:
    """Raise :class:`PinMismatch` unless the peer's certificate has fingerprint ``pin``."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise PinMismatch(f"{peer} presented no certificate")
    seen = fingerprint(der)
    if seen not in pin_set(pin):
        raise PinMismatch(f"{peer}'s certificate SHA-256 {seen} does not match the pin {','.join(pin_set(pin)) or '(none)'}")


class TlsPipe:
    """TLS over a message transport (IBB blocks): ``feed`` ciphertext in, get plaintext out;
    ``outgoing()`` is what must be sent to the peer (handshake records, encrypted data)."""

    def __init__(self, context: ssl.SSLContext, server_side: bool) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self._in, self._out, server_side=server_side)
        self.handshaken = False

    def start(self) -> bytes:
        """The client's first flight (ClientHello)."""
        self._handshake()
        return self.outgoing()

    def _handshake(self) -> None:
        try:
            self.ssl.do_handshake()
            self.handshaken = True
        except ssl.SSLWantReadError:
            pass

    def feed(self, data: bytes) -> bytes:
        """Ciphertext from the peer; returns the plaintext it completes (raises ``ssl.SSLError`` on a bad
        record or a failed handshake)."""
        self._in.write(data)
        if not self.handshaken:
            self._handshake()
            if not self.handshaken:
                return b""
        plain = bytearray()
        while True:
            try:
                piece = self.ssl.read(1 << 20)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not piece:
                break
            plain += piece
        return bytes(plain)

    def encrypt(self, data: bytes | memoryview) -> bytes:
        self.ssl.write(data)
        return self.outgoing()

    def outgoing(self) -> bytes:
        return self._out.read()


class TlsSocket:
    """TLS on a blocking socket through memory BIOs, for the S5B pumps, so that the socket's idle limits
    hold: ``ssl.SSLSocket`` on a blocking socket retries a read or write that ``SO_RCVTIMEO`` /
    ``SO_SNDTIMEO`` ended (OpenSSL sees "want read/write"), so a sender or proxy that went quiet mid-stream,
    or a receiver that stopped reading, held the pump's thread for ever. Here the socket's own calls raise
    (``BlockingIOError``); a TCP end without close_notify reads as the end of the stream, as ``SSLSocket``
    with ``suppress_ragged_eofs``. Whole blocks of records go out in one ``sendall`` and up to
    ``RAW_READ_BYTES`` of records come in per ``recv_into`` (``SSLSocket``: a system call per 16 KiB record
    out, two per record in); 100 MB over loopback in a microbenchmark: 0.068 s against 0.078 (median of 8),
    no difference that ``bench/transfer`` could show. :meth:`shutdown` drops the TLS layer as
    ``SSLSocket.shutdown`` does (no close_notify); after it, :meth:`recv` reads the socket itself."""

    RAW_READ_BYTES = (1 << 20) + (64 << 10)

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_side: bool) -> None:
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self._in, self._out, server_side=server_side)
        self._raw = memoryview(bytearray(self.RAW_READ_BYTES))
        # Called with the count of each read of the socket itself (a rate floor that must also see a record
        # trickled in pieces: a 16 KiB record a byte at a time would otherwise be counted only when whole).
        self.on_pull: Callable[[int], object] | None = None

    def handshake(self) -> TlsSocket:
        """Run the handshake (a closed connection meanwhile raises ``ConnectionResetError``); returns self."""
        while True:
            try:
                self.ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._pull():
                    raise ConnectionResetError("the connection closed during the TLS handshake") from None
        self._flush()
        return self

    def _flush(self) -> None:
        pending = self._out.read()
        if pending:
            self.sock.sendall(pending)

    def _pull(self) -> int:
        count = self.sock.recv_into(self._raw)
        if count:
            self._in.write(self._raw[:count])
        if self.on_pull is not None:
            self.on_pull(count)
        return count

    def getpeercert(self, binary_form: bool = False) -> object:
        return self.ssl.getpeercert(binary_form)

    def sendall(self, data: bytes | memoryview) -> None:
        self.ssl.write(data)
        self._flush()

    def recv_into(self, view: memoryview, nbytes: int = 0) -> int:
        """Plaintext into ``view`` (one record's or less); 0 at the end of the stream."""
        while True:
            try:
                return self.ssl.read(nbytes or len(view), view)
            except ssl.SSLWantReadError:
                if not self._pull():
                    return 0
            except ssl.SSLZeroReturnError:
                return 0

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        self.sock.setsockopt(level, option, value)

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TlsSocket:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
