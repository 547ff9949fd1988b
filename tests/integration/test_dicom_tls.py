"""DICOM over TLS (PS3.15 B.1, BCP 195), with dcmtk as the peer both ways: storescu +tls into the SCP's TLS
port (client certificate required), and the gateway's PACS client into storescp +tls."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from adapters.dicom_files import inspect_part10_file
from adapters.localpeers import StoreSCP, free_port, issue_test_cert, make_test_pki
from adapters.synthetic import generate_ct_study
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
