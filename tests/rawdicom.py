"""A DICOM upper-layer client that builds its PDUs byte by byte from PS3.8 (independent of the code under
test), for the hostile-input tests: it can say exactly what a conformant peer would not."""

from __future__ import annotations

import socket
import struct
import time

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
APP_CONTEXT = "1.2.840.10008.3.1.1.1"


def item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def uid(text: str) -> bytes:
    raw = text.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def associate_rq(called: bytes = b"DICOMGW", calling: bytes = b"STORESCU", contexts: list[tuple[int, str]] | None = None,
                 version: int = 1, max_pdu: int = 16384, user_extra: bytes = b"") -> bytes:
    contexts = [(1, CT_STORAGE), (3, VERIFICATION)] if contexts is None else contexts
    body = struct.pack(">HH", version, 0) + called.ljust(16) + calling.ljust(16) + b"\0" * 32
    body += item(0x10, APP_CONTEXT.encode())
    for context_id, abstract in contexts:
        body += item(0x20, bytes([context_id, 0, 0, 0]) + item(0x30, abstract.encode()) + item(0x40, IMPLICIT_LE.encode()))
    body += item(0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.3.4") + user_extra)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def pdata(*pdvs: tuple[int, int, bytes]) -> bytes:
    body = b"".join(struct.pack(">IBB", len(data) + 2, ctx, flags) + data for ctx, flags, data in pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def command(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return element(0x00000000, struct.pack("<I", len(body))) + body


def c_store_rq(sop_class: str, sop_instance: str | None, message_id: int | None = 1) -> bytes:
    parts = [element(0x00000002, uid(sop_class)), element(0x00000100, struct.pack("<H", 0x0001))]
    if message_id is not None:
        parts.append(element(0x00000110, struct.pack("<H", message_id)))
    parts += [element(0x00000700, struct.pack("<H", 0)), element(0x00000800, struct.pack("<H", 0x0000))]
    if sop_instance is not None:
        parts.append(element(0x00001000, uid(sop_instance)))
    return command(*parts)


def c_echo_rq(message_id: int = 7) -> bytes:
    return command(element(0x00000002, uid(VERIFICATION)), element(0x00000100, struct.pack("<H", 0x0030)),
                   element(0x00000110, struct.pack("<H", message_id)), element(0x00000800, struct.pack("<H", 0x0101)))


def dataset(sop_class: str, sop_instance: str, study: str = "1.2.3.9", pixel_bytes: int = 64) -> bytes:
    """An implicit VR little endian data set with the attributes a gateway needs, ending in pixel data."""
    parts = [
        element(0x00080016, uid(sop_class)), element(0x00080018, uid(sop_instance)), element(0x00080060, b"CT"),
        element(0x00100010, b"HOSTILE^TEST"), element(0x00100020, b"H1"), element(0x0020000D, uid(study)),
        element(0x0020000E, uid(study + ".1")), element(0x00200013, b"1 "),
        element(0x7FE00010, b"\0" * pixel_bytes),
    ]
    return b"".join(parts)


class RawPeer:
    """One TCP connection; ``reply()`` reads one whole PDU (type, body) or None when the SCP closed it."""

    def __init__(self, port: int, timeout_s: float = 10.0, source: str = "") -> None:
        """``source``: a loopback address to connect from (127.0.0.2: a stranger, not the modality at 127.0.0.1)."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s,
                                             source_address=(source, 0) if source else None)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, bytes] | None:
        header = self._exact(6)
        if header is None:
            return None
        pdu_type, _r, length = struct.unpack(">BBI", header)
        body = self._exact(length)
        return (pdu_type, body or b"") if body is not None or length == 0 else None

    def _exact(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            try:
                piece = self.sock.recv(size - len(data))
            except (ConnectionResetError, TimeoutError):
                return None
            if not piece:
                return None
            data += piece
        return data

    def associate(self, **options: object) -> None:
        self.send(associate_rq(**options))  # type: ignore[arg-type]
        answer = self.reply()
        assert answer is not None and answer[0] == 0x02, f"expected A-ASSOCIATE-AC, got {answer}"

    def closed_within(self, seconds: float) -> bool:
        """True when the SCP closes (or aborts) the connection within ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            if not data:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def status_of(pdata_body: bytes) -> int:
    """The Status (0000,0900) of the command set in a P-DATA-TF body (one PDV)."""
    data = pdata_body[6:]
    pos = 0
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        if (group, elem) == (0x0000, 0x0900):
            return int(struct.unpack_from("<H", data, pos + 8)[0])
        pos += 8 + length
    raise AssertionError("no status in the response")
