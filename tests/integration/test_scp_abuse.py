"""The DICOM edge stays open under abuse (issue 15 §3; references: dcmtk storescp --fork, Orthanc).

Each attack runs against the running SCP from 127.0.0.2 while dcmtk's storescu, at 127.0.0.1 (another
address, as a modality is), stores a study within 10 s on the plain port and, where it applies, the TLS port."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from adapters import dicom_store
from adapters.lab.localpeers import free_port, issue_test_cert, make_test_pki
from adapters.lab.synthetic import generate_ct_study
from gateway.bootstrap import Gateway, GatewayController
from tests import rawdicom as raw
from tests.helpers import run_dcmtk, wait_for
from tests.integration.test_scp import make_settings

ATTACKER = "127.0.0.2"
ABORT, REJECT = 0x07, 0x03
MWL_FIND = "1.2.840.10008.5.1.4.31"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    ca, cert, key = make_test_pki(tmp_path / "pki", "localhost")
    settings = make_settings(tmp_path, free_port())
    settings = replace(settings, dicom=replace(settings.dicom, artim_timeout_s=2.0, network_timeout_s=4.0, max_pdu_bytes=16384,
                                               tls_port=free_port(), tls_cert_file=cert, tls_key_file=key, tls_ca_file=ca))
    controller = GatewayController(settings)
    gw = controller.start()
    gw.test_ca = ca  # type: ignore[attr-defined]
    try:
        yield gw
    finally:
        controller.stop()


def modality_stores(gw: Gateway, tmp_path: Path, name: str, tls: bool = False) -> float:
    """storescu from 127.0.0.1 stores a small study; returns its seconds (asserted < 10 by the callers)."""
    study = generate_ct_study(tmp_path / name, series=1, slices_per_series=3, rows=16, columns=16)
    options = ["+tls", *map(str, issue_test_cert(tmp_path / "pki", name)[::-1]), "+cf", str(gw.test_ca), "+px"] if tls else []  # type: ignore[attr-defined]
    started = time.monotonic()
    done = run_dcmtk(["/usr/bin/storescu", *options, "-to", "10", "-aet", "STORESCU", "-aec", "DICOMGW", "127.0.0.1",
                      str(gw.scp.tls_port if tls else gw.scp.port), *map(str, study.files)], timeout_s=30)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    stored = {i.sop_instance_uid for s in gw.store.studies() for _u, rows in gw.store.study_units(s.study_instance_uid) for i in rows}
    assert set(study.sop_instance_uids) <= stored
    return seconds


def test_a_maximum_pdu_too_small_for_a_fragment_is_rejected(gateway: Gateway, tmp_path: Path) -> None:
    for max_pdu in (1, 6, 63):
        peer = raw.RawPeer(gateway.scp.port, source=ATTACKER)
        peer.send(raw.associate_rq(max_pdu=max_pdu))
        answer = peer.reply()
        assert answer is not None and answer[0] == REJECT and tuple(answer[1][1:4]) == (1, 1, 1), answer
        peer.close()
    (row,) = wait_for(lambda: [e for e in gateway.store.audit_entries() if e["event"] == "association_rejected"
                               and e["count"] == 3] or None, 10, 0.1,
                      what="the three refusals audited in one row (counted in memory, written within a second)")
    # the row names the first refusal noted: the three threads note theirs after answering, in any order
    assert re.search(r"Maximum Length Received (1|6|63) is below 64 bytes", row["detail"]), row
    assert len([e for e in gateway.store.audit_entries() if e["event"] == "association_rejected"]) == 1
    peer = raw.RawPeer(gateway.scp.port, source=ATTACKER)  # 64 works: the C-ECHO answer in a few small PDUs
    peer.associate(max_pdu=64)
    peer.send(raw.pdata((3, 0x03, raw.c_echo_rq())))
    pieces = []
    while not pieces or not pieces[-1][1][5] & 0x02:  # until the last fragment of the command
        answer = peer.reply()
        assert answer is not None and answer[0] == 0x04 and len(answer[1]) <= 64
        pieces.append(answer)
    assert raw.status_of(pieces[0][1] + b"".join(p[1][6:] for p in pieces[1:])) == 0x0000
    peer.close()
    assert modality_stores(gateway, tmp_path, "after") < 10


def test_trickling_associations_do_not_lock_out_a_modality(gateway: Gateway, tmp_path: Path) -> None:
    """16 associations from one address, each sending one byte of a P-DATA PDU every 0.5 s: they get at most
    their address's share of the association slots, each is dropped when its PDU misses its deadline
    (network_timeout_s, 4 s here), and storescu from the modality's address is served meanwhile."""
    peers, refused = [], 0
    for _ in range(16):
        peer = raw.RawPeer(gateway.scp.port, source=ATTACKER)
        peer.send(raw.associate_rq())
        answer = peer.reply()
        if answer is not None and answer[0] == 0x02:
            peers.append(peer)
        else:
            assert answer is not None and answer[0] == REJECT and tuple(answer[1][1:4]) == (2, 3, 2)  # local limit
            refused += 1
            peer.close()
    assert len(peers) == 12 and refused == 4  # three quarters of max_associations (16) from one address
    pdu = raw.pdata((3, 0x03, raw.c_echo_rq()))
    started = time.monotonic()
    stop = threading.Event()
    closed_at: dict[int, float] = {}

    def trickle(n: int, peer: raw.RawPeer) -> None:
        for byte in pdu:
            if stop.is_set():
                return
            try:
                peer.send(bytes([byte]))
            except OSError:
                break
            if peer.closed_within(0.5):
                break
        closed_at[n] = time.monotonic() - started

    threads = [threading.Thread(target=trickle, args=(n, p), daemon=True) for n, p in enumerate(peers)]
    for t in threads:
        t.start()
    try:
        assert modality_stores(gateway, tmp_path, "during") < 10
        wait_for(lambda: len(closed_at) == len(peers), 15, 0.1, what="every trickling association to be dropped")
        assert max(closed_at.values()) < 4 + 3  # the PDU deadline, not a timeout that each byte restarts
    finally:
        stop.set()
        for p in peers:
            p.close()


def test_a_data_set_trickling_in_whole_pdus_is_aborted_below_the_rate_floor(gateway: Gateway, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each PDU arrives in time, but the data set comes at 40 bytes/s: aborted once the grace (1 s here) is over."""
    monkeypatch.setattr(dicom_store, "DATASET_GRACE_S", 1.0)
    peer = raw.RawPeer(gateway.scp.port, source=ATTACKER)
    peer.associate()
    ds = raw.dataset(raw.CT_STORAGE, "1.2.3.4.77", pixel_bytes=4096)
    peer.send(raw.pdata((1, 0x03, raw.c_store_rq(raw.CT_STORAGE, "1.2.3.4.77"))))
    started = time.monotonic()
    answer = None
    for offset in range(0, len(ds), 20):
        try:
            peer.send(raw.pdata((1, 0x00, ds[offset:offset + 20])))
        except OSError:
            break
        if peer.closed_within(0.5):
            break
    answer = peer.reply()
    assert answer in (None, (ABORT, b"\x00\x00\x02\x00"))
    assert time.monotonic() - started < 6
    assert gateway.store.count_instances() == 0
    assert modality_stores(gateway, tmp_path, "after") < 10


def test_idle_connections_and_stalled_tls_handshakes_from_one_address_fill_only_its_share(gateway: Gateway, tmp_path: Path) -> None:
    """64 connections that never associate on the plain port and 70 stalled TLS handshakes on the TLS port, all
    from 127.0.0.2: storescu from 127.0.0.1 is served on both ports at once; the stalled handshakes end at the
    ARTIM deadline (2 s here) whatever trickles in."""
    idle = []
    for port, count in ((gateway.scp.port, 64), (gateway.scp.tls_port, 70)):
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(ATTACKER, 0))
            idle.append(sock)
    idle[64].sendall(b"\x16\x03\x01")  # the start of a ClientHello, and then nothing more
    try:
        assert modality_stores(gateway, tmp_path, "plain") < 10
        assert modality_stores(gateway, tmp_path, "tls", tls=True) < 10
        # Which listener's accept thread took 127.0.0.2's slots first is the scheduler's choice: once the flood has
        # ended (ARTIM), a stalled handshake from it is admitted and must end at the deadline, audited in words.
        for sock in idle:
            sock.close()
        wait_for(lambda: not gateway.scp._admission._waiting_address.get(ATTACKER), 20, 0.1,
                 what="127.0.0.2's waiting slots free again")
        hello = socket.create_connection(("127.0.0.1", gateway.scp.tls_port), timeout=5, source_address=(ATTACKER, 0))
        idle.append(hello)
        hello.sendall(b"\x16\x03\x01")
        hello.settimeout(10)
        started = time.monotonic()
        try:
            assert hello.recv(100) == b""  # closed by the handshake deadline
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 5
        wait_for(lambda: any(e["event"] == "association_rejected" and "TLS" in e["detail"] for e in gateway.store.audit_entries(limit=5000)),
                 10, 0.1, what="the stalled handshake audited")
    finally:
        for sock in idle:
            sock.close()


def test_a_c_store_of_a_non_storage_class_on_a_storage_context_is_refused(gateway: Gateway) -> None:
    """Command and data set say MWL FIND on a Secondary Capture context: 0x0122, nothing stored."""
    peer = raw.RawPeer(gateway.scp.port, source=ATTACKER)
    peer.associate(contexts=[(1, SECONDARY_CAPTURE)])
    peer.send(raw.pdata((1, 0x03, raw.c_store_rq(MWL_FIND, "1.2.3.4.88"))))
    peer.send(raw.pdata((1, 0x02, raw.dataset(MWL_FIND, "1.2.3.4.88"))))
    answer = peer.reply()
    assert answer is not None and answer[0] == 0x04 and raw.status_of(answer[1]) == 0x0122
    assert gateway.store.count_instances() == 0
    peer.close()
