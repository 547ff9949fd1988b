"""A small DICOM Upper Layer association *requestor* (PS3.8) and DIMSE command codec (PS3.7), for the SCU side.

Why not pynetdicom here: as an SCU it builds and dispatches every PDU through Python state-machine threads
that poll with sleeps; into Orthanc (16 KiB maximum PDU) it needed 6-7x storescu's time for the same study
(../shared/reference/dicom-notes.md). This module does what an import needs and nothing more:

- ``Association.open`` sends A-ASSOCIATE-RQ (PS3.8 9.3.2) with the proposed presentation contexts, the
  maximum PDU length we receive, our implementation class UID and optional SCP/SCU role selection
  (PS3.7 D.3.3.4), and parses A-ASSOCIATE-AC / -RJ (9.3.3, 9.3.4). A rejection raises
  :class:`AssociationRejected` with the result, source and reason named as in PS3.8 Table 9-21.
- ``send_message`` fragments a command and an optional data set into P-DATA-TF PDUs no longer than the
  peer's maximum (PS3.8 9.3.5, Annex E), many PDUs per ``sendmsg`` call; a data set can come from a file
  (``FileSlice``) without being loaded whole.
- ``receive_message`` reassembles the next DIMSE message. A-ABORT raises :class:`AssociationAborted`; a
  silent peer raises ``TimeoutError`` after ``timeout_s``.
- ``release`` sends A-RELEASE-RQ and waits for the RP; ``abort`` sends A-ABORT. Sockets have TCP_NODELAY
  (Nagle would add a delayed-ACK wait to every response).

Commands are always Implicit VR Little Endian (PS3.7 6.3.1): ``encode_command`` / ``Command``.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "2.25.313241301083327634084309645927164654318"
IMPLEMENTATION_VERSION = "DICOMGW_1"
DEFAULT_MAX_RECEIVE_PDU = 1 << 20
_UNLIMITED_SEND_PDU = 1 << 20  # the peer said 0 (no limit): we still fragment, in 1 MiB PDUs
_PDUS_PER_SENDMSG = 64
MIN_PDV_PAYLOAD_BYTES = 16  # a fragment smaller than this is refused (see Association._room)
MAX_FRAGMENTS = 1 << 22  # PDUs one message may take (4 Mi: a 64 GiB data set in 16 KiB PDUs)

# PS3.8 Table 9-21 (A-ASSOCIATE-RJ) and 9-18 (presentation context results)
_RJ_SOURCE = {1: "service user", 2: "service provider (ACSE)", 3: "service provider (presentation)"}
_RJ_REASON = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}
CONTEXT_RESULTS = {
    0: "acceptance",
    1: "user-rejection",
    2: "no-reason (provider rejection)",
    3: "abstract syntax not supported",
    4: "transfer syntaxes not supported",
}


class AssociationRejected(ConnectionError):
    def __init__(self, result: int, source: int, reason: int) -> None:
        self.permanent = result == 1
        self.result, self.source, self.reason = result, source, reason
        text = _RJ_REASON.get((source, reason), f"reason {reason}")
        kind = "permanently" if result == 1 else "transiently"
        super().__init__(f"association rejected {kind} by the {_RJ_SOURCE.get(source, f'source {source}')}: {text}")


class AssociationAborted(ConnectionError):
    """The peer sent A-ABORT or closed the connection."""


class DimseRefusal(ValueError):
    """A request answered with a DIMSE failure status (``status``) and the reason (Error Comment): the
    association goes on."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


class ProtocolError(AssociationAborted):
    """The peer broke PS3.8 framing (a PDV past its PDU, a PDU over the announced maximum, a malformed
    association request): the association is aborted (A-ABORT) and nothing of the message is kept."""


@dataclass
class PresentationContext:
    id: int
    abstract_syntax: str
    proposed: tuple[str, ...]
    result: int = -1
    transfer_syntax: str = ""

    @property
    def accepted(self) -> bool:
        return self.result == 0


@dataclass(frozen=True)
class FileSlice:
    """``length`` bytes of the open file ``fd`` from ``offset``: a data set sent without loading it whole."""

    fd: int
    offset: int
    length: int


# -- DIMSE command sets (Implicit VR Little Endian) -----------------------------------------------
US, UL, UI, AT, LO = "US", "UL", "UI", "AT", "LO"


def encode_command(elements: Sequence[tuple[int, str, object]]) -> bytes:
    """Encode (tag, VR, value) command elements, sorted, behind (0000,0000) Command Group Length."""
    body = bytearray()
    for tag, vr, value in sorted(elements, key=lambda e: e[0]):
        if vr == US:
            raw = struct.pack("<H", int(value))  # type: ignore[call-overload]
        elif vr == UL:
            raw = struct.pack("<I", int(value))  # type: ignore[call-overload]
        else:
            raw = str(value).encode("ascii")
            if len(raw) % 2:
                raw += b"\x00" if vr == UI else b" "
        body += struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(raw)) + raw
    return struct.pack("<HHII", 0, 0, 4, len(body)) + bytes(body)


@dataclass(frozen=True)
class Command:
    """A received command set: raw values by tag, with typed getters."""

    values: dict[int, bytes]

    @classmethod
    def decode(cls, data: bytes) -> Command:
        """Implicit VR little endian group 0000 (PS3.7 6.3.1); raises :class:`ProtocolError` when an element
        runs past the end, bytes are left over, or an element is not in group 0000."""
        values: dict[int, bytes] = {}
        pos = 0
        while pos + 8 <= len(data):
            group, element, length = struct.unpack_from("<HHI", data, pos)
            if group != 0x0000 or pos + 8 + length > len(data):
                raise ProtocolError(f"malformed command set at byte {pos}")
            values[(group << 16) | element] = data[pos + 8 : pos + 8 + length]
            pos += 8 + length
        if pos != len(data):
            raise ProtocolError("command set ends inside an element header")
        return cls(values)

    def us(self, tag: int, default: int = -1) -> int:
        raw = self.values.get(tag)
        return struct.unpack("<H", raw[:2])[0] if raw and len(raw) >= 2 else default

    def text(self, tag: int) -> str:
        return self.values.get(tag, b"").decode("ascii", "replace").rstrip(" \x00")

    @property
    def command_field(self) -> int:
        return self.us(0x00000100)

    @property
    def has_dataset(self) -> bool:
        return self.us(0x00000800, 0x0101) != 0x0101


# -- PDUs ------------------------------------------------------------------------------------------
def _ae(title: str) -> bytes:
    return title.encode("ascii")[:16].ljust(16, b" ")


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _associate_rq(calling_ae: str, called_ae: str, contexts: Sequence[PresentationContext], max_receive_pdu: int,
                  roles: dict[str, tuple[bool, bool]]) -> bytes:
    items = bytearray(_item(0x10, APPLICATION_CONTEXT.encode()))
    for ctx in contexts:
        sub = _item(0x30, ctx.abstract_syntax.encode()) + b"".join(_item(0x40, ts.encode()) for ts in ctx.proposed)
        items += _item(0x20, struct.pack(">BBBB", ctx.id, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">I", max_receive_pdu)) + _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
    for uid, (scu, scp) in roles.items():
        raw = uid.encode()
        user += _item(0x54, struct.pack(">H", len(raw)) + raw + bytes((int(scu), int(scp))))
    user += _item(0x55, IMPLEMENTATION_VERSION.encode())
    items += _item(0x50, user)
    body = struct.pack(">HH", 1, 0) + _ae(called_ae) + _ae(calling_ae) + b"\x00" * 32 + bytes(items)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


@dataclass
class Association:
    sock: socket.socket
    contexts: dict[int, PresentationContext]
    max_send_pdu: int
    timeout_s: float
    _released: bool = field(default=False)

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        calling_ae: str,
        called_ae: str,
        proposals: Iterable[tuple[str, Sequence[str]]],
        timeout_s: float = 30.0,
        max_receive_pdu: int = DEFAULT_MAX_RECEIVE_PDU,
        roles: dict[str, tuple[bool, bool]] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Association:
        """Connect (over TLS with ``tls``) and negotiate; raises ``OSError`` (no connection, TLS refused),
        :class:`AssociationRejected`, ..."""
        contexts = [PresentationContext(2 * i + 1, abstract, tuple(syntaxes)) for i, (abstract, syntaxes) in enumerate(proposals)]
        if not 0 < len(contexts) <= 128:
            raise ValueError(f"{len(contexts)} presentation contexts: PS3.8 allows 1..128")
        sock = socket.create_connection((host, port), timeout=timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host if tls.check_hostname else None)
            sock.sendall(_associate_rq(calling_ae, called_ae, contexts, max_receive_pdu, roles or {}))
            pdu_type, body = _read_pdu(sock)
            if pdu_type == 0x03:
                raise AssociationRejected(body[1], body[2], body[3])
            if pdu_type == 0x07:
                raise AssociationAborted("peer aborted the association request")
            if pdu_type != 0x02:
                raise AssociationAborted(f"unexpected PDU type 0x{pdu_type:02X} in answer to A-ASSOCIATE-RQ")
            by_id = {c.id: c for c in contexts}
            max_send = _parse_associate_ac(body, by_id)
        except BaseException:
            sock.close()
            raise
        return cls(sock, by_id, max_send or _UNLIMITED_SEND_PDU, timeout_s)

    def context_for(self, abstract_syntax: str, transfer_syntax: str) -> int | None:
        for ctx in self.contexts.values():
            if ctx.accepted and ctx.abstract_syntax == abstract_syntax and ctx.transfer_syntax == transfer_syntax:
                return ctx.id
        return None

    def send_message(self, context_id: int, command: bytes, dataset: bytes | FileSlice | None = None) -> None:
        self._send_fragments(context_id, 0x01, memoryview(command))
        if isinstance(dataset, FileSlice):
            self._send_file(context_id, dataset)
        elif dataset is not None:
            self._send_fragments(context_id, 0x00, memoryview(dataset))

    def _room(self, length: int) -> int:
        """Payload bytes per PDV: the peer's maximum less the PDV item header. A maximum too small for a
        useful fragment, or a message that would take more than ``MAX_FRAGMENTS`` PDUs, is a
        :class:`ProtocolError` (a requestor announcing 6 bytes would otherwise get empty PDUs without end)."""
        room = self.max_send_pdu - 6  # PDV item: 4-byte length, context id, control header
        if room < MIN_PDV_PAYLOAD_BYTES or length // room >= MAX_FRAGMENTS:
            raise ProtocolError(f"the peer's maximum PDU length {self.max_send_pdu} is too small for a {length}-byte message")
        return room

    def _send_fragments(self, context_id: int, control: int, data: memoryview, last: bool = True) -> None:
        room = self._room(len(data))
        buffers: list[bytes | memoryview] = []
        pos = 0
        while True:
            piece = data[pos : pos + room]
            pos += len(piece)
            final = pos >= len(data)
            flags = control | (0x02 if last and final else 0)
            buffers.append(struct.pack(">BBIIBB", 0x04, 0, len(piece) + 6, len(piece) + 2, context_id, flags))
            buffers.append(piece)
            if final:
                break
            if len(buffers) >= 2 * _PDUS_PER_SENDMSG:
                self._sendmsg(buffers)
                buffers = []
        if buffers:
            self._sendmsg(buffers)

    def _send_file(self, context_id: int, part: FileSlice) -> None:
        room = self._room(part.length)
        block = max(room, (1 << 20) // room * room)
        done = 0
        while done < part.length:
            size = min(block, part.length - done)
            data = os.pread(part.fd, size, part.offset + done)
            if len(data) != size:
                raise OSError(f"file shorter than expected at offset {part.offset + done}")
            done += size
            self._send_fragments(context_id, 0x00, memoryview(data), last=done >= part.length)

    def _sendmsg(self, buffers: list[bytes | memoryview]) -> None:
        total = sum(len(b) for b in buffers)
        if isinstance(self.sock, ssl.SSLSocket):  # no sendmsg on TLS: one write of the joined buffers
            self.sock.sendall(b"".join(buffers))
            return
        sent = self.sock.sendmsg(buffers)
        if sent < total:  # partial write: finish with sendall on the rest
            self.sock.sendall(b"".join(bytes(b) for b in buffers)[sent:])

    def receive_message(self) -> tuple[int, Command, bytes | None]:
        """The next complete DIMSE message: (context id, command, data set bytes or None)."""
        command = bytearray()
        dataset = bytearray()
        command_done = False
        context_id = 0
        while True:
            _quick_ack(self.sock)
            pdu_type, body = _read_pdu(self.sock)
            if pdu_type == 0x07:
                raise AssociationAborted(f"peer aborted the association (source {body[2]}, reason {body[3]})")
            if pdu_type != 0x04:
                raise AssociationAborted(f"unexpected PDU type 0x{pdu_type:02X} while waiting for a response")
            pos = 0
            while pos + 6 <= len(body):
                length, context_id, flags = struct.unpack_from(">IBB", body, pos)
                fragment = body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if flags & 0x01:
                    command += fragment
                    if flags & 0x02:
                        command_done = True
                        parsed = Command.decode(bytes(command))
                        if not parsed.has_dataset:
                            return context_id, parsed, None
                else:
                    dataset += fragment
                    if flags & 0x02 and command_done:
                        return context_id, Command.decode(bytes(command)), bytes(dataset)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            self.sock.sendall(struct.pack(">BBII", 0x05, 0, 4, 0))
            pdu_type, _body = _read_pdu(self.sock)
            if pdu_type != 0x06:
                raise AssociationAborted(f"expected A-RELEASE-RP, got PDU type 0x{pdu_type:02X}")
        except (OSError, AssociationAborted):
            pass  # the peer went away first: nothing left to release
        finally:
            self.sock.close()

    def abort(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            self.sock.sendall(struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0, 0))
        except OSError:
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> Association:
        return self

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        if exc_type is None:
            self.release()
        else:
            self.abort()


# -- acceptor side ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AssociateRequest:
    """An A-ASSOCIATE-RQ as the acceptor sees it (PS3.8 9.3.2)."""

    calling_ae: str
    called_ae: str
    max_pdu: int  # the requestor's maximum receive length (0 = unlimited)
    contexts: tuple[tuple[int, str, tuple[str, ...]], ...]  # (id, abstract syntax, proposed transfer syntaxes)
    roles: dict[str, tuple[bool, bool]]  # abstract syntax -> (SCU role, SCP role) the requestor proposes


def associate_ac(request: AssociateRequest, results: Sequence[tuple[int, int, str]], max_receive_pdu: int,
                 roles: dict[str, tuple[bool, bool]] | None = None) -> bytes:
    """A-ASSOCIATE-AC with (context id, result, transfer syntax) per proposed context (PS3.8 9.3.3)."""
    items = bytearray(_item(0x10, APPLICATION_CONTEXT.encode()))
    for context_id, result, syntax in results:
        items += _item(0x21, struct.pack(">BBBB", context_id, 0, result, 0) + _item(0x40, syntax.encode()))
    user = _item(0x51, struct.pack(">I", max_receive_pdu)) + _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
    for uid, (scu, scp) in (roles or {}).items():
        raw = uid.encode()
        user += _item(0x54, struct.pack(">H", len(raw)) + raw + bytes((int(scu), int(scp))))
    user += _item(0x55, IMPLEMENTATION_VERSION.encode())
    items += _item(0x50, user)
    body = struct.pack(">HH", 1, 0) + _ae(request.called_ae) + _ae(request.calling_ae) + b"\x00" * 32 + bytes(items)
    return struct.pack(">BBI", 0x02, 0, len(body)) + body


def associate_rj(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBIBBBB", 0x03, 0, 4, 0, result, source, reason)


RELEASE_RP = struct.pack(">BBII", 0x06, 0, 4, 0)


def iter_pdvs(body: bytes | bytearray) -> Iterator[tuple[int, int, memoryview]]:
    """(context id, message control header, fragment) of each PDV item in a P-DATA-TF body (PS3.8 9.3.5.1);
    a PDV shorter than its header, longer than what is left of the PDU, or trailing bytes raise
    :class:`ProtocolError` before anything of the bad item is yielded."""
    view = memoryview(body)
    pos = 0
    if len(body) < 6:
        raise ProtocolError("P-DATA-TF without a PDV item")
    while pos < len(body):
        if pos + 6 > len(body):
            raise ProtocolError("P-DATA-TF ends inside a PDV header")
        length, context_id, flags = struct.unpack_from(">IBB", body, pos)
        if length < 2 or pos + 4 + length > len(body):
            raise ProtocolError(f"PDV of {length} bytes does not fit its PDU")
        if flags & 0xFC:
            raise ProtocolError(f"PDV message control header 0x{flags:02X} has reserved bits set")
        yield context_id, flags, view[pos + 6 : pos + 4 + length]
        pos += 4 + length


def _quick_ack(sock: socket.socket) -> None:
    """Acknowledge what arrives at once (Linux TCP_QUICKACK; the kernel drops it again by itself, so it is
    set before every read). A peer with Nagle's algorithm on (Debian's dcmtk, and so Orthanc, unless
    TCP_NODELAY=1 is in its environment) sends the second segment of a response only once the first is
    acknowledged: with our delayed ACK that is a 40 ms stall per C-STORE."""
    if hasattr(socket, "TCP_QUICKACK"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass


MAX_CONTROL_PDU_BYTES = 64 * 1024  # A-ASSOCIATE-RQ/AC/RJ, release, abort: far larger than any real one
PDU_LIMITS = {0x01: MAX_CONTROL_PDU_BYTES, 0x02: MAX_CONTROL_PDU_BYTES, 0x03: 4, 0x05: 4, 0x06: 4, 0x07: 4}


def read_pdu(sock: socket.socket, max_data_bytes: int = 64 * 1024 * 1024, deadline: float | None = None) -> tuple[int, bytearray]:
    """The next PDU: (type, body). Bounded before anything is allocated: a P-DATA-TF body over
    ``max_data_bytes`` (what we announced), another PDU over its sane size, or an unknown PDU type raise
    :class:`ProtocolError`. With ``deadline`` (``time.monotonic()``) the whole PDU must arrive by then,
    however slowly its bytes trickle in (ARTIM-like: a deadline per PDU, not per read)."""
    if deadline is None:
        return _read_pdu(sock, max_data_bytes)
    previous = sock.gettimeout()
    try:
        header = _read_exact(sock, 6, deadline)
        pdu_type, _reserved, length = struct.unpack(">BBI", header)
        _check_length(pdu_type, length, max_data_bytes)
        return pdu_type, _read_exact(sock, length, deadline)
    finally:
        sock.settimeout(previous)


def _check_length(pdu_type: int, length: int, max_data_bytes: int) -> None:
    limit = max_data_bytes if pdu_type == 0x04 else PDU_LIMITS.get(pdu_type)
    if limit is None:
        raise ProtocolError(f"unknown PDU type 0x{pdu_type:02X}")
    if length > limit:
        raise ProtocolError(f"PDU type 0x{pdu_type:02X} of {length} bytes announced (at most {limit})")


def _read_exact(sock: socket.socket, size: int, deadline: float | None = None) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{got} of {size} bytes of a PDU by the deadline")
            sock.settimeout(left)
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise AssociationAborted("the peer closed the connection")
        got += n
    return buf


def _read_pdu(sock: socket.socket, max_data_bytes: int = 64 * 1024 * 1024) -> tuple[int, bytearray]:
    header = _read_exact(sock, 6)
    pdu_type, _reserved, length = struct.unpack(">BBI", header)
    _check_length(pdu_type, length, max_data_bytes)
    return pdu_type, _read_exact(sock, length)


def _parse_associate_ac(body: bytearray, contexts: dict[int, PresentationContext]) -> int:
    """Fill in each context's result and syntax; return the peer's maximum PDU length (0 = unlimited)."""
    pos = 68  # protocol version, reserved, called/calling AE, 32 reserved bytes
    max_pdu = 0
    while pos + 4 <= len(body):
        item_type, _r, length = struct.unpack_from(">BBH", body, pos)
        payload = body[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if item_type == 0x21 and len(payload) >= 4:
            ctx = contexts.get(payload[0])
            if ctx is None:
                continue
            ctx.result = payload[2]
            sub = 4
            while sub + 4 <= len(payload):
                sub_type, _r2, sub_length = struct.unpack_from(">BBH", payload, sub)
                if sub_type == 0x40:
                    ctx.transfer_syntax = bytes(payload[sub + 4 : sub + 4 + sub_length]).decode("ascii").rstrip("\x00 ")
                sub += 4 + sub_length
        elif item_type == 0x50:
            sub = 0
            while sub + 4 <= len(payload):
                sub_type, _r2, sub_length = struct.unpack_from(">BBH", payload, sub)
                if sub_type == 0x51 and sub_length == 4:
                    max_pdu = struct.unpack_from(">I", payload, sub + 4)[0]
                sub += 4 + sub_length
    return max_pdu
