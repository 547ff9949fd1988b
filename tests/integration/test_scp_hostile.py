"""Hostile input at the DICOM edge, from a raw-socket client that builds its own PDUs (tests/rawdicom.py):
each case gets the answer dcmtk's storescp or Orthanc would give (A-ASSOCIATE-RJ, A-ABORT, a named C-STORE
status), nothing is stored that should not be, and the SCP goes on serving storescu afterwards."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from adapters.lab.synthetic import generate_ct_study
from gateway.bootstrap import Gateway, GatewayController
from tests import rawdicom as raw
from tests.helpers import REPO, free_port, port_open, storescu, wait_for
from tests.integration.test_scp import make_settings

ABORT = 0x07


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    settings = make_settings(tmp_path, free_port())
    settings = replace(settings, dicom=replace(settings.dicom, artim_timeout_s=1.0, max_pdu_bytes=16384))
    controller = GatewayController(settings)
    gw = controller.start()
    try:
        yield gw
    finally:
        controller.stop()


def serves_storescu(gw: Gateway, tmp_path: Path) -> bool:
    study = generate_ct_study(tmp_path / "after", series=1, slices_per_series=2, rows=16, columns=16)
    return storescu(gw.scp.port, study.files).returncode == 0 and all(
        any(i.sop_instance_uid == u for s in gw.store.studies() for _u, rows in gw.store.study_units(s.study_instance_uid) for i in rows)
        for u in study.sop_instance_uids)


def staged_files(gw: Gateway) -> list[Path]:
    return [p for p in gw.spool.root.rglob("*") if p.is_file() and ".staging" in str(p) or p.name.endswith(".part")]


@pytest.mark.parametrize(("name", "pdu", "expect"), [
    ("protocol version 2", raw.associate_rq(version=2), (0x03, (1, 2, 2))),
    ("no presentation context", raw.associate_rq(contexts=[]), (0x03, (1, 1, 1))),
    ("non-ASCII calling AE", raw.associate_rq(calling="ÆØÅ".encode("latin-1")), (0x03, (1, 1, 3))),
    ("role selection overrun", raw.associate_rq(user_extra=raw.item(0x54, struct.pack(">H", 200) + b"1.2")), (ABORT, None)),
    ("item length past the PDU", raw.associate_rq() + b"\x50\x00\x00\x64ab", (ABORT, None)),
])
def test_malformed_association_requests_are_rejected_or_aborted(gateway: Gateway, tmp_path: Path, name: str, pdu: bytes,
                                                                expect: tuple[int, tuple[int, int, int] | None]) -> None:
    if name == "item length past the PDU":  # the PDU length counts the extra item: its own 100 bytes do not fit
        pdu = pdu[:2] + struct.pack(">I", len(pdu) - 6) + pdu[6:]
    peer = raw.RawPeer(gateway.scp.port)
    peer.send(pdu)
    answer = peer.reply()
    peer.close()
    assert answer is not None and answer[0] == expect[0], f"{name}: {answer}"
    if expect[1] is not None:
        assert tuple(answer[1][1:4]) == expect[1]  # result, source, reason (PS3.8 9.3.4)
    assert serves_storescu(gateway, tmp_path)


def test_oversized_pdus_are_refused_before_any_allocation(gateway: Gateway, tmp_path: Path) -> None:
    peer = raw.RawPeer(gateway.scp.port)
    peer.send(struct.pack(">BBI", 0x01, 0, 60 * 1024 * 1024))  # a 60 MiB A-ASSOCIATE-RQ announced
    assert peer.reply() == (ABORT, b"\x00\x00\x02\x00") and peer.closed_within(5)
    peer = raw.RawPeer(gateway.scp.port)
    peer.associate()
    peer.send(struct.pack(">BBI", 0x04, 0, 16384 + 1))  # over the maximum we announced
    assert peer.reply() == (ABORT, b"\x00\x00\x02\x00")
    assert serves_storescu(gateway, tmp_path)


def test_a_trickling_sender_cannot_hold_a_connection(gateway: Gateway) -> None:
    peer = raw.RawPeer(gateway.scp.port)
    started = time.monotonic()
    request = raw.associate_rq()
    for byte in request[:40]:  # one byte every 0.2 s: each read is quick, the PDU never completes in time
        try:
            peer.send(bytes([byte]))
        except OSError:
            break
        if peer.closed_within(0.2):
            break
    assert peer.closed_within(5)
    assert time.monotonic() - started < 5  # the 1 s deadline is per PDU, not per read


def test_a_new_command_inside_an_incomplete_data_set_aborts_and_leaves_nothing(gateway: Gateway, tmp_path: Path) -> None:
    peer = raw.RawPeer(gateway.scp.port)
    peer.associate()
    ds = raw.dataset(raw.CT_STORAGE, "1.2.3.4.1")
    peer.send(raw.pdata((1, 0x03, raw.c_store_rq(raw.CT_STORAGE, "1.2.3.4.1"))))
    peer.send(raw.pdata((1, 0x00, ds[:100])))  # the data set starts ...
    peer.send(raw.pdata((3, 0x03, raw.c_echo_rq())))  # ... and a C-ECHO arrives inside it
    assert peer.reply() == (ABORT, b"\x00\x00\x02\x00")
    wait_for(lambda: staged_files(gateway) == [], 30, what="the staged file to be removed")
    assert gateway.store.count_instances() == 0
    assert serves_storescu(gateway, tmp_path)


def test_a_pdv_longer_than_its_pdu_aborts(gateway: Gateway) -> None:
    peer = raw.RawPeer(gateway.scp.port)
    peer.associate()
    body = struct.pack(">IBB", 500, 1, 0x03) + raw.c_store_rq(raw.CT_STORAGE, "1.2.3.4.2")[:20]
    peer.send(struct.pack(">BBI", 0x04, 0, len(body)) + body)
    assert peer.reply() == (ABORT, b"\x00\x00\x02\x00")
    assert gateway.store.count_instances() == 0


def test_uids_in_the_command_must_match_the_data_set(gateway: Gateway) -> None:
    peer = raw.RawPeer(gateway.scp.port)
    peer.associate()
    peer.send(raw.pdata((1, 0x03, raw.c_store_rq(raw.CT_STORAGE, "1.2.3.4.3"))))
    peer.send(raw.pdata((1, 0x02, raw.dataset(raw.CT_STORAGE, "1.2.3.4.999"))))
    answer = peer.reply()
    assert answer is not None and answer[0] == 0x04 and raw.status_of(answer[1]) == 0xA900
    assert gateway.store.count_instances() == 0
    (reason,) = gateway.spool.quarantine_dir.glob("*.reason.txt")
    assert "1.2.3.4.999" in reason.read_text()
    peer.close()


def test_a_command_without_affected_sop_instance_uid_is_refused_and_nothing_stored(gateway: Gateway) -> None:
    peer = raw.RawPeer(gateway.scp.port)
    peer.associate()
    peer.send(raw.pdata((1, 0x03, raw.c_store_rq(raw.CT_STORAGE, None))))
    peer.send(raw.pdata((1, 0x02, raw.dataset(raw.CT_STORAGE, "1.2.3.4.4"))))
    answer = peer.reply()
    assert answer is not None and raw.status_of(answer[1]) == 0xC000
    assert gateway.store.count_instances() == 0 and list(gateway.spool.quarantine_dir.glob("*")) == []
    peer.close()
    peer = raw.RawPeer(gateway.scp.port)
    peer.associate()
    peer.send(raw.pdata((1, 0x03, raw.c_store_rq(raw.CT_STORAGE, "1.2.3.4.5", message_id=None))))
    assert peer.reply() == (ABORT, b"\x00\x00\x02\x00")
    assert gateway.store.count_instances() == 0


def test_accept_errors_at_the_descriptor_limit_do_not_stop_the_scp(tmp_path: Path) -> None:
    """The gateway process runs with 64 descriptors; 100 idle connections exhaust them (EMFILE in accept).
    Before: the accept loop ended silently and the SCP never accepted again. Now it logs, backs off and,
    once the idle connections are gone (closed by us, or by its ARTIM deadline), serves storescu."""
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[dicom]\nport = {port}\nartim_timeout_s = 2\n[paths]\nspool_dir = "spool"\nwatch_dir = ""\nquarantine_dir = "q"\n'
        f'[queue]\ndb_url = "sqlite:///queue.db"\nstable_age_s = 3600\n'
    )
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(["bash", "-c", f'ulimit -n 64 && exec "{sys.executable}" -m gateway run --config "{config}"'],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    idle: list[socket.socket] = []
    try:
        wait_for(lambda: port_open(port), 30, what="the gateway's SCP")
        for n in range(100):  # from eight addresses: one address alone gets only its share of waiting slots
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(f"127.0.0.{2 + n % 8}", 0)))
        wait_for(lambda: b"cannot accept a connection" in (tmp_path / "gateway.log").read_bytes(), 15, 0.1,
                 what="the accept error to be logged")
        for sock in idle:
            sock.close()
        idle.clear()
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=3, rows=16, columns=16)
        wait_for(lambda: storescu(port, study.files).returncode == 0, 30, 0.5, what="storescu to be served again")
        assert proc.poll() is None
    finally:
        for sock in idle:
            sock.close()
        proc.terminate()
        proc.wait(15)
        log.close()


@pytest.mark.parametrize("cut", ["inside the pixel data", "a length past the end"])
def test_a_data_set_that_does_not_end_on_an_element_boundary_is_refused_and_kept(gateway: Gateway, cut: str) -> None:
    ds = raw.dataset(raw.CT_STORAGE, "1.2.3.4.6", pixel_bytes=256)
    if cut == "inside the pixel data":
        ds = ds[:-100]
    else:  # the pixel data element claims 4096 bytes, 256 follow
        at = ds.index(b"\xe0\x7f\x10\x00")
        ds = ds[: at + 4] + struct.pack("<I", 4096) + ds[at + 8 :]
    peer = raw.RawPeer(gateway.scp.port)
    peer.associate()
    peer.send(raw.pdata((1, 0x03, raw.c_store_rq(raw.CT_STORAGE, "1.2.3.4.6"))))
    peer.send(raw.pdata((1, 0x02, ds)))
    answer = peer.reply()
    assert answer is not None and raw.status_of(answer[1]) == 0xC000
    assert gateway.store.count_instances() == 0
    (reason,) = gateway.spool.quarantine_dir.glob("*.reason.txt")
    assert "short of the end of element (7FE0,0010)" in reason.read_text()
    kept = Path(str(reason).removesuffix(".reason.txt"))
    assert kept.read_bytes().endswith(ds)  # every byte that came is kept
    peer.close()
