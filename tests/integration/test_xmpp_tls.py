"""TLS to the XMPP server (a real Prosody with STARTTLS required and a certificate generated for the run):
verified chain and name, an optional pin; every failure refused with its reason, shown by `dicomgw status`,
and never a fallback to plaintext."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.lab.localpeers import Prosody, make_test_pki
from gateway.cli import main as cli
from tests.helpers import wait_for
from tests.integration.test_xmpp_transfer import A_JID, DOMAIN, start_site


def _server(tmp_path: Path, kind: str) -> Prosody:
    server = Prosody(tmp_path / "prosody", domain=DOMAIN, tls=kind)
    server.add_account("radiology.hospital-a", "pw-radiology.hospital-a")
    return server.start()


def _status_cli(tmp_path: Path, db: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    config = tmp_path / "status.toml"
    config.write_text(f'[queue]\ndb_url = "sqlite:///{db}"\n')
    code = cli(["status", "--json", "--config", str(config)])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("kind", "reason"), [
    ("wrong-ca", "unknown CA"),
    ("wrong-name", "wrong host name"),
    ("self-signed", "self-signed server certificate"),
    ("expired", "server certificate expired"),
])
def test_a_server_that_fails_verification_is_refused_with_its_reason(
    tmp_path: Path, kind: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    server = _server(tmp_path, "ca" if kind == "wrong-ca" else kind)
    other_ca = make_test_pki(tmp_path / "other-pki", DOMAIN)[0]
    site = start_site(tmp_path, "a", A_JID, server, peers=(), ca_file=other_ca if kind == "wrong-ca" else server.ca_file)
    try:
        agent = site.gateway.agent
        wait_for(lambda: agent.status["state"] == "refused", 30, 0.05, what="the refusal")
        assert agent.status["last_error"].startswith(reason) and not agent.online
        code, status = wait_for(lambda: (found := _status_cli(tmp_path, tmp_path / "a" / "queue.db", capsys))[1]["state"]
                                == "refused" and found, 30, 0.2, what="dicomgw status to show the refusal (heartbeat)")
        assert code == 1 and status["state"] == "refused" and status["last_error"].startswith(reason)
        assert status["server"] == f"127.0.0.1:{server.c2s_port}"
        log = (server.workdir / "prosody.log").read_text() if (server.workdir / "prosody.log").exists() else ""
        assert "Authenticated as" not in log  # nothing was said in plaintext, no login happened
    finally:
        site.stop()
        server.stop()


def test_verified_server_and_pin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = _server(tmp_path, "ca")
    site = start_site(tmp_path, "a", A_JID, server, peers=())
    try:
        code, status = wait_for(lambda: (found := _status_cli(tmp_path, tmp_path / "a" / "queue.db", capsys))[0] == 0
                                and found, 30, 0.2, what="dicomgw status to show the session online (heartbeat)")
        assert code == 0 and status["state"] == "online" and status["tls_version"] == "TLSv1.3"
        seen = status["server_cert_sha256"]
    finally:
        site.stop()
    wrong_pin = "f" * 64
    site = start_site(tmp_path, "a2", A_JID, server, peers=(), server_cert_sha256=wrong_pin)
    try:
        agent = site.gateway.agent
        wait_for(lambda: agent.status["state"] == "refused", 30, 0.05, what="the refusal")
        assert agent.status["last_error"] == f"server certificate pin mismatch: SHA-256 {seen}, pinned {wrong_pin}"
    finally:
        site.stop()
        server.stop()
