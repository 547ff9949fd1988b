"""Association negotiation checks for the SCP (PS3.8 9.3.2, 9.3.4, 9.3.8), before anything is accepted.

``check_associate_rq(body)`` validates an A-ASSOCIATE-RQ: None when it may be answered, else the
A-ASSOCIATE-RJ (result, source, reason) and why (protocol version, AE titles that are not printable ASCII,
no presentation context); an item that overruns its parent, a role-selection item whose UID length
overruns it, non-ASCII UIDs, or anything pynetdicom's PDU codec (``pynetdicom.pdu.A_ASSOCIATE_RQ``) cannot
decode raises :class:`adapters.dicom_ul.ProtocolError`, answered with ``send_abort`` (A-ABORT).
"""

from __future__ import annotations

import socket
import struct

from adapters.dicom_ul import (
    ProtocolError,
)


def send_abort(sock: socket.socket) -> None:
    """A-ABORT (service provider, reason not specified), best effort (PS3.8 9.3.8)."""
    try:
        sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")
    except OSError:
        pass


def check_associate_rq(body: bytes | bytearray) -> tuple[tuple[int, int, int], str] | None:
    """Validate an A-ASSOCIATE-RQ (PS3.8 9.3.2): None when acceptable, else the A-ASSOCIATE-RJ (result,
    source, reason) and why. Items whose lengths do not fit, and anything pynetdicom's PDU codec cannot
    decode, raise :class:`ProtocolError` (A-ABORT)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    raw = bytes(body)
    if len(raw) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ shorter than its fixed fields")
    version = int.from_bytes(raw[0:2], "big")
    if version != 1:
        return (1, 2, 2), f"protocol version {version} (only 1 is supported)"
    called, calling = raw[4:20], raw[20:36]
    if any(b < 0x20 or b > 0x7E for b in called) or not called.strip():
        return (1, 1, 7), "called AE title is not printable ASCII"
    if any(b < 0x20 or b > 0x7E for b in calling) or not calling.strip():
        return (1, 1, 3), "calling AE title is not printable ASCII"
    _check_items(raw, 68, nested=(0x20, 0x50))
    try:
        request = A_ASSOCIATE_RQ()
        request.decode(b"\x01\x00" + len(raw).to_bytes(4, "big") + raw)
        contexts = request.presentation_context
    except Exception as exc:  # pynetdicom raises anything from struct.error to ValueError on bad items
        raise ProtocolError(f"malformed A-ASSOCIATE-RQ: {type(exc).__name__}") from exc
    if not contexts:
        return (1, 1, 1), "no presentation context proposed"
    return None


def _check_items(raw: bytes, pos: int, nested: tuple[int, ...] = ()) -> None:
    """Every item (type, reserved, 16-bit length) ends inside its parent; UIDs and names are ASCII; a role
    selection sub-item's UID length fits it (PS3.7 D.3.3.4)."""
    end = len(raw)
    while pos < end:
        if pos + 4 > end:
            raise ProtocolError("A-ASSOCIATE-RQ ends inside an item header")
        item_type, _r, length = struct.unpack_from(">BBH", raw, pos)
        payload = raw[pos + 4 : pos + 4 + length]
        if len(payload) != length:
            raise ProtocolError(f"item 0x{item_type:02X} of {length} bytes runs past the PDU")
        if item_type == 0x20:
            _check_items(payload, 4)
        elif item_type == 0x50:
            _check_items(payload, 0)
        elif item_type == 0x54:
            if length < 4 or 2 + struct.unpack_from(">H", payload)[0] + 2 != length:
                raise ProtocolError("role selection item's UID length overruns it")
        elif item_type in (0x10, 0x30, 0x40, 0x52, 0x55) and any(b > 0x7E for b in payload):
            raise ProtocolError(f"item 0x{item_type:02X} is not ASCII")
        pos += 4 + length
