"""``dicomgw echo`` against an SCP that answers its A-ASSOCIATE-RQ with whatever bytes a hostile peer likes:
each gives a one-line result, never a traceback, and the client keeps working for the next."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from adapters.dicom_scu import _reactor_failures, echo
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


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # a dead reactor thread fails it
@pytest.mark.parametrize(("reply", "expected"), [
    # values outside PS3.8 Table 9-21 / 9-26: pynetdicom 3.0 cannot make a primitive of them (its reactor thread
    # died with a ValueError traceback and the client waited for its timeout); said as what the SCP sent
    (associate_rj(7, 9, 99), ": it answered an A-ASSOCIATE-RJ with values outside PS3.8 Table 9-21 (result 7, source 9, reason 99)"),
    (associate_rj(255, 255, 255), ": it answered an A-ASSOCIATE-RJ with values outside PS3.8 Table 9-21 (result 255, source 255, reason 255)"),
    (associate_rj(0, 1, 1), ": it answered an A-ASSOCIATE-RJ with values outside PS3.8 Table 9-21 (result 0, source 1, reason 1)"),
    (associate_rj(1, 1, 5), ": it answered an A-ASSOCIATE-RJ with values outside PS3.8 Table 9-21 (result 1, source 1, reason 5)"),
    (b"\x07\x00\x00\x00\x00\x04\x00\x00\x09\x09", ": it answered an A-ABORT with values outside PS3.8 Table 9-26 (source 9, reason 9)"),
    (b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x63", ": it answered an A-ABORT with values outside PS3.8 Table 9-26 (source 2, reason 99)"),
    # malformed: pynetdicom refuses the PDU itself
    (associate_rj(1, 1, 3)[:5], " (refused, aborted or timed out)"),  # truncated header
    (associate_rj(1, 1, 3)[:8], " (refused, aborted or timed out)"),  # truncated body
    (b"\x03\x00\xff\xff\xff\xff" + b"\x00" * 4, " (refused, aborted or timed out)"),  # a length far beyond what follows
    (b"\x7f" * 1000, " (refused, aborted or timed out)"),  # no PDU type of PS3.8 9.3
    (b"\x1b[2J\x00\xff\xfe" * 1000, " (refused, aborted or timed out)"),  # control characters, non-UTF-8
    (b"\x02\x00\x00\x00\x00\x50" + b"\xff" * 80, " (refused, aborted or timed out)"),  # an A-ASSOCIATE-AC of junk
])
def test_a_hostile_answer_is_no_association_in_words_and_no_traceback(reply: bytes, expected: str) -> None:
    port, server = answering(reply, 1)
    result = echo("ANY", "127.0.0.1", port, timeout_s=5)
    assert not result.ok
    assert result.detail == f"no association with ANY@127.0.0.1:{port}{expected}"
    server.join(30)


def test_the_cli_says_a_hostile_rejection_in_one_line_and_prints_no_traceback() -> None:
    port, server = answering(associate_rj(7, 9, 99), 1)
    done = subprocess.run([str(Path(sys.executable).parent / "dicomgw"), "echo", f"ANY@127.0.0.1:{port}", "--timeout", "5",
                           "--calling-ae", "DICOMGW"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert done.stdout == (f"no association with ANY@127.0.0.1:{port}: it answered an A-ASSOCIATE-RJ with values "
                           "outside PS3.8 Table 9-21 (result 7, source 9, reason 99)\n")
    assert "Traceback" not in done.stderr, done.stderr
    server.join(30)


def test_whatever_else_kills_the_reactor_thread_is_collected_not_printed(capsys: pytest.CaptureFixture[str]) -> None:
    def dies() -> None:
        raise ValueError("Unknown A_ASSOCIATE.result value")

    before = threading.excepthook
    with _reactor_failures() as failures:
        reactor = threading.Thread(target=dies, name="Thread-9 (run_reactor)")
        reactor.start()
        reactor.join(30)
    assert failures == ["ValueError: Unknown A_ASSOCIATE.result value"]
    assert threading.excepthook is before  # the process's own hook is back
    assert "Traceback" not in capsys.readouterr().err
