"""The security commands as an admin uses them, against `dicomgw run` in its own process and a real
Prosody with TLS: `keys init/show`, `peers add --fingerprint`, `status`, and no secret in any log line."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
from pathlib import Path

from adapters.lab.localpeers import Prosody
from gateway.store import QueueStore, make_engine
from tests.e2e.test_gateway_process import GatewayProcess
from tests.helpers import REPO, wait_for

DOMAIN = "helsenett.test"
PASSWORD = "Pa55-w0rd-never-logged"


def test_keys_peers_status_and_no_secret_in_the_log(tmp_path: Path) -> None:
    server = Prosody(tmp_path / "prosody", domain=DOMAIN)
    server.add_account("radiology.hospital-a", PASSWORD)
    server.start()
    gw = GatewayProcess(tmp_path / "site")
    secret = gw.workdir / "xmpp.password"  # relative paths resolve against base_dir
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    with gw.config.open("a") as fh:
        fh.write(f'[xmpp]\njid = "radiology.hospital-a@{DOMAIN}/gw1"\npassword_file = "xmpp.password"\n'
                 f'port = {server.c2s_port}\nca_file = "{server.ca_file}"\n')
    try:
        made = gw.cli("keys", "init", "--json")
        assert made.returncode == 0, made.stderr
        identity = json.loads(made.stdout)
        assert identity["created"] and len(identity["fingerprint"]) == 64
        assert stat.S_IMODE(Path(identity["key"]).stat().st_mode) == 0o600
        shown = gw.cli("keys", "show")
        assert identity["fingerprint"] in shown.stdout and shown.returncode == 0
        assert not json.loads(gw.cli("keys", "init", "--json").stdout)["created"]  # never replaced
        peer_fp = "ab" * 32
        added = gw.cli("peers", "add", f"radiology.hospital-b@{DOMAIN}", "--fingerprint", "AB:" * 31 + "AB")
        assert added.returncode == 0 and peer_fp in added.stdout
        assert gw.cli("peers", "add", f"radiology.hospital-b@{DOMAIN}", "--fingerprint", "123").returncode == 2
        (peer,) = json.loads(gw.cli("peers", "--json").stdout)
        assert peer["fingerprint"] == peer_fp
        log_level = ["--log-level", "DEBUG"]
        gw.proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(gw.config), *log_level],
                                   cwd=REPO, stdout=(gw.workdir / "gateway.log").open("ab"), stderr=subprocess.STDOUT)

        def online() -> bool:
            result = gw.cli("status", "--json")
            return result.returncode == 0 and json.loads(result.stdout)["state"] == "online"

        wait_for(online, 60, 0.3, what="dicomgw status to show the session online")
        status = json.loads(gw.cli("status", "--json").stdout)
        assert status["tls_version"] == "TLSv1.3" and len(status["server_cert_sha256"]) == 64
        assert status["server"] == f"127.0.0.1:{server.c2s_port}"
        gw.stop()
        log = (gw.workdir / "gateway.log").read_text()
        assert "SEND:" in log  # DEBUG really logged the XML stream
        for form in (PASSWORD, base64.b64encode(PASSWORD.encode()).decode(),
                     base64.b64encode(f"\0radiology.hospital-a\0{PASSWORD}".encode()).decode()):
            assert form not in log
        assert "BEGIN PRIVATE KEY" not in log
    finally:
        gw.stop()
        server.stop()


def test_keys_rotate_and_two_pins_from_the_command_line(tmp_path: Path) -> None:
    """`keys rotate --overlap`: a new identity, the old one shown with its end date and audited; a second
    rotation during the overlap is refused; `peers edit --add-fingerprint/--remove-fingerprint` hold two pins
    and never none."""
    gw = GatewayProcess(tmp_path / "site")
    with gw.config.open("a") as fh:
        fh.write(f'[xmpp]\njid = "radiology.hospital-a@{DOMAIN}/gw1"\npassword = "x"\n')
    gw.config.chmod(0o600)
    first = json.loads(gw.cli("keys", "init", "--json").stdout)["fingerprint"]
    assert gw.cli("keys", "rotate", "--overlap", "soon").returncode == 2
    rotated = gw.cli("keys", "rotate", "--overlap", "2d", "--json")
    assert rotated.returncode == 0, rotated.stderr
    new = json.loads(rotated.stdout)
    assert new["previous_fingerprint"] == first and new["fingerprint"] != first
    shown = gw.cli("keys", "show")
    assert new["fingerprint"] in shown.stdout and f"previous SHA-256 {first}: still served" in shown.stdout
    again = gw.cli("keys", "rotate")
    assert again.returncode == 1 and "a rotation is under way" in again.stderr
    # Peers whose last exchange pinned only the old certificate are named while the overlap lasts.
    store = QueueStore(make_engine(f"sqlite:///{gw.workdir / 'var' / 'queue.db'}"))
    store.note_signing(f"radiology.hospital-b@{DOMAIN}", first)  # its last exchange pinned only the old one
    store.note_signing(f"radiology.hospital-c@{DOMAIN}", new["fingerprint"])
    behind = json.loads(gw.cli("keys", "show", "--json").stdout)["peers_pinning_previous"]
    assert [p["jid"] for p in behind] == [f"radiology.hospital-b@{DOMAIN}"]
    assert f"radiology.hospital-b@{DOMAIN} pins only the previous certificate" in gw.cli("keys", "show").stdout
    store.note_signing(f"radiology.hospital-b@{DOMAIN}", new["fingerprint"])  # it added the new pin
    assert "no peer's last exchange pinned only the previous" in gw.cli("keys", "show").stdout
    audit = json.loads(gw.cli("audit", "--json").stdout)
    assert any(e["event"] == "identity_rotated" and first in e["detail"] and new["fingerprint"] in e["detail"] for e in audit)

    # The deploy guide's rotation line, run as written with its own helper: the refusal stops the script
    # with the CLI's reason and one line from the helper, never a Python traceback.
    helper = [line for line in (REPO / "docs" / "deploy-region.sh").read_text().splitlines(keepends=True)]
    start = next(i for i, line in enumerate(helper) if line.startswith("json_field() {"))
    function = "".join(helper[start:next(i for i in range(start, len(helper)) if helper[i] == "}\n") + 1])
    guide = subprocess.run(
        ["bash", "-c", f'set -euo pipefail\n{function}B() {{ "{sys.executable}" -m gateway --config "{gw.config}" "$@"; }}\n'
                       """NEW_B_FP=$(B keys rotate --overlap 7d --json | json_field '["fingerprint"]')\necho "got $NEW_B_FP"\n"""],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert guide.returncode == 1 and "got" not in guide.stdout, guide
    assert "dicomgw keys rotate: a rotation is under way" in guide.stderr
    assert 'json_field: no ["fingerprint"] in the output of the command before' in guide.stderr
    assert "Traceback" not in guide.stderr, guide.stderr

    peer = f"radiology.hospital-b@{DOMAIN}"
    old_pin, new_pin = "ab" * 32, "cd" * 32
    assert gw.cli("peers", "add", peer, "--fingerprint", old_pin).returncode == 0
    assert gw.cli("peers", "edit", peer, "--add-fingerprint", new_pin).returncode == 0
    (row,) = json.loads(gw.cli("peers", "--json").stdout)
    assert row["fingerprint"] == f"{old_pin},{new_pin}"
    assert gw.cli("peers", "edit", peer, "--remove-fingerprint", old_pin).returncode == 0
    (row,) = json.loads(gw.cli("peers", "--json").stdout)
    assert row["fingerprint"] == new_pin
    last = gw.cli("peers", "edit", peer, "--remove-fingerprint", new_pin)
    assert last.returncode == 2 and "only pin" in last.stderr
    edits = [e["detail"] for e in json.loads(gw.cli("audit", "--json").stdout) if e["event"] == "peer_edited"]
    assert any(f"{old_pin},{new_pin}" in d for d in edits)
