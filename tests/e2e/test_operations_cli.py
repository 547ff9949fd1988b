"""The operations commands as an admin types them: `peers add|edit|rm|ls|export`, `route test`,
`web hash-password`, and a running gateway serving its page on [web] port with a hashed password."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from adapters.lab.localpeers import free_port
from adapters.lab.synthetic import generate_ct_study
from tests.e2e.test_gateway_process import GatewayProcess
from tests.helpers import REPO, wait_for

A = "radiology.hospital-a@helsenett.test"
B = "radiology.hospital-b@helsenett.test"
C = "archive.hospital-c@helsenett.test"
RULES = """
[routing]
default_destination = "radiology.hospital-b"

[[routing.rules]]
name = "trauma"
destinations = ["radiology.hospital-b", "archive.hospital-c"]
priority = "stat"
tags = { StudyDescription = "re:(?i)trauma" }

[[routing.rules]]
name = "mr from MR01"
destinations = ["radiology.hospital-b"]
calling_ae = "MR01"
modality = "MR"
"""


def test_peers_add_edit_rm_ls_and_export(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path / "site")
    added = gw.cli("peers", "add", B, "--name", "Radiology, Hospital B", "--fingerprint", "ab" * 32,
                   "--max-concurrent", "2", "--schedule", "mon-fri 18:00-07:00; sat,sun 00:00-24:00")
    assert added.returncode == 0, added.stderr
    assert gw.cli("peers", "add", C, "--directions", "send", "--destinations", "oncology.hospital-c").returncode == 0
    bad = gw.cli("peers", "edit", B, "--schedule", "nights")
    assert bad.returncode == 2 and "transfer window 'nights': write [DAYS] HH:MM-HH:MM" in bad.stderr
    assert gw.cli("peers", "edit", "nobody.nowhere@helsenett.test", "--max-concurrent", "3").returncode == 1
    assert gw.cli("peers", "edit", B, "--schedule", "22:00-06:00").returncode == 0
    peers = {p["jid"]: p for p in json.loads(gw.cli("peers", "ls", "--json").stdout)}
    assert peers[B]["name"] == "Radiology, Hospital B" and peers[B]["fingerprint"] == "ab" * 32
    assert (peers[B]["max_concurrent"], peers[B]["schedule"], peers[B]["directions"]) == (2, "22:00-06:00", "both")
    assert (peers[C]["directions"], peers[C]["destinations"]) == ("send", ["oncology.hospital-c"])
    shown = gw.cli("peers", "ls")
    assert "22:00-06:00" in shown.stdout and "Radiology, Hospital B" in shown.stdout

    no_jid = gw.cli("peers", "export", "prosody")
    assert no_jid.returncode == 1 and "no JID of this gateway ([xmpp] jid)" in no_jid.stderr
    with gw.config.open("a") as fh:
        fh.write(f'[xmpp]\njid = "{A}/gw1"\npassword = "x"\n')
    gw.config.chmod(0o600)
    prosody = gw.cli("peers", "export", "prosody", "--group", "Helse Vest gateways")
    assert prosody.returncode == 0, prosody.stderr
    assert prosody.stdout == (f"[Helse Vest gateways: {C} + {A}]\n{C}={C}\n{A}={A}\n"  # one group per pair
                              f"[Helse Vest gateways: {A} + {B}]\n{A}={A}\n{B}=Radiology, Hospital B\n")
    ejabberd = gw.cli("peers", "export", "ejabberd").stdout.splitlines()
    assert len(ejabberd) == 6 and [line.split()[1] for line in ejabberd] == ["srg_create", "srg_user_add", "srg_user_add"] * 2
    assert f"'DICOM gateways: {A} + {B}' 'dicomgw peers export'" in ejabberd[3]
    assert ejabberd[4:6] == [f"ejabberdctl srg_user_add {user} helsenett.test {ejabberd[3].split()[2]} helsenett.test"
                             for user in sorted((A.split("@")[0], B.split("@")[0]))]

    assert gw.cli("peers", "rm", C).returncode == 0
    assert [p["jid"] for p in json.loads(gw.cli("peers", "ls", "--json").stdout)] == [B]
    assert {p["jid"]: p["allowed"] for p in json.loads(gw.cli("peers", "ls", "--all", "--json").stdout)} == {B: True, C: False}
    audit = [e["detail"] for e in json.loads(gw.cli("audit", "--json").stdout) if e["event"].startswith("peer_")]
    assert f"{B}; schedule 'mon-fri 18:00-07:00; sat,sun 00:00-24:00' -> '22:00-06:00'" in audit
    assert f"{C} may no longer exchange studies" in audit
    (c_added,) = [d for d in audit if d.startswith(f"{C} may exchange studies")]
    assert "directions 'both' -> 'send'" in c_added and "destinations '' -> 'oncology.hospital-c'" in c_added


def test_route_test_says_which_rule_matches_and_why_not_the_others(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path / "site")
    with gw.config.open("a") as fh:
        fh.write(RULES)
    trauma = generate_ct_study(tmp_path / "t", series=1, slices_per_series=1, rows=16, columns=16, study_description="CT Trauma neck")
    plain = generate_ct_study(tmp_path / "p", series=1, slices_per_series=1, rows=16, columns=16, study_description="CT thorax")
    out = gw.cli("route", "test", str(trauma.files[0]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "rule 'trauma' matches: StudyDescription 'CT Trauma neck' is /(?i)trauma/ -> radiology.hospital-b, archive.hospital-c (stat)",
        "=> radiology.hospital-b, archive.hospital-c (stat)",
    ]
    out = gw.cli("route", "test", str(plain.files[0]), "--calling-ae", "MR01", "--json")
    verdict = json.loads(out.stdout)
    assert (verdict["rule"], verdict["destinations"], verdict["priority"]) == ("default_destination", ["radiology.hospital-b"], "routine")
    assert verdict["explanation"] == [
        "rule 'trauma' does not match: StudyDescription 'CT thorax' is not /(?i)trauma/",
        "rule 'mr from MR01' does not match: modality 'CT' is not 'MR'",
        "no rule matched: default_destination -> radiology.hospital-b (routine)",
    ]
    missing = gw.cli("route", "test", str(tmp_path / "nothing.dcm"))
    assert missing.returncode == 2 and "nothing.dcm" in missing.stderr
    with gw.config.open("a") as fh:
        fh.write('\n[[routing.rules]]\nname = "urgent"\ndestinations = ["x.y"]\ntags = { "0040,1003" = "URGENT" }\n')
    warned = gw.cli("route", "test", str(plain.files[0]))
    assert warned.returncode == 0 and ("warning: rule 'urgent': tags.0040,1003 'URGENT' can never match: 0040,1003 is "
                                       "one of STAT, HIGH, ROUTINE, MEDIUM, LOW (compared ignoring case)") in warned.stderr
    with gw.config.open("a") as fh:
        fh.write('\n[[routing.rules]]\nname = "broken"\ndestinations = ["x.y"]\npriority = "urgent"\n')
    broken = gw.cli("route", "test", str(plain.files[0]))
    assert broken.returncode != 0 and "routing rule 'broken': priority 'urgent'" in broken.stderr


def test_the_running_gateway_serves_its_page_behind_a_hashed_password(tmp_path: Path) -> None:
    made = subprocess.run([sys.executable, "-m", "gateway", "web", "hash-password", "--password-stdin"], cwd=REPO,
                          input="a long enough password\n", capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and made.stdout.startswith("pbkdf2_sha256$310000$")
    short = subprocess.run([sys.executable, "-m", "gateway", "web", "hash-password", "--password-stdin"], cwd=REPO,
                           input="short\n", capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "at least 12 characters" in short.stderr
    gw = GatewayProcess(tmp_path / "site")
    port = free_port()
    with gw.config.open("a") as fh:
        fh.write(f'[web]\nport = {port}\nauth_user = "pacsadmin"\nauth_password_hash = "{made.stdout.strip()}"\n')
    gw.start()
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: _status(url) == 401, 30, 0.1, what="the web page to answer")
        page = httpx.get(url, auth=("pacsadmin", "a long enough password"), timeout=10)
        assert page.status_code == 200 and "XMPP: <span class=\"bad\">not configured</span>" in page.text
        assert "Gateway: <span class=\"ok\">running</span>" in page.text  # its heartbeat, as `dicomgw status` reads it
        assert re.search(r'id="spool">Spool: <span class="ok">[\d,]+ MB free</span>, 1,024 MB kept for\s+this site', page.text), page.text
        metrics = httpx.get(url + "metrics", auth=("pacsadmin", "a long enough password"), timeout=10).text
        assert 'dicomgw_queue_units{direction="out",state="received"} 0.0' in metrics
        assert "dicomgw_xmpp_connected 0.0" in metrics
        free = re.search(r"^dicomgw_spool_free_bytes (\S+)$", metrics, re.MULTILINE)  # what an alert rule reads
        assert free is not None, metrics
        on_disk = shutil.disk_usage(gw.workdir).free
        assert 0 < float(free.group(1)) and abs(float(free.group(1)) - on_disk) < 0.05 * on_disk
        assert "dicomgw_spool_reserve_bytes 1.024e+09" in metrics  # the default [paths] spool_reserve_mb
    finally:
        gw.stop()
    log = (gw.workdir / "gateway.log").read_text()
    assert "a long enough password" not in log


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_the_web_page_over_tls_takes_only_a_client_certificate_from_the_admins_ca(tmp_path: Path) -> None:
    import ssl

    from adapters.lab.localpeers import make_test_pki

    server_ca, server_cert, server_key = make_test_pki(tmp_path / "server", "localhost")
    admins_ca, admin_cert, admin_key = make_test_pki(tmp_path / "admins", "pacsadmin")
    _other_ca, stranger_cert, stranger_key = make_test_pki(tmp_path / "others", "stranger")
    gw = GatewayProcess(tmp_path / "site")
    port = free_port()
    with gw.config.open("a") as fh:
        fh.write(f'[web]\nport = {port}\ntls_cert_file = "{server_cert}"\ntls_key_file = "{server_key}"\n'
                 f'client_ca_file = "{admins_ca}"\n')
    gw.start()
    try:
        url = f"https://localhost:{port}/"

        def fetch(cert: tuple[str, str] | None) -> int | str:
            context = ssl.create_default_context(cafile=str(server_ca))
            if cert is not None:
                context.load_cert_chain(*cert)
            try:
                return httpx.get(url, verify=context, timeout=5).status_code
            except httpx.HTTPError as exc:
                return type(exc).__name__

        wait_for(lambda: fetch((str(admin_cert), str(admin_key))) == 200, 30, 0.1, what="the page over TLS")
        assert isinstance(fetch(None), str)  # no client certificate: the handshake is refused (no HTTP answer)
        assert isinstance(fetch((str(stranger_cert), str(stranger_key))), str)  # a certificate from another CA: refused
    finally:
        gw.stop()
