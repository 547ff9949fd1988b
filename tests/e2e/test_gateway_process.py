"""The gateway as an admin runs it: ``dicomgw run --config FILE`` in its own process, driven by dcmtk, read
back through ``dicomgw queue``. Readiness is polled with a deadline; every process is stopped by PID."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.lab.synthetic import generate_ct_study
from tests.helpers import (
    REPO,
    dataset_bytes,
    dcmtk_env,
    free_port,
    port_open,
    storescu,
    wait_for,
)


class GatewayProcess:
    def __init__(self, workdir: Path, stable_age_s: float = 1.0) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config = workdir / "conf" / "gateway.toml"
        self.config.parent.mkdir(parents=True, exist_ok=True)
        # Relative paths on purpose: they must resolve under base_dir (the work dir), as in the shipped sample.
        self.config.write_text(
            f"""base_dir = ".."
[dicom]
ae_title = "DICOMGW"
port = {self.port}
allowed_calling_ae_titles = ["STORESCU", "ECHOSCU"]
[paths]
spool_dir = "var/spool"
watch_dir = "var/incoming"
quarantine_dir = "var/quarantine"
[queue]
db_url = "sqlite:///var/queue.db"
stable_age_s = {stable_age_s}
association_pause_s = 120
stable_check_interval_s = 0.2
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log_path = self.workdir / "gateway.log"
        readies = log_path.read_bytes().count(b"gateway ready") if log_path.exists() else 0  # a restart appends
        log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(self.config)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
        # Ready is the log line written once every listener and the watched folder have started (the SCP port
        # opens first: on a loaded machine the watcher may start seconds later).
        wait_for(lambda: log_path.read_bytes().count(b"gateway ready") > readies or self.proc.poll() is not None,
                 60, 0.1, what="the gateway's 'gateway ready' log line")
        assert self.proc.poll() is None, (self.workdir / "gateway.log").read_text()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args, "--config", str(self.config)],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        )

    def queue_json(self, *args: str) -> object:
        result = self.cli("queue", *args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path / "site")
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def test_paths_in_config_resolve_under_base_dir(gateway: GatewayProcess) -> None:
    assert (gateway.workdir / "var" / "queue.db").exists()
    assert (gateway.workdir / "var" / "spool" / "studies").is_dir()
    assert (gateway.workdir / "var" / "incoming").is_dir()


def test_queue_cli_shows_the_pushed_study_until_stable(gateway: GatewayProcess, tmp_path: Path) -> None:
    study = generate_ct_study(tmp_path / "ct", series=2, slices_per_series=20, rows=64, columns=64, study_description="CT ABDOMEN")
    assert storescu(gateway.port, study.files).returncode == 0
    rows = wait_for(
        lambda: [r for r in gateway.queue_json() if r["state"] == "stable"], 20, what="the study to become stable"
    )
    (row,) = rows
    assert (row["study_uid"], row["instances"], row["modalities"]) == (study.study_instance_uid, 40, "CT")
    assert row["study_description"] == "CT ABDOMEN"
    assert gateway.queue_json("--state", "received") == []

    shown = gateway.queue_json("show", study.study_instance_uid)
    assert {i["sop_instance_uid"] for i in shown["instances"]} == set(study.sop_instance_uids)
    assert [s["instances"] for s in shown["series"]] == [20, 20]
    assert row["bytes"] == sum(i["bytes"] for i in shown["instances"])
    for inst in shown["instances"]:
        assert inst["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2"
        assert inst["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
        spooled = gateway.workdir / "var" / "spool" / inst["spool_path"]
        assert inst["bytes"] == spooled.stat().st_size
        assert inst["sha256"] == hashlib.sha256(spooled.read_bytes()).hexdigest()

    table = gateway.cli("queue")
    assert study.study_instance_uid in table.stdout and "stable" in table.stdout and "CT ABDOMEN" in table.stdout
    missing = gateway.cli("queue", "show", "1.2.3.999")
    assert missing.returncode == 1 and "no study 1.2.3.999" in missing.stderr


def test_echo_command_against_the_running_gateway(gateway: GatewayProcess) -> None:
    ok = gateway.cli("echo", f"DICOMGW@127.0.0.1:{gateway.port}", "--calling-ae", "ECHOSCU")
    assert ok.returncode == 0 and "Success" in ok.stdout
    refused = gateway.cli("echo", f"DICOMGW@127.0.0.1:{gateway.port}", "--calling-ae", "STRANGER")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "association rejected" in refused.stdout and "Calling AE title not recognised" in refused.stdout


def test_sigkill_mid_transfer_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path / "site", stable_age_s=3600)
    gw.start()
    study = generate_ct_study(tmp_path / "ct", series=2, slices_per_series=200, rows=128, columns=128)
    sender = subprocess.Popen(
        ["storescu", "-v", "-aet", "STORESCU", "-aec", "DICOMGW", "127.0.0.1", str(gw.port), *map(str, study.files)],
        env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    responses: list[str] = []
    killed = threading.Event()

    def read_responses() -> None:
        assert sender.stdout is not None
        for line in sender.stdout:
            if "Received Store Response" in line:
                responses.append(line.strip())
                if len(responses) == 60 and not killed.is_set():
                    gw.kill(signal.SIGKILL)
                    killed.set()

    reader = threading.Thread(target=read_responses)
    reader.start()
    try:
        sender.wait(120)
        reader.join(30)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
        gw.kill()
    assert killed.is_set(), "the gateway finished before it could be killed mid-run"
    acknowledged = 0
    for line in responses:
        if "(Success)" not in line:
            break
        acknowledged += 1
    assert 60 <= acknowledged < len(study.files)

    db_path = gw.workdir / "var" / "queue.db"
    gw.start()  # restart: migrations, spool recovery
    try:
        wait_for(lambda: port_open(gw.port), 30, what="the restarted gateway")
        with sqlite3.connect(db_path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        shown = gw.queue_json("show", study.study_instance_uid)
        by_uid = {i["sop_instance_uid"]: i for i in shown["instances"]}
        for path, uid in list(zip(study.files, study.sop_instance_uids, strict=True))[:acknowledged]:
            assert uid in by_uid, f"acknowledged {uid} lost"
            spooled = gw.workdir / "var" / "spool" / by_uid[uid]["spool_path"]
            assert hashlib.sha256(spooled.read_bytes()).hexdigest() == by_uid[uid]["sha256"]
            assert dataset_bytes(spooled) == dataset_bytes(path)
        assert list((gw.workdir / "var" / "spool" / ".incoming").iterdir()) == []
    finally:
        gw.stop()


def test_demo_runs_the_chain_and_reports_json() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--json"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["instances_sent"] == result["instances_acknowledged"] == result["instances_queued"] == 120
    assert (result["state_a"], result["state_b"], result["method"]) == ("delivered", "delivered", "s5b")
    assert result["instances_received_b"] == result["instances_in_pacs"] == 120
    assert result["delivered"] is True and result["pacs"] == "orthanc"
    assert set(result["stages_s"]) >= {"ingest_s", "stable_wait_s", "transfer_s", "import_s", "receipt_s", "total_s"}
    # The modality's Scheduled Workflow: MPPS made the study complete at once, the commitment report came back.
    assert result["mpps_completed"] is True and result["stable_after_mpps_s"] < 10, (result, done.stderr[-3000:])
    assert (result["commitment"]["event_type"], result["commitment"]["committed"], result["commitment"]["failed"]) == (1, 120, 0)


def test_demo_without_orthanc_uses_the_labelled_built_in_scp() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--builtin-pacs"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "PACS of hospital B: built-in storage SCP (a stand-in for a PACS): asked for with --builtin-pacs" in done.stdout
    assert "summary: 120 of 120 instances in B's PACS, delivered (A's queue)" in done.stdout
    # whole, should it fail: a commitment report missed (its lab modality waits 30 s for it) shows there and in stderr
    assert "completeness by MPPS after" in done.stdout and "commitment report from the gateway after" in done.stdout, (
        done.stdout + done.stderr[-3000:])


def test_with_json_logs_every_line_the_gateway_writes_is_json(tmp_path: Path) -> None:
    """A gateway run with --log-format json, a study pushed, a file that is not DICOM and one whose name is not
    UTF-8 in the watched folder, a DICOM file whose Series Instance UID makes pydicom warn (a UserWarning was
    printed raw before), then SIGTERM: every line of its output parses as one JSON object."""
    import os

    import pydicom

    gw = GatewayProcess(tmp_path / "site")
    gw.config.write_text(gw.config.read_text() + '\n[log]\nformat = "json"\n')
    gw.start()
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=2, rows=16, columns=16,
                                  study_description="D" * 65)
        assert storescu(gw.port, study.files).returncode == 0
        incoming = os.fsencode(gw.workdir / "var" / "incoming")
        with open(incoming + b"/bad\xff.dcm", "wb") as fh:
            fh.write(b"not dicom")
        odd = pydicom.dcmread(study.files[0])
        odd.SOPInstanceUID = odd.file_meta.MediaStorageSOPInstanceUID = "1.2.3.99"
        odd.SeriesInstanceUID = "1.2.3.abc"  # not a valid UI value: pydicom warns when it reads it
        odd.save_as(gw.workdir / "var" / "incoming" / "odd.dcm")
        wait_for(lambda: b"quarantined" in (gw.workdir / "gateway.log").read_bytes(), 30, 0.1, what="the bad file quarantined")
        wait_for(lambda: b"Invalid value for VR UI" in (gw.workdir / "gateway.log").read_bytes(), 30, 0.1,
                 what="pydicom's warning about the odd file")
    finally:
        gw.stop()
    lines = [line for line in (gw.workdir / "gateway.log").read_text(errors="replace").splitlines() if line.strip()]
    assert lines
    for line in lines:
        json.loads(line)  # raises on the first line that is not one JSON object


def test_status_tells_whether_the_gateway_runs(tmp_path: Path) -> None:
    """`dicomgw status` by heartbeat: running with its listeners while it runs (no [xmpp]: no 'no XMPP status'
    failure); after SIGTERM 'not running' with exit 0; after SIGKILL 'not running' with no clean exit, and the
    exit status says so each time. The web page and /metrics (dicomgw_up) say the same."""
    gw = GatewayProcess(tmp_path / "site")
    web_port = free_port()
    with gw.config.open("a") as fh:
        fh.write(f"[web]\nport = {web_port}\n")
    never = gw.cli("status", "--json")
    assert never.returncode == 1 and json.loads(never.stdout)["running"] is False
    gw.start()
    try:
        result = gw.cli("status", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        status = json.loads(result.stdout)
        assert status["running"] is True and status["state"] == "not configured" and status["last_heartbeat_at"]
        (process,) = status["processes"]
        assert process["running"] and process["listeners"]["dicom"].endswith(f":{gw.port}")
        assert process["listeners"]["web"].endswith(f":{web_port}")
        assert process["listeners"]["watcher"]["running"] is True
        assert f":{gw.proc.pid}:" in process["owner"]
        text = gw.cli("status")
        assert text.returncode == 0 and "gateway: running" in text.stdout and "not configured" in text.stdout
        spool = status["spool"]  # the spool's room, against the reserve kept for the site's modalities
        assert spool["dir"] == str(gw.workdir / "var" / "spool") and spool["reserve_bytes"] == 1024 * 10**6
        assert spool["free_bytes"] > 0 and spool["low"] is (spool["free_bytes"] < 1024 * 10**6)
        assert f"MB free on {gw.workdir / 'var' / 'spool'} (1,024 MB kept for this site's modalities)" in text.stdout
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=30) as answer:
            metrics = answer.read().decode()
        assert "dicomgw_up 1.0" in metrics and 'dicomgw_processes{state="running"} 1.0' in metrics
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/", timeout=30) as answer:
            assert ">running</span>" in answer.read().decode()
    finally:
        gw.stop()
    stopped = gw.cli("status", "--json")
    assert stopped.returncode == 1
    status = json.loads(stopped.stdout)
    assert status["running"] is False and status["processes"][0]["exit_code"] == 0
    assert "not running (last heard" in gw.cli("status").stdout and "exit 0" in gw.cli("status").stdout

    gw.start()
    gw.kill(signal.SIGKILL)
    killed = gw.cli("status")
    assert killed.returncode == 1 and "gateway: NOT RUNNING" in killed.stdout
    assert "no clean exit: killed or lost" in killed.stdout, killed.stdout


def test_config_before_or_after_the_command_and_from_the_environment(tmp_path: Path) -> None:
    """`dicomgw --config X queue`, `dicomgw queue --config X` and DICOMGW_CONFIG=X all read X; `--help` says so;
    `testdata` writes a study (no numpy) that the gateway takes."""
    gw = GatewayProcess(tmp_path / "site")
    run = lambda *args, env=None: subprocess.run([sys.executable, "-m", "gateway", *args], cwd=tmp_path,  # noqa: E731
                                                 capture_output=True, text=True, timeout=60, env=env)
    before = run("--config", str(gw.config), "queue", "--json")
    after = run("queue", "--json", "--config", str(gw.config))
    env = {**os.environ, "DICOMGW_CONFIG": str(gw.config)}
    from_env = run("queue", "--json", env=env)
    assert before.returncode == after.returncode == from_env.returncode == 0, before.stderr + after.stderr + from_env.stderr
    assert (gw.workdir / "var" / "queue.db").exists()  # X's queue, not one under the working directory
    missing = run("queue")  # neither: conf/gateway.toml relative to the working directory, named in the error
    assert missing.returncode == 2 and "conf/gateway.toml" in missing.stderr
    assert "DICOMGW_CONFIG" in run("--help").stdout and "DICOMGW_CONFIG" in run("queue", "--help").stdout
    made = run("testdata", str(tmp_path / "td"), "--slices", "3", "--size", "32")
    assert made.returncode == 0 and len(list((tmp_path / "td").glob("*.dcm"))) == 3
    gw.start()
    try:
        assert storescu(gw.port, sorted((tmp_path / "td").glob("*.dcm"))).returncode == 0
        wait_for(lambda: [r["instances"] for r in gw.queue_json()] == [3], 30, 0.2, what="the test study queued")
    finally:
        gw.stop()


def test_a_queue_database_that_cannot_be_used_is_said_in_one_line_without_its_password(tmp_path: Path) -> None:
    """A PostgreSQL that does not answer, an SQLite path that is a folder: every command, ``run`` included, says
    which database (its password hidden) and why in one line, exit code 3; no traceback."""
    closed = free_port()  # nothing listens there
    folder = tmp_path / "a-folder"
    folder.mkdir()
    for db_url, why in ((f"postgresql+psycopg://gw:s3cret-pw@127.0.0.1:{closed}/queue", "Connection refused"),
                        (f"sqlite:///{folder}", "unable to open database file")):
        config = tmp_path / "gateway.toml"
        config.write_text(f'[queue]\ndb_url = "{db_url}"\n[paths]\nspool_dir = "{tmp_path}/spool"\nwatch_dir = ""\n'
                          f'quarantine_dir = "{tmp_path}/quarantine"\n[dicom]\nport = {free_port()}\n')
        for command in (["queue"], ["status"], ["audit"], ["run"]):
            done = subprocess.run([sys.executable, "-m", "gateway", *command, "--config", str(config)], cwd=REPO,
                                  capture_output=True, text=True, timeout=120)
            said = done.stderr.strip()
            assert done.returncode == 3, (command, done.returncode, said[-2000:])
            assert len(said.splitlines()) == 1 and "Traceback" not in said, (command, said[-2000:])
            assert "cannot be used" in said and why in said, (command, said)
            assert "s3cret-pw" not in said
            if "postgresql" in db_url:
                assert f"gw:***@127.0.0.1:{closed}/queue" in said, said


def test_a_port_in_use_or_a_spool_that_is_a_file_stops_the_start_with_its_reason_not_a_traceback(tmp_path: Path) -> None:
    """What `dicomgw run` cannot have at start (its DICOM port taken by another program, a spool or watched
    folder path that is a file, a CA or certificate file that is not there, an identity that is not PEM): exit 1,
    the log's last line names it; `dicomgw status` says the same."""
    import socket

    afile = tmp_path / "afile"
    afile.write_text("")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        password = tmp_path / "xmpp-password"
        password.write_text("not-used-here")
        password.chmod(0o600)
        garbage = tmp_path / "garbage.pem"
        garbage.write_text("not a PEM file\n")
        garbage.chmod(0o600)
        xmpp = (f'[xmpp]\njid = "radiology.hospital-a@helsenett.test"\nservers = ["127.0.0.1:{free_port()}"]\n'
                f'password_file = "{password}"\n')
        for n, (port, spool, watch, said, extra) in enumerate((
                (busy, tmp_path / "spool", "", f"not started: the DICOM port 127.0.0.1:{busy} cannot be listened on: "
                                               "Address already in use", ""),
                (free_port(), afile, "", f"not started: the spool {afile} (quarantine {tmp_path / 'q'}) cannot be used: "
                                         f"Not a directory ({afile}/", ""),
                (free_port(), tmp_path / "spool", afile, f"not started: the watched folder {afile} cannot be used: ", ""),
                (free_port(), tmp_path / "spool", "", f"not started: xmpp.ca_file {tmp_path}/no-ca.pem cannot be read: "
                                                      "No such file or directory", xmpp + f'ca_file = "{tmp_path}/no-ca.pem"\n'),
                (free_port(), tmp_path / "spool", "", "not started: the XMPP side cannot be set up (end-to-end identity, TLS): "
                                                      "Invalid PEM", xmpp + f'identity_key_file = "{garbage}"\n'
                                                                            f'identity_cert_file = "{garbage}"\n'),
                (free_port(), tmp_path / "spool", "", f"not started: web.tls_cert_file {tmp_path}/no.crt cannot be read: "
                                                      "No such file or directory",
                 f'[web]\nport = {free_port()}\ntls_cert_file = "{tmp_path}/no.crt"\ntls_key_file = "{garbage}"\n'))):
            config = tmp_path / "gateway.toml"
            config.write_text(f'[dicom]\nport = {port}\n[queue]\ndb_url = "sqlite:///{tmp_path}/queue-{n}.db"\n'
                              f'[paths]\nspool_dir = "{spool}"\nwatch_dir = "{watch}"\nquarantine_dir = "{tmp_path}/q"\n'
                              + extra)
            done = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", str(config)], cwd=REPO,
                                  capture_output=True, text=True, timeout=120)
            last = done.stderr.strip().splitlines()[-1]
            assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
            assert "CRITICAL" in last and said in last, last
            status = subprocess.run([sys.executable, "-m", "gateway", "status", "--json", "--config", str(config)],
                                    cwd=REPO, capture_output=True, text=True, timeout=60)
            (process,) = json.loads(status.stdout)["processes"]  # this start's own queue: its one process
            assert process["exit_code"] == 1 and said.removeprefix("not started: ") in json.dumps(process), process


def test_sigterm_while_the_xmpp_server_does_not_answer_at_start_stops_the_gateway_at_once(tmp_path: Path) -> None:
    """An XMPP server that takes the connection and never answers: the start waits up to 30 s for it. A SIGTERM
    meanwhile (systemctl restart) ends the process cleanly now: it does not sit out that wait first (it did, and
    then logged 'not reachable yet' on its way out)."""
    import socket
    import time

    with socket.create_server(("127.0.0.1", 0)) as silent:
        password = tmp_path / "password"
        password.write_text("not-used-here")
        password.chmod(0o600)
        config = tmp_path / "gateway.toml"
        config.write_text(f'[dicom]\nport = {free_port()}\n[queue]\ndb_url = "sqlite:///{tmp_path}/queue.db"\n'
                          f'[paths]\nspool_dir = "{tmp_path}/spool"\nwatch_dir = ""\nquarantine_dir = "{tmp_path}/q"\n'
                          f'[xmpp]\njid = "radiology.hospital-a@helsenett.test"\npassword_file = "{password}"\n'
                          f'servers = ["127.0.0.1:{silent.getsockname()[1]}"]\n')
        log_path = tmp_path / "gateway.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config)], cwd=REPO,
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: b"gateway ready" in log_path.read_bytes() or proc.poll() is not None, 60, 0.1,
                     what="the gateway's 'gateway ready' line")
            time.sleep(1.0)  # inside the start's wait for the server, whatever the machine's speed: 30 s of it
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(25) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    text = log_path.read_text()
    assert "gateway stopped" in text and "not reachable yet" not in text, text[-2000:]


def _gateway_on_postgres(tmp_path: Path, seed: int) -> tuple[Any, GatewayProcess, Any]:
    """A private PostgreSQL (started), a gateway configured on it (not started) and a 2-instance study."""
    from adapters.lab.postgres import PrivatePostgres

    database = PrivatePostgres().start()
    gw = GatewayProcess(tmp_path / "site")
    gw.config.write_text(gw.config.read_text().replace('db_url = "sqlite:///var/queue.db"', f'db_url = "{database.url}"'))
    return database, gw, generate_ct_study(tmp_path / "study", series=1, slices_per_series=2, rows=32, columns=32, seed=seed)


def test_the_queue_database_going_away_while_running_is_said_once_and_the_gateway_goes_on(tmp_path: Path) -> None:
    """PostgreSQL stopped at once under a running gateway (a crash, a failover) and started again: the gateway
    stays up; its log says the outage once when it begins and once when it ends, with no traceback; an instance
    sent meanwhile is refused (nothing can be recorded) and taken when the database is back. It used to end the
    process on its first failed tick, after a traceback from every loop."""
    database, gw, study = _gateway_on_postgres(tmp_path, seed=7)
    log_path = gw.workdir / "gateway.log"
    try:
        gw.start()
        database.stop()
        wait_for(lambda: b"queue database unreachable" in log_path.read_bytes(), 60, 0.2, what="the outage said")
        refused = storescu(gw.port, study.files)
        assert gw.proc is not None and gw.proc.poll() is None, log_path.read_text()[-3000:]
        wait_for(lambda: b"the queue database cannot be reached" in log_path.read_bytes(), 30, 0.2,
                 what="the instance refused")
        database.start()
        wait_for(lambda: b"queue database answers again" in log_path.read_bytes(), 60, 0.2, what="the outage's end")
        assert storescu(gw.port, study.files).returncode == 0
        wait_for(lambda: [u["instances"] for u in gw.queue_json()] == [2], 60, 0.2, what="the study queued")
        assert gw.proc.poll() is None
    finally:
        gw.stop()
        database.remove()
    text = log_path.read_text()
    assert text.count("queue database unreachable") == 1 and text.count("queue database answers again") == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    said = refused.stdout + refused.stderr
    assert "Received Store Response" in said and "Store Response (Success)" not in said, said  # never acknowledged


def _c_store(port: int, path: Path) -> tuple[int, str]:
    """One C-STORE by pynetdicom as a modality sends it: the response's Status and Error Comment."""
    import pydicom
    from pynetdicom import AE

    dataset = pydicom.dcmread(path)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW")
    assert assoc.is_established
    try:
        answer = assoc.send_c_store(dataset)
        return int(answer.Status), str(answer.get("ErrorComment", ""))
    finally:
        assoc.release()


def _mpps_create(port: int, study_uid: str) -> tuple[int, str]:
    """One MPPS N-CREATE by pynetdicom, as a modality begins a step: the response's Status and Error Comment."""
    from pydicom.uid import generate_uid
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityPerformedProcedureStep

    from tests.integration.test_mpps import created

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW")
    assert assoc.is_established
    try:
        status, _attributes = assoc.send_n_create(created(study_uid), ModalityPerformedProcedureStep, generate_uid())
        return int(status.Status), str(status.get("ErrorComment", ""))
    finally:
        assoc.release()


def test_a_queue_database_that_answers_but_takes_no_writes_is_said_refused_and_shown_until_it_does(tmp_path: Path) -> None:
    """PostgreSQL made read-only under a running gateway (a failover that left its URL on a standby): the log says
    once that the queue database cannot be written, an instance is refused with Out of Resources and the Error
    Comment naming it (an MPPS N-CREATE with Processing Failure and the same comment), a file dropped in the watched folder stays there (its retry says why), `dicomgw status`
    says READ-ONLY and fails, the process goes on. Writable again: said once ('takes writes again'), the next
    study is taken and so is the watched file, nothing quarantined. It used to end the gateway (psycopg raises read-only as an
    InternalError, which was not counted as an outage)."""
    database, gw, study = _gateway_on_postgres(tmp_path, seed=11)
    log_path = gw.workdir / "gateway.log"
    try:
        gw.start()
        database.read_only(True)
        wait_for(lambda: b"queue database cannot be written: it is read-only" in log_path.read_bytes(), 60, 0.2,
                 what="the read-only database said")
        assert _c_store(gw.port, study.files[0]) == (0xA700, "gateway queue database read-only")
        assert _mpps_create(gw.port, study.study_instance_uid) == (0x0110, "gateway queue database read-only")
        dropped = generate_ct_study(tmp_path / "dropped", series=1, slices_per_series=1, rows=32, columns=32, seed=12).files[0]
        incoming = gw.workdir / "var" / "incoming" / "dropped.dcm"
        incoming.write_bytes(dropped.read_bytes())  # the watched folder: the file stays until it can be recorded
        wait_for(lambda: b"dropped.dcm in " in log_path.read_bytes(), 60, 0.2, what="the watched file's retry said")
        status = gw.cli("status", "--json")
        assert status.returncode == 1, status.stdout + status.stderr
        database_state = json.loads(status.stdout)["queue_database"]
        assert database_state["writable"] is False and database_state["read_only"] is True, database_state
        assert "READ-ONLY (default_transaction_read_only is on)" in gw.cli("status").stdout
        assert gw.proc is not None and gw.proc.poll() is None, log_path.read_text()[-3000:]
        database.read_only(False)
        wait_for(lambda: b"queue database takes writes again" in log_path.read_bytes(), 60, 0.2, what="the outage's end")
        assert storescu(gw.port, study.files).returncode == 0
        wait_for(lambda: sorted(u["instances"] for u in gw.queue_json()) == [1, 2], 90, 0.2,
                 what="the study and the watched file's instance queued")
        assert not incoming.exists() and not any((gw.workdir / "var" / "quarantine").rglob("*.dcm"))
        assert json.loads(gw.cli("status", "--json").stdout)["queue_database"]["writable"] is True
        assert gw.proc.poll() is None
    finally:
        gw.stop()
        database.remove()
    text = log_path.read_text()
    assert text.count("gateway.outage: queue database cannot be written: it is read-only") == 1, text[-3000:]
    assert text.count("queue database takes writes again") == 1 and "answers again" not in text, text[-3000:]
    assert "refusing " in text and "the queue database cannot be written: it is read-only" in text
    assert "dropped.dcm in 10 s: the queue database cannot be written: it is read-only" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
