"""The association request as the SCP reads it (PS3.8 9.3.2, 9.3.4, 9.3.8), before anything is accepted.

``decode_associate_rq(body)`` returns ``(request, None)`` for a request that may be answered, or
``(None, ((result, source, reason), why))`` for one to answer with A-ASSOCIATE-RJ (protocol version, AE
titles that are not printable ASCII, no presentation context). The items are decoded by pynetdicom's PDU
codec (``pynetdicom.pdu.A_ASSOCIATE_RQ``), after a walk of the item lengths; an item that overruns its
parent, a role-selection item whose UID length overruns it, non-ASCII UIDs, or anything the codec cannot
decode raises :class:`adapters.dicom_ul.ProtocolError`, answered with ``send_abort`` (A-ABORT).
"""

from __future__ import annotations

import socket
import struct

from adapters.dicom_ul import AssociateRequest, ProtocolError


def send_abort(sock: socket.socket) -> None:
    """A-ABORT (service provider, reason not specified), best effort (PS3.8 9.3.8)."""
    try:
        sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")
    except OSError:
        pass


Rejection = tuple[tuple[int, int, int], str]


def check_associate_rq(body: bytes | bytearray) -> Rejection | None:
    """None when the request may be answered, else the A-ASSOCIATE-RJ and why (see the module)."""
    return decode_associate_rq(body)[1]


def decode_associate_rq(body: bytes | bytearray) -> tuple[AssociateRequest | None, Rejection | None]:
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    raw = bytes(body)
    if len(raw) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ shorter than its fixed fields")
    version = int.from_bytes(raw[0:2], "big")
    if version != 1:
        return None, ((1, 2, 2), f"protocol version {version} (only 1 is supported)")
    called, calling = raw[4:20], raw[20:36]
    if any(b < 0x20 or b > 0x7E for b in called) or not called.strip():
        return None, ((1, 1, 7), "called AE title is not printable ASCII")
    if any(b < 0x20 or b > 0x7E for b in calling) or not calling.strip():
        return None, ((1, 1, 3), "calling AE title is not printable ASCII")
    _check_items(raw, 68)
    try:
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(b"\x01\x00" + len(raw).to_bytes(4, "big") + raw)
        contexts = tuple(
            (int(c.context_id), str(c.abstract_syntax or ""), tuple(str(ts) for ts in c.transfer_syntax))
            for c in pdu.presentation_context
        )
        user = pdu.user_information
        roles = {str(uid): (bool(item.scu_role), bool(item.scp_role)) for uid, item in (user.role_selection if user else {}).items()}
        request = AssociateRequest(str(pdu.calling_ae_title).strip(), str(pdu.called_ae_title).strip(),
                                   int((user.maximum_length if user else 0) or 0), contexts, roles)
    except Exception as exc:  # pynetdicom raises anything from struct.error to ValueError on bad items
        raise ProtocolError(f"malformed A-ASSOCIATE-RQ: an item pynetdicom cannot decode "
                            f"({type(exc).__name__}: {str(exc)[:80] or 'no detail'})") from exc
    if not contexts:
        return None, ((1, 1, 1), "no presentation context proposed")
    return request, None


def _check_items(raw: bytes, pos: int) -> None:
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
