"""DICOM over TLS (PS3.15 B.1, BCP 195), with dcmtk as the peer both ways: storescu +tls into the SCP's TLS
port (client certificate required), and the gateway's PACS client into storescp +tls."""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import replace
from pathlib import Path

import pytest

from adapters.dicom_files import inspect_part10_file
from adapters.lab.localpeers import StoreSCP, free_port, issue_test_cert, make_test_pki
from adapters.lab.synthetic import generate_ct_study
from gateway.bootstrap import GatewayController
from gateway.importing import PacsUnavailable, Verdict
from gateway.settings import PacsSettings
from tests.helpers import dataset_bytes, run_dcmtk, wait_for
from tests.integration.test_pacs import record
from tests.integration.test_scp import make_settings, stored_instances


def test_storescu_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    ca, cert, key = make_test_pki(tmp_path / "pki", "localhost")
    client_cert, client_key = issue_test_cert(tmp_path / "pki", "modality")
    settings = make_settings(tmp_path / "gw", free_port())
    settings = replace(settings, dicom=replace(settings.dicom, tls_port=free_port(), tls_cert_file=cert, tls_key_file=key,
                                               tls_ca_file=ca, require_client_cert=True))
    controller = GatewayController(settings)
    gw = controller.start()
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=3, rows=32, columns=32)
        tls = ["+tls", str(client_key), str(client_cert), "+cf", str(ca), "+px"]
        done = run_dcmtk(["/usr/bin/storescu", *tls, "-aet", "STORESCU", "-aec", "DICOMGW", "127.0.0.1",
                          str(gw.scp.tls_port), *map(str, study.files)])
        assert done.returncode == 0, done.stderr
        stored = stored_instances(gw)
        assert set(stored) == set(study.sop_instance_uids)
        for path in study.files:
            assert dataset_bytes(stored[inspect_part10_file(path).sop_instance_uid]["path"]) == dataset_bytes(path)
        anonymous = run_dcmtk(["/usr/bin/storescu", "+tla", "+cf", str(ca), "-aet", "STORESCU", "-aec", "DICOMGW",
                               "127.0.0.1", str(gw.scp.tls_port), str(study.files[0])])
        assert anonymous.returncode != 0
        wait_for(lambda: any(e["event"] == "association_rejected" and "TLS" in e["detail"] for e in gw.store.audit_entries()),
                 10, 0.1, what="the refused TLS handshake audited (written within a second)")
        plain = run_dcmtk(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "DICOMGW", "127.0.0.1",
                           str(gw.scp.tls_port), str(study.files[0])])
        assert plain.returncode != 0  # no plaintext association on the TLS port
    finally:
        controller.stop()


def test_pacs_client_stores_over_tls_into_storescp(tmp_path: Path) -> None:
    ca, cert, key = make_test_pki(tmp_path / "pki", "localhost")
    client_cert, client_key = issue_test_cert(tmp_path / "pki", "gateway")
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=4, rows=32, columns=32)
    from adapters.pacs import PacsClient

    with StoreSCP(tmp_path / "scp", tls=(key, cert, ca)) as scp:
        scp.start()
        settings = PacsSettings(ae_title=scp.ae_title, host="127.0.0.1", port=scp.port, timeout_s=10, tls=True,
                                tls_ca_file=ca, tls_cert_file=client_cert, tls_key_file=client_key)
        outcomes: dict[str, object] = {}
        PacsClient(settings, Path("/")).store([record(p) for p in study.files], lambda i, o: outcomes.__setitem__(i.sop_instance_uid, o))
        assert {o.verdict for o in outcomes.values()} == {Verdict.STORED}  # type: ignore[attr-defined]
        written = {inspect_part10_file(p).sop_instance_uid: p for p in scp.out_dir.iterdir()}
        assert set(written) == set(study.sop_instance_uids)
        without_cert = PacsClient(replace(settings, tls_cert_file=None, tls_key_file=None), Path("/"))
        with pytest.raises(PacsUnavailable):
            without_cert.store([record(study.files[0])], lambda i, o: None)


def _tls_client(port: int, source: str, context: ssl.SSLContext | None, payload: bytes = b"") -> None:
    """A stranger at ``source`` (a loopback address of its own): a TLS handshake with ``context``, or plain bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as raw:
        if context is None:
            raw.sendall(payload)
            with contextlib.suppress(OSError):
                raw.recv(100)
            return
        with contextlib.suppress(ssl.SSLError, OSError):
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(payload or b"\x01\x00\x00\x00\x00\x10" + bytes(16))
                tls.recv(100)


def test_tls_refusals_are_logged_and_audited_in_words(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Unknown CA, no client certificate, TLS 1.0, plain DICOM on the TLS port, a client that does not trust our
    certificate: each refusal leaves one line naming the address, the phase and the reason (not OpenSSL's codes)."""
    import logging

    ca, cert, key = make_test_pki(tmp_path / "pki", "localhost")
    client_cert, client_key = issue_test_cert(tmp_path / "pki", "modality")
    other_ca = make_test_pki(tmp_path / "other", "localhost")[0]
    stranger_cert, stranger_key = issue_test_cert(tmp_path / "other", "stranger")
    settings = make_settings(tmp_path / "gw", free_port())
    settings = replace(settings, dicom=replace(settings.dicom, tls_port=free_port(), tls_cert_file=cert, tls_key_file=key,
                                               tls_ca_file=ca, require_client_cert=True))
    controller = GatewayController(settings)
    gw = controller.start()
    caplog.set_level(logging.WARNING)

    def client(cafile: Path, cert_key: tuple[Path, Path] | None, tls10: bool = False) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(cafile))
        if cert_key:
            context.load_cert_chain(*cert_key)
        if tls10:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        return context

    cases = {
        "127.0.0.11": (client(ca, (stranger_cert, stranger_key)), "the client's certificate is not signed by our CA"),
        "127.0.0.12": (client(ca, None), "no client certificate (this port requires one"),
        "127.0.0.13": (client(ca, (client_cert, client_key), tls10=True), "a TLS version below 1.2"),
        "127.0.0.14": (None, "not TLS: plain DICOM (or something else) on the TLS port"),
        "127.0.0.15": (client(other_ca, (client_cert, client_key)), "the peer does not accept this gateway's certificate"),
    }
    try:
        for source, (context, _words) in cases.items():
            _tls_client(gw.scp.tls_port, source, context, b"\x01\x00\x00\x00\x00\x44" + bytes(68) if context is None else b"")
        def audited() -> dict[str, str] | None:
            found = {e["detail"].split("] ", 1)[0][1:].split()[0]: e["detail"]
                     for e in gw.store.audit_entries() if e["event"] == "association_rejected"}
            return found if len(found) >= len(cases) else None

        details = wait_for(audited, 20, 0.1, what="every refusal audited")
        for source, (_context, words) in cases.items():
            assert words in details[source], (source, details[source])
            assert source in details[source] and "DICOM TLS" in details[source]
            lines = [r.getMessage() for r in caplog.records if source in r.getMessage()]
            assert len(lines) == 1 and words in lines[0], (source, lines)
        for line in (r.getMessage() for r in caplog.records):
            assert "ALERT" not in line and "WRONG_VERSION_NUMBER" not in line  # words, not OpenSSL's codes
    finally:
        controller.stop()
