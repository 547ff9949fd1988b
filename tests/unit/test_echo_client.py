"""``dicomgw echo`` against an SCP that answers its A-ASSOCIATE-RQ with whatever bytes a hostile peer likes:
each gives a one-line result, never a traceback, and the client keeps working for the next."""

from __future__ import annotations

import socket
import threading

import pytest

from adapters.dicom_scu import echo
from adapters.dicom_ul import associate_rj, read_pdu


def answering(reply: bytes, times: int) -> tuple[int, threading.Thread]:
    """A loopback listener that reads each association request and answers ``reply``, then closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)

    def serve() -> None:
        with listener:
            for _ in range(times):
                try:
                    conn, _address = listener.accept()
                except OSError:
                    return
                with conn:
                    conn.settimeout(30)
                    read_pdu(conn)
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


@pytest.mark.parametrize(("reply", "expected"), [
    (associate_rj(1, 1, 3), ": Rejected (Permanent), DUL service-user: Calling AE title not recognised"),
    (associate_rj(2, 3, 2), ": Rejected (Transient), DUL service-provider (presentation related): Local limit exceeded"),
])
def test_a_rejection_reads_as_one_line_with_its_reason(reply: bytes, expected: str) -> None:
    port, server = answering(reply, 3)
    for _ in range(3):
        result = echo("ANY", "127.0.0.1", port, timeout_s=10)
        assert not result.ok
        assert result.detail == f"association rejected by ANY@127.0.0.1:{port}{expected}"
    server.join(30)


@pytest.mark.parametrize("reply", [
    associate_rj(7, 9, 99),  # values outside PS3.8 Table 9-21: pynetdicom refuses the PDU
    associate_rj(255, 255, 255),
    associate_rj(1, 1, 3)[:5],  # truncated header
    associate_rj(1, 1, 3)[:8],  # truncated body
    b"\x03\x00\xff\xff\xff\xff" + b"\x00" * 4,  # a length far beyond what follows
    b"\x7f" * 1000,  # no PDU type of PS3.8 9.3
    b"\x1b[2J\x00\xff\xfe" * 1000,  # control characters, non-UTF-8
])
def test_a_malformed_answer_is_no_association_and_no_traceback(reply: bytes) -> None:
    port, server = answering(reply, 1)
    result = echo("ANY", "127.0.0.1", port, timeout_s=5)
    assert not result.ok and result.detail.startswith(f"no association with ANY@127.0.0.1:{port}"), result.detail
    server.join(30)
