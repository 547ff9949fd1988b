"""End-to-end benchmark (issue 4): the whole chain against a direct store into the same kind of PACS.

Each round, interleaved, with a fresh Orthanc started the same way for both (``TCP_NODELAY=1``,
SyncStorageArea on, SQLite index in a temp dir):
  direct  dcmtk ``storescu`` -> Orthanc: the floor (what a modality sending straight to the PACS costs);
  chain   ``storescu`` -> gateway A -> Prosody (mediated S5B, end-to-end TLS 1.3 between the gateways
          unless ``--plain``; c2s TLS verified) -> gateway B -> Orthanc, and
          the delivery receipt back to A: from the first instance sent to A's queue showing ``delivered``,
          minus the configured stable age (the time A waits for the study to be complete, reported apart).
A and B are two ``dicomgw run`` processes, as at two hospitals. Prosody loads the proxy65 variant shipped in
conf/prosody (256 KiB relay buffers, what the README tells a site to deploy); ``--stock-proxy`` runs
Debian's own mod_proxy65 instead (4 KiB stop-and-wait relaying). Stage times come from both gateways' audit
logs: ingest (storescu run), stable wait, transfer (A offering -> A sent: offer, stream, B's verification;
B imports each verified instance into Orthanc while the rest still arrives), import (A sent -> B delivered:
what the import adds after the transfer), receipt (B delivered -> A delivered); "other" is what is left
(dispatch ticks, routing). Orthanc's SOP Instance
UIDs are checked after each chain. Every run's files stay until the bench ends (files deleted seconds
before a run make its file creates slow: ext4 skips recently freed inodes). ``cpu_s`` is each process's CPU time (this machine has few cores: the
chain runs four busy processes where the direct store runs two).
The study: 400 slices of 512x512 16-bit CT (~210 MB); ``--quick``: 40 slices. Medians of ``--runs``.
The last line printed is one JSON object with ``ratio`` = chain / direct.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters.lab.localpeers import (
    Orthanc,
    Prosody,
    nodelay_env,
    orthanc_instances,
    peak_rss_mb,
)
from adapters.lab.synthetic import generate_ct_study
from bench.transfer import DOMAIN, VARIANT, GatewayProcess, identity

STABLE_AGE_S = 0.3  # what bench.transfer's GatewayProcess configures


def storescu(port: int, files: list[Path], called_ae: str) -> None:
    done = subprocess.run(["/usr/bin/storescu", "-aet", "MODALITY", "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
                          env=nodelay_env(), capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])


def direct(root: Path, files: list[Path]) -> float:
    with Orthanc(root) as orthanc:
        orthanc.start()
        t0 = time.perf_counter()
        storescu(orthanc.dicom_port, files, "ORTHANC")
        seconds = time.perf_counter() - t0
        if orthanc.instance_count() != len(files):
            raise RuntimeError("direct store incomplete")
    return seconds


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat, clock ticks)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


def _when(entries: list[dict[str, Any]], state: str, newest: bool = True) -> datetime:
    found = [e for e in entries if e["to_state"] == state]  # audit is newest first
    if not found:
        raise RuntimeError(f"no move to {state} in the audit log")
    return datetime.fromisoformat(found[0 if newest else -1]["at"]).replace(tzinfo=UTC)


def chain(root: Path, files: list[Path], uids: set[str], stock_proxy: bool = False, encrypted: bool = True) -> dict[str, Any]:
    server = Prosody(root / "prosody", domain=DOMAIN, plugin_paths=[] if stock_proxy else [VARIANT])
    for user in ("radiology.hospital-a", "radiology.hospital-b"):
        server.add_account(user, f"pw-{user}")
    server.start()
    orthanc = Orthanc(root / "orthanc-chain", ae_title="PACS_B")
    orthanc.start()
    pacs = f'[pacs]\nae_title = "PACS_B"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\ncalling_ae_title = "GWB"\n'
    a_fp, b_fp = (identity(root / "a"), identity(root / "b")) if encrypted else ("", "")
    b = GatewayProcess(root / "b", "radiology.hospital-b", server, "radiology.hospital-a", peer_fingerprint=a_fp)
    b.text += pacs
    b.start()
    a = GatewayProcess(root / "a", "radiology.hospital-a", server, "radiology.hospital-b", "radiology.hospital-b",
                       peer_fingerprint=b_fp).start()
    try:
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        storescu(a.port, files, "DICOMGW")
        ingest_s = time.perf_counter() - t0
        ingest_end = datetime.now(UTC)
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:  # the DB, not the CLI: a CLI process per poll would steal a core
            unit = a.unit_state()
            if unit and unit[0] in ("delivered", "failed"):
                break
            time.sleep(0.05)
        units = a.cli("queue")
        if not units or units[0]["state"] != "delivered":
            raise RuntimeError(f"chain did not deliver: {units}")
        audit_a = a.cli("audit", "--limit", "200")
        audit_b = b.cli("audit", "--limit", "200")
        stable_wait_s = (_when(audit_a, "stable") - ingest_end).total_seconds()
        delivered_at = _when(audit_a, "delivered")
        total_s = (delivered_at - started).total_seconds()
        sent_at = _when(audit_a, "sent")
        stages = {
            "ingest_s": ingest_s,
            "transfer_s": (sent_at - _when(audit_a, "offering", newest=False)).total_seconds(),
            "import_s": (_when(audit_b, "delivered") - sent_at).total_seconds(),
            "receipt_s": (delivered_at - _when(audit_b, "delivered")).total_seconds(),
        }
        attempts = [t for t in a.cli("audit", "--transfers", "--limit", "20") if t["outcome"] == "received"]
        stream_s = float(attempts[-1]["stream_s"] or 0.0) if attempts else 0.0
        chain_s = total_s - stable_wait_s
        stages["other_s"] = chain_s - sum(stages.values())
        held = set(orthanc_instances(orthanc))
        if held != uids:
            raise RuntimeError(f"Orthanc holds {len(held)} of {len(uids)} instances")
        rss = {"gateway_a": peak_rss_mb(a.pid), "gateway_b": peak_rss_mb(b.pid)}
        cpu = {name: _cpu_s(pid) for name, pid in (("gateway_a", a.pid), ("gateway_b", b.pid), ("orthanc", orthanc.pid),
                                                    ("prosody", int((server.workdir / "prosody.pid").read_text().strip())))}
        return {"chain_s": chain_s, "stable_wait_s": stable_wait_s, "stages": stages, "rss_mb": rss, "cpu_s": cpu, "stream_s": stream_s,
                "bundle_bytes": units[0]["bundle_bytes"], "method": units[0]["method"]}
    finally:
        a.stop()
        b.stop()
        orthanc.stop()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 slices instead of 400")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stock-proxy", action="store_true", help="Debian's mod_proxy65 instead of the conf/prosody variant")
    parser.add_argument("--plain", action="store_true", help="no end-to-end encryption between the gateways (lab only)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dicomgw-bench-e2e-"))
    try:
        slices = 20 if args.quick else 200
        study = generate_ct_study(root / "study", series=2, slices_per_series=slices)
        uids = set(study.sop_instance_uids)
        print(f"study: {len(study.files)} instances, {study.size_bytes / 1e6:.1f} MB; {args.runs} run(s), interleaved", flush=True)
        directs, chains = [], []
        for run in range(args.runs):
            directs.append(direct(root / f"direct{run}", study.files))
            chains.append(chain(root / f"run{run}", study.files, uids, args.stock_proxy, not args.plain))
            c = chains[-1]
            print(f"run {run + 1}: direct {directs[-1]:.2f} s, chain {c['chain_s']:.2f} s ("
                  + ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in c["stages"].items())
                  + f"; of the transfer, the byte stream {c['stream_s']:.2f}; stable wait {c['stable_wait_s']:.2f} s excluded)", flush=True)
        direct_s = statistics.median(directs)
        middle = sorted(chains, key=lambda c: c["chain_s"])[len(chains) // 2]
        mb = study.size_bytes / 1e6
        print(f"direct storescu -> Orthanc:        {direct_s:6.2f} s  {mb / direct_s:6.1f} MB/s  (median)")
        proxy = "Debian's stock mod_proxy65" if args.stock_proxy else "the conf/prosody proxy65 variant"
        print(f"chain modality -> A -> B -> Orthanc: {middle['chain_s']:6.2f} s  {mb / middle['chain_s']:6.1f} MB/s  (median, "
              f"method {middle['method']} through {proxy}, stable age {STABLE_AGE_S} s configured, excluded)")
        for name, seconds in middle["stages"].items():
            print(f"  {name.removesuffix('_s'):9s} {seconds:6.2f} s")
        ratio = middle["chain_s"] / direct_s
        print(f"ratio chain / direct: {ratio:.2f} (goal <= 2.0)")
        print(json.dumps({
            "ratio": round(ratio, 3), "direct_s": round(direct_s, 3), "chain_s": round(middle["chain_s"], 3),
            "stages_s": {k: round(v, 3) for k, v in middle["stages"].items()},
            "stable_wait_s": round(middle["stable_wait_s"], 3), "stream_s": round(middle["stream_s"], 3), "instances": len(study.files), "bytes": study.size_bytes,
            "cpu_s": middle["cpu_s"], "method": middle["method"], "proxy65": "stock" if args.stock_proxy else "variant", "end_to_end": not args.plain, "rss_mb": middle["rss_mb"], "runs": args.runs,
            "all_direct_s": [round(d, 3) for d in directs], "all_chain_s": [round(c["chain_s"], 3) for c in chains],
        }))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
