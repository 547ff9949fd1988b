"""Priority benchmark (issue 10): a STAT study on a link busy with a large routine study, against the same
size of STAT study on the idle link.

The health network is emulated as in ``bench/wan``: each gateway reaches Prosody through relays
(``adapters.lab.netem``) for its c2s and its proxy65 connections that share one line per gateway
(``SharedLink``, ``--rate-mbit``, default 10 Mbit/s per direction), each relay delaying each direction by a
quarter of ``--rtt-ms`` (27 ms gateway to gateway, as measured in the field study). A routes by a rule:
Study Description matching ``trauma`` is ``stat``, the rest routine, both to B; B imports into Orthanc.
Studies are phantom CT slices (``adapters.lab.synthetic.phantom_slice``) unless ``--random``.

1. idle: a STAT study (``--stat-mb``) is pushed into A with dcmtk's storescu; its time is from the start of
   the push to the moment Orthanc at B holds every instance (REST ``/tools/lookup``);
2. busy: a routine study (``--routine-mb``) is pushed and, once A streams it (``--busy-after`` of its bundle
   sent), a second STAT study of the same size; timed the same way; then the routine study is waited for
   until Orthanc holds all of it and A has B's delivery receipt.

The last line is one JSON object: ``stat_idle_s``, ``stat_busy_s``, ``stat_busy_vs_idle`` (target <= 1.5),
``routine_completed`` (every routine instance in Orthanc, the unit delivered, SHA-256 equal at both ends),
``stat_before_routine`` (the STAT study was complete in Orthanc while the routine one was not) and the
routine study's own time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sqlite3
import subprocess
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters.lab.localpeers import Orthanc, Prosody, nodelay_env
from adapters.lab.netem import FaultRelay, SharedLink
from adapters.lab.synthetic import generate_ct_study
from bench.transfer import DOMAIN, GatewayProcess, identity

A_USER, B_USER = "radiology.hospital-a", "radiology.hospital-b"
SLICE_BYTES = 512 * 512 * 2 + 1400
RULES = (
    '[[routing.rules]]\nname = "trauma"\ndestinations = ["radiology.hospital-b"]\npriority = "stat"\n'
    'tags = { StudyDescription = "re:(?i)trauma" }\n'
)


def in_pacs(orthanc: Orthanc, study_uid: str) -> int:
    """How many instances of the study Orthanc holds (0 before the first)."""
    request = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}/tools/lookup", data=study_uid.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        found = [m for m in json.loads(response.read()) if m.get("Type") == "Study"]
    return len(orthanc.rest(f"/studies/{found[0]['ID']}/instances")) if found else 0


def unit_row(gateway: GatewayProcess, study_uid: str) -> tuple[str, int, int] | None:
    """(state, progress bytes, bundle bytes) of A's unit of the study, read-only from its queue DB."""
    with contextlib.closing(sqlite3.connect(f"file:{gateway.workdir / 'queue.db'}?mode=ro", uri=True, timeout=5)) as conn:
        row = conn.execute("SELECT state, progress_bytes, bundle_bytes FROM study_units WHERE study_instance_uid = ?"
                           " ORDER BY id LIMIT 1", (study_uid,)).fetchone()
    return (row[0], int(row[1] or 0), int(row[2] or 0)) if row else None


def push(gateway: GatewayProcess, files: list[Path]) -> None:
    done = subprocess.run(["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "DICOMGW", "127.0.0.1", str(gateway.port),
                           *map(str, files)], env=nodelay_env(), capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])


def wait(what: str, check: Any, timeout_s: float, interval_s: float = 0.1) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(interval_s)
    raise TimeoutError(f"{what} after {timeout_s:g} s")


def timed_stat(a: GatewayProcess, orthanc: Orthanc, study: Any) -> float:
    started = time.monotonic()
    push(a, study.files)
    ended = wait("the STAT study in Orthanc", lambda: in_pacs(orthanc, study.study_instance_uid) == len(study.files), 1800, 0.1)
    return ended - started


def timeline(gateway: GatewayProcess, study_uid: str, since: str) -> list[str]:
    """The study's state moves and transfer attempts at one gateway, as seconds after ``since`` (ISO, UTC)."""
    start = datetime.fromisoformat(since)
    moves = [e for e in gateway.cli("audit", "--limit", "5000") if e.get("study_instance_uid") == study_uid and e.get("to_state")]
    return [f"{(datetime.fromisoformat(e['at']) - start).total_seconds():7.2f} s {e['from_state']} -> {e['to_state']}"
            for e in sorted(moves, key=lambda e: e["at"])]


def same_hashes(a: GatewayProcess, b: GatewayProcess, study_uid: str) -> bool:
    sent = a.cli("queue", "show", study_uid)["instances"]
    got = b.cli("queue", "show", study_uid)["instances"]
    return sorted((i["sop_instance_uid"], i["sha256"]) for i in sent) == sorted((i["sop_instance_uid"], i["sha256"]) for i in got)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate-mbit", type=float, default=10.0)
    parser.add_argument("--rtt-ms", type=float, default=27.0)
    parser.add_argument("--stat-mb", type=float, default=10.0)
    parser.add_argument("--routine-mb", type=float, default=1000.0)
    parser.add_argument("--busy-after", type=float, default=0.05, help="fraction of the routine bundle sent before the STAT push")
    parser.add_argument("--random", action="store_true", help="random pixels (nothing to compress) instead of the phantom")
    parser.add_argument("--quick", action="store_true", help="5 MB STAT, 100 MB routine")
    parser.add_argument("--timeline", action="store_true", help="print each STAT study's state moves at A and at B")
    args = parser.parse_args()
    stat_mb, routine_mb = (5.0, 100.0) if args.quick else (args.stat_mb, args.routine_mb)
    rate = args.rate_mbit * 1e6 / 8
    one_way = args.rtt_ms / 4 / 1000
    work = Path(tempfile.mkdtemp(prefix="dicomgw-priority-"))
    server = Prosody(work / "prosody", domain=DOMAIN)
    for user in (A_USER, B_USER):
        server.add_account(user, f"pw-{user}")
    lines = {side: SharedLink(rate) for side in "ab"}
    relays = {side: (FaultRelay(server.c2s_port, one_way, link=lines[side]), FaultRelay(server.proxy_port, one_way, link=lines[side]))
              for side in "ab"}
    orthanc = Orthanc(work / "orthanc")
    a = b = None
    try:
        phantom = not args.random
        stat_slices = max(1, round(stat_mb * 1e6 / SLICE_BYTES))
        idle_study = generate_ct_study(work / "stat1", 1, stat_slices, seed=11, study_description="CT TRAUMA HEAD", phantom=phantom)
        busy_study = generate_ct_study(work / "stat2", 1, stat_slices, seed=12, study_description="CT TRAUMA HEAD", phantom=phantom)
        routine = generate_ct_study(work / "routine", 1, max(1, round(routine_mb * 1e6 / SLICE_BYTES)), seed=13,
                                    study_description="CT THORAX FOLLOW-UP", phantom=phantom)
        print(f"STAT studies {idle_study.size_bytes / 1e6:.1f} MB, routine {routine.size_bytes / 1e6:.1f} MB "
              f"({'phantom' if phantom else 'random'}); line {args.rate_mbit:g} Mbit/s per gateway, RTT {args.rtt_ms:g} ms", flush=True)
        server.start()
        orthanc.start()
        a_fp, b_fp = identity(work / "a"), identity(work / "b")
        b = GatewayProcess(work / "b", B_USER, server, A_USER, peer_fingerprint=a_fp,
                           xmpp=f's5b_proxy = "127.0.0.1:{relays["b"][1].port}"\ns5b_idle_timeout_s = 600\n')
        b.text += f'[pacs]\nae_title = "{orthanc.ae_title}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        a = GatewayProcess(work / "a", A_USER, server, B_USER, B_USER, peer_fingerprint=b_fp,
                           xmpp=f's5b_proxy = "127.0.0.1:{relays["a"][1].port}"\nverdict_timeout_s = 3600\n'
                                'receipt_timeout_s = 7200\n')
        a.text += RULES
        for gateway, side in ((a, "a"), (b, "b")):
            gateway.text = gateway.text.replace(f"port = {server.c2s_port}\n", f"port = {relays[side][0].port}\n")
        b.start()
        a.start()
        idle_at = datetime.now(UTC).replace(tzinfo=None).isoformat()
        stat_idle_s = timed_stat(a, orthanc, idle_study)
        print(f"STAT on the idle link: {stat_idle_s:.2f} s to B's PACS", flush=True)

        routine_started = time.monotonic()
        push(a, routine.files)
        wait("A streaming the routine study", lambda: (u := unit_row(a, routine.study_instance_uid)) is not None
             and u[0] == "sending" and u[1] >= args.busy_after * u[2] > 0, 3600, 0.2)
        busy_at = datetime.now(UTC).replace(tzinfo=None).isoformat()
        stat_busy_s = timed_stat(a, orthanc, busy_study)
        routine_in_pacs_then = in_pacs(orthanc, routine.study_instance_uid)
        progress = unit_row(a, routine.study_instance_uid)
        print(f"STAT while the routine study streams: {stat_busy_s:.2f} s to B's PACS (routine then: {progress[1] / 1e6:.0f} of "
              f"{progress[2] / 1e6:.0f} MB sent, {routine_in_pacs_then} of {len(routine.files)} instances in the PACS)", flush=True)
        wait("the routine study in Orthanc", lambda: in_pacs(orthanc, routine.study_instance_uid) == len(routine.files), 7200, 1.0)
        wait("A's delivery receipt for the routine study", lambda: unit_row(a, routine.study_instance_uid)[0] == "delivered", 600, 0.5)
        routine_s = time.monotonic() - routine_started
        completed = same_hashes(a, b, routine.study_instance_uid)
        if args.timeline:
            for label, study, since in (("idle", idle_study, idle_at), ("busy", busy_study, busy_at)):
                for side, gateway in (("A", a), ("B", b)):
                    print(f"STAT {label} at {side}:", *timeline(gateway, study.study_instance_uid, since), sep="\n  ")
        print(f"routine study: {routine_s:.1f} s from push to receipt, every instance in the PACS, SHA-256 equal: {completed}", flush=True)
        summary = {
            "rate_mbit": args.rate_mbit, "rtt_ms": args.rtt_ms, "phantom": phantom,
            "stat_mb": round(idle_study.size_bytes / 1e6, 1), "routine_mb": round(routine.size_bytes / 1e6, 1),
            "stat_idle_s": round(stat_idle_s, 2), "stat_busy_s": round(stat_busy_s, 2),
            "stat_busy_vs_idle": round(stat_busy_s / stat_idle_s, 3),
            "stat_before_routine": routine_in_pacs_then < len(routine.files),
            "routine_s": round(routine_s, 1), "routine_completed": completed,
        }
        print(json.dumps(summary))
    finally:
        for gateway in (a, b):
            if gateway is not None:
                gateway.stop()
        orthanc.stop()
        server.stop()
        for pair in relays.values():
            for relay in pair:
                relay.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
