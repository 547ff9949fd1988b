"""The upper-layer codec (PS3.8 9.3, PS3.7 6.3.1) without sockets: what one side encodes the other parses."""

from __future__ import annotations

import struct

from adapters.dicom_assoc import decode_associate_rq
from adapters.dicom_ul import (
    LO,
    UI,
    US,
    Command,
    PresentationContext,
    _associate_rq,
    _parse_associate_ac,
    associate_ac,
    encode_command,
    iter_pdvs,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def test_command_round_trip_with_group_length_and_even_padding() -> None:
    raw = encode_command([(0x00001000, UI, "1.2.3"), (0x00000100, US, 0x0001), (0x00000902, LO, "odd")])
    command = Command.decode(raw)
    assert command.command_field == 0x0001 and command.text(0x00001000) == "1.2.3" and command.text(0x00000902) == "odd"
    assert struct.unpack_from("<I", raw, 8)[0] == len(raw) - 12  # (0000,0000) counts what follows it
    assert all(len(v) % 2 == 0 for v in command.values.values())
    assert not Command.decode(encode_command([(0x00000800, US, 0x0101)])).has_dataset


def test_associate_request_parsed_by_the_acceptor_and_answered() -> None:
    contexts = [PresentationContext(1, CT, (EXPLICIT, IMPLICIT)), PresentationContext(3, "1.2.840.10008.1.20.1", (IMPLICIT,))]
    pdu = _associate_rq("CALLER", "CALLED", contexts, 65536, {"1.2.840.10008.1.20.1": (False, True)})
    request, rejection = decode_associate_rq(pdu[6:])  # pynetdicom's PDU codec decodes it
    assert rejection is None and request is not None
    assert (request.calling_ae, request.called_ae, request.max_pdu) == ("CALLER", "CALLED", 65536)
    assert request.contexts == ((1, CT, (EXPLICIT, IMPLICIT)), (3, "1.2.840.10008.1.20.1", (IMPLICIT,)))
    assert request.roles == {"1.2.840.10008.1.20.1": (False, True)}
    answer = associate_ac(request, [(1, 0, EXPLICIT), (3, 3, IMPLICIT)], 16384)
    by_id = {c.id: c for c in contexts}
    assert _parse_associate_ac(answer[6:], by_id) == 16384
    assert (by_id[1].accepted, by_id[1].transfer_syntax) == (True, EXPLICIT)
    assert by_id[3].result == 3 and not by_id[3].accepted


def test_pdv_items_are_split_with_their_control_headers() -> None:
    body = struct.pack(">IBB", 5, 1, 0x03) + b"abc" + struct.pack(">IBB", 4, 1, 0x02) + b"de"
    assert [(c, f, bytes(d)) for c, f, d in iter_pdvs(body)] == [(1, 0x03, b"abc"), (1, 0x02, b"de")]
