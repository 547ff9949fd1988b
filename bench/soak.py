"""Soak (issue 9): two gateways, Prosody and Orthanc on loopback, faults injected at random, nothing lost.

Gateway A (hospital A) and gateway B (hospital B, importing into Orthanc as its PACS) run as ``dicomgw run``
processes; each reaches Prosody's c2s and proxy65 ports through its own ``adapters.lab.netem.FaultRelay``
(capped at ``--rate-mbit`` so streams last long enough to be hit). Studies of mixed sizes (log-uniform
between ``--min-mb`` and ``--max-mb``; random pixels, distinct UIDs) are pushed into A with dcmtk's
storescu, one after another; after each push a fault is injected with probability ``--fault-rate``, chosen
in a shuffled round-robin (every kind comes up): a cut of a relayed connection after a random byte count, a stall of a few seconds, Prosody
killed and restarted on its ports, gateway A or B SIGKILLed and restarted, an Orthanc outage of a few
seconds. Bounded: ``--studies`` studies, ``--deadline-s`` seconds for everything to settle.

At the end every instance storescu had acknowledged must be in Orthanc exactly once (looked up by SOP
Instance UID through Orthanc's REST API; B's queue must hold each SOP Instance UID once). The last line is
one JSON object: studies, faults_injected (by kind), instances_acknowledged, instances_in_pacs, lost,
duplicates, and A's ``dicomgw stats``: N, S, F, mtbf_s, T_s. ``--quick`` (CI): 12 small studies.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import random
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from adapters.lab.localpeers import Orthanc, Prosody, nodelay_env
from adapters.lab.netem import FaultRelay
from adapters.lab.synthetic import generate_ct_study
from bench.transfer import DOMAIN, GatewayProcess, identity

A_USER, B_USER = "radiology.hospital-a", "radiology.hospital-b"
SLICE_BYTES = 256 * 256 * 2 + 1400


class Site:
    """One gateway process behind its two relays (c2s, proxy65)."""

    def __init__(self, root: Path, user: str, peer: str, server: Prosody, rate: float, destination: str = "",
                 extra: str = "", fingerprint: str = "") -> None:
        self.c2s = FaultRelay(server.c2s_port, rate_bytes_s=rate)
        self.proxy = FaultRelay(server.proxy_port, rate_bytes_s=rate)
        self.gateway = GatewayProcess(root, user, server, peer, destination,
                                      f's5b_proxy = "127.0.0.1:{self.proxy.port}"\nretry_max_attempts = 1000\n{extra}',
                                      peer_fingerprint=fingerprint)
        self.gateway.text = self.gateway.text.replace(f"port = {server.c2s_port}\n", f"port = {self.c2s.port}\n")

    def restart(self, pause_s: float) -> None:
        if self.gateway.proc is not None and self.gateway.proc.poll() is None:
            self.gateway.proc.send_signal(signal.SIGKILL)
            self.gateway.proc.wait(30)
        time.sleep(pause_s)
        self.gateway.start()

    def stop(self) -> None:
        self.gateway.stop()
        self.c2s.stop()
        self.proxy.stop()


def push(port: int, files: list[Path]) -> bool:
    done = subprocess.run(["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "DICOMGW", "127.0.0.1", str(port), *map(str, files)],
                          env=nodelay_env(), capture_output=True, text=True, timeout=600)
    return done.returncode == 0


def inject(kind: str, rng: random.Random, a: Site, b: Site, server: Prosody, pacs: Orthanc) -> None:
    relay = rng.choice([a.c2s, a.proxy, b.c2s, b.proxy])
    if kind == "cut":
        relay.configure(cut_after=rng.randint(50_000, 3_000_000))
    elif kind == "stall":
        relay.configure(stall_after=rng.randint(50_000, 3_000_000), stall_s=rng.uniform(1.0, 4.0))
    elif kind == "prosody_restart":
        server.kill()
        time.sleep(rng.uniform(0.5, 2.0))
        server.start()
    elif kind == "gateway_kill":
        rng.choice([a, b]).restart(rng.uniform(0.2, 2.0))
    elif kind == "pacs_outage":
        pacs.stop()
        time.sleep(rng.uniform(1.0, 5.0))
        pacs.start()


def b_duplicates(b_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{b_dir / 'queue.db'}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT count(*) - count(DISTINCT sop_instance_uid) FROM instances").fetchone()
    return int(rows[0])


def in_pacs(pacs: Orthanc, sop_uids: list[str]) -> tuple[int, int]:
    """(how many of ``sop_uids`` Orthanc holds, Orthanc's instance count)."""
    found = 0
    for uid in sop_uids:
        request = urllib.request.Request(f"http://127.0.0.1:{pacs.http_port}/tools/lookup", data=uid.encode(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            hits = [h for h in json.loads(response.read() or b"[]") if h.get("Type") == "Instance"]
        found += 1 if len(hits) == 1 else 0
    return found, pacs.instance_count()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 studies of 0.3-3 MB (CI)")
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--min-mb", type=float, default=1.0)
    parser.add_argument("--max-mb", type=float, default=200.0)
    parser.add_argument("--fault-rate", type=float, default=0.5, help="chance of a fault after each push")
    parser.add_argument("--rate-mbit", type=float, default=400.0)
    parser.add_argument("--deadline-s", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=9)
    args = parser.parse_args()
    if args.quick:
        args.studies, args.min_mb, args.max_mb, args.deadline_s, args.fault_rate = 12, 0.3, 3.0, 300.0, 0.8
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="dicomgw-soak-"))
    server = Prosody(work / "prosody", domain=DOMAIN)
    for user in (A_USER, B_USER):
        server.add_account(user, f"pw-{user}")
    pacs = Orthanc(work / "orthanc", ae_title="PACS_B")
    rate = args.rate_mbit * 1e6 / 8
    faults: collections.Counter[str] = collections.Counter()
    acknowledged: list[str] = []
    started = time.monotonic()
    a = b = None
    try:
        server.start()
        pacs.start()
        a_fp, b_fp = identity(work / "a"), identity(work / "b")
        pacs_conf = (f'[pacs]\nae_title = "PACS_B"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\nretry_base_s = 0.5\n'
                     f'retry_max_s = 3\nmax_attempts = 1000\n')
        b = Site(work / "b", B_USER, A_USER, server, rate, fingerprint=a_fp)
        b.gateway.text += pacs_conf
        a = Site(work / "a", A_USER, B_USER, server, rate, B_USER, fingerprint=b_fp)
        b.gateway.start()
        a.gateway.start()
        kinds = ["cut", "stall", "prosody_restart", "gateway_kill", "pacs_outage"]
        rng.shuffle(kinds)  # then round-robin: every kind comes up, in a random order
        for n in range(args.studies):
            size_mb = math.exp(rng.uniform(math.log(args.min_mb), math.log(args.max_mb)))
            slices = max(1, round(size_mb * 1e6 / SLICE_BYTES))
            study = generate_ct_study(work / "study", series=1, slices_per_series=slices, rows=256, columns=256, seed=n + 1)
            for _attempt in range(20):  # A may be restarting after a kill: a modality tries again
                if push(a.gateway.port, study.files):
                    acknowledged += study.sop_instance_uids
                    break
                time.sleep(1.0)
            shutil.rmtree(work / "study", ignore_errors=True)
            if rng.random() < args.fault_rate:
                kind = kinds[sum(faults.values()) % len(kinds)]
                inject(kind, rng, a, b, server, pacs)
                faults[kind] += 1
            print(f"study {n + 1}/{args.studies}: {slices} slices ({slices * SLICE_BYTES / 1e6:.1f} MB); faults so far "
                  f"{dict(faults)}", flush=True)
        deadline = time.monotonic() + args.deadline_s
        states: dict[str, int] = {}
        while time.monotonic() < deadline:
            units = a.gateway.cli("queue")
            states = dict(collections.Counter(u["state"] for u in units))
            if states == {"delivered": args.studies} or (units and all(u["state"] in ("delivered", "dead", "failed") for u in units)
                                                           and len(units) >= args.studies):
                break
            time.sleep(2.0)
        found, count = in_pacs(pacs, acknowledged)
        stats = a.gateway.cli("stats")
        result: dict[str, Any] = {
            "studies": args.studies, "faults_injected": sum(faults.values()), "faults": dict(faults),
            "instances_acknowledged": len(acknowledged), "instances_in_pacs": found, "pacs_instance_count": count,
            "lost": len(acknowledged) - found, "duplicates": b_duplicates(work / "b") + max(0, count - found),
            "a_states": states, "N": stats["N"], "S": stats["S"], "F": stats["F"], "mtbf_s": stats["mtbf_s"],
            "T_s": stats["T_s"], "failures": stats["failures"], "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        for site in (a, b):
            if site is not None:
                site.stop()
        pacs.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    raise SystemExit(0 if result["lost"] == 0 and result["duplicates"] == 0 and states.get("delivered") == args.studies else 1)


if __name__ == "__main__":
    main()
