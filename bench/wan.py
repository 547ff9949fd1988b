"""WAN benchmark (issue 9): the study's health network emulated on loopback, with and without compression.

Each gateway reaches Prosody through its own link: an ``adapters.lab.netem.FaultRelay`` in front of the c2s
port and one in front of the proxy65 port, each capped at the link rate per direction and delaying each
direction by a quarter of the round trip (gateway to gateway over the server: ``--rtt-ms``, 27 ms as
measured in the study). A study whose slices look like a scanner's (a Shepp-Logan head in Hounsfield
units, air around it, 10 HU noise, every slice distinct: ``adapters.lab.synthetic.phantom_slice``) is pushed
into A with dcmtk's storescu and sent to B end to end encrypted, by S5B (mediated) and by IBB, with
compression off (``[xmpp] compress = false``) and on, at each link rate (``--rates``, Mbit/s; 0: plain
loopback without relays, where compression must switch itself off; ``--random``: random pixels).

Prosody loads the proxy65 variant shipped in conf/prosody, as the README tells a site to (it links the two
legs as soon as both are up, so the end-to-end TLS handshake overlaps the offer); ``--stock-proxy`` runs
Debian's own mod_proxy65 instead.

Figures per run: seconds from offer to B's verdict (B verified every SHA-256 and stored every instance),
``MB/s`` of original bundle bytes delivered, wire bytes (A's transfer row), ``compression_ratio`` = bundle
bytes / wire bytes, ``vs_link`` = delivered bytes per second / link rate. Also the zstd ratio (level 1, byte
shuffle) of pydicom's real ``CT_small.dcm`` and ``MR_small.dcm``, each on its own. The last line printed is
one JSON object with ``s5b_vs_link``, ``ibb_vs_link`` (uncompressed, lowest rate), ``compression_ratio``,
``effective_vs_link`` (S5B compressed, lowest rate), ``bare_tcp_vs_link`` (plain TCP of the study's size through
the same two emulated links, measured first in the same run: what the emulation itself reaches) and every run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

from adapters.lab.localpeers import Prosody, nodelay_env
from adapters.lab.netem import FaultRelay
from adapters.lab.synthetic import generate_ct_study
from bench.transfer import DOMAIN, VARIANT, GatewayProcess, identity, raw_tcp

A_USER, B_USER = "radiology.hospital-a", "radiology.hospital-b"


def real_file_ratios() -> dict[str, float]:
    import zstandard
    from pydicom.data import get_testdata_file

    from gateway.wire import shuffle2

    ratios = {}
    for name in ("CT_small.dcm", "MR_small.dcm"):
        data = Path(get_testdata_file(name)).read_bytes()
        ratios[name] = round(len(data) / len(zstandard.ZstdCompressor(level=1).compress(shuffle2(data))), 3)
    return ratios


def bare_stream(size: int, rate_mbit: float, rtt_ms: float) -> float:
    """Seconds for ``size`` bytes of plain TCP through two relays in series as a study's stream takes them
    (sender's link, receiver's link; no proxy, no XMPP): how close the emulated line itself comes to the link."""
    rate, one_way = rate_mbit * 1e6 / 8, rtt_ms / 4 / 1000
    relays: list[FaultRelay] = []

    def through_two_links(sink_port: int) -> int:
        relays.append(FaultRelay(sink_port, one_way, rate))
        relays.append(FaultRelay(relays[0].port, one_way, rate))
        return relays[1].port

    try:
        seconds, same = raw_tcp(size, through_two_links)
    finally:
        for relay in relays:
            relay.stop()
    if not same:
        raise RuntimeError("the bare stream arrived changed")
    return seconds


def one_run(root: Path, server: Prosody, files: list[Path], method: str, compress: bool, rate_mbit: float,
            rtt_ms: float) -> dict[str, object]:
    rate = rate_mbit * 1e6 / 8
    one_way = rtt_ms / 4 / 1000  # two relays between the gateways, each delays both directions
    links = {side: (FaultRelay(server.c2s_port, one_way, rate), FaultRelay(server.proxy_port, one_way, rate))
             for side in ("ab" if rate_mbit > 0 else "")}  # rate 0: plain loopback, no relay at all
    a_fp, b_fp = identity(root / "a"), identity(root / "b")
    proxy = {side: f's5b_proxy = "127.0.0.1:{pair[1].port}"\n' for side, pair in links.items()}
    options = f'methods = ["{method}"]\ncompress = {"true" if compress else "false"}\n{proxy.get("a", "")}'
    b = GatewayProcess(root / "b", B_USER, server, A_USER, peer_fingerprint=a_fp,
                       xmpp=f'{proxy.get("b", "")}s5b_idle_timeout_s = 600\n')
    a = GatewayProcess(root / "a", A_USER, server, B_USER, B_USER, options + "verdict_timeout_s = 3600\n", peer_fingerprint=b_fp)
    a.log_level = b.log_level = "INFO"  # each attempt's steps and round trips; the receiver's time to its verdict
    for gateway, side in ((a, "a"), (b, "b")):
        if side in links:
            gateway.text = gateway.text.replace(f"port = {server.c2s_port}\n", f"port = {links[side][0].port}\n")
    try:
        b.start()
        a.start()
        pushed = subprocess.run(["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "DICOMGW", "127.0.0.1", str(a.port),
                                 *map(str, files)], env=nodelay_env(), capture_output=True, text=True, timeout=1200)
        if pushed.returncode != 0:
            raise RuntimeError(pushed.stderr[-2000:])
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            unit = a.unit_state()
            if unit and unit[0] == "sent":
                break
            if unit and unit[0] in ("failed", "dead"):
                raise RuntimeError(unit[1])
            time.sleep(0.25)
        else:
            raise TimeoutError("transfer did not finish")
        units = a.cli("queue")
        attempts = a.cli("audit", "--transfers", "--limit", "100")
        done = [t for t in attempts if t["outcome"] == "received"][-1]
        if len(attempts) != 1:
            raise RuntimeError(f"more than one attempt: {attempts}")
        seconds = (datetime.fromisoformat(done["ended_at"]) - datetime.fromisoformat(done["started_at"])).total_seconds()
        sent = a.cli("queue", "show", units[0]["study_uid"])["instances"]
        got = b.cli("queue", "show", units[0]["study_uid"])["instances"]
        if sorted((i["sop_instance_uid"], i["sha256"]) for i in sent) != sorted((i["sop_instance_uid"], i["sha256"]) for i in got):
            raise RuntimeError("SHA-256 mismatch between sender and receiver")
        bundle = int(units[0]["bundle_bytes"])
        wire = int(done.get("wire_bytes") or done["bytes"])  # study bytes are "bytes" (issue 16); the stream's are "wire_bytes"
        steps = a.attempt_steps()
        stored = []  # the receiver's side of the attempt: offer accepted, stored after the last byte, verdict answered
        for line in b.log_path.read_text(errors="replace").splitlines():
            if "accepted (" in line and ") in " in line:
                stored.append("offer " + line.split(" accepted ", 1)[1].split(" [", 1)[0])
            elif ": verified and stored " in line or ": verdict " in line:
                stored.append(line.split(" from ", 1)[1].split(": ", 1)[1].split(" [", 1)[0])
        return {"method": method, "compress": compress, "rate_mbit": rate_mbit, "rtt_ms": rtt_ms, "seconds": round(seconds, 2),
                "bundle_bytes": bundle, "wire_bytes": wire, "compression_ratio": round(bundle / max(wire, 1), 3),
                "mb_s": round(bundle / seconds / 1e6, 3), "vs_link": round(bundle / seconds / rate, 3) if rate else None,
                "steps": f"{steps[-1]}; receiver: {'; '.join(stored[-3:])}" if steps and stored else (steps[-1] if steps else None)}
    finally:
        a.stop()
        b.stop()
        for pair in links.values():
            for relay in pair:
                relay.stop()
        # The run's files stay until the bench ends (removed with its work directory): deleting a study's
        # files seconds before the next pair writes theirs makes that pair's file creates slow (ext4 skips
        # recently freed inodes), as bench/ingest found.


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 20 MB study at 100 Mbit/s only")
    parser.add_argument("--size-mb", type=float, default=200.0)
    parser.add_argument("--rates", default="10,100", help="link rates in Mbit/s, e.g. 10,100")
    parser.add_argument("--rtt-ms", type=float, default=27.0)
    parser.add_argument("--methods", default="s5b,ibb")
    parser.add_argument("--random", action="store_true", help="random pixels (nothing to compress) instead of the phantom")
    parser.add_argument("--stock-proxy", action="store_true", help="Debian's mod_proxy65 instead of the conf/prosody variant")
    args = parser.parse_args()
    size_mb, rates = (20.0, [100.0]) if args.quick else (args.size_mb, [float(r) for r in args.rates.split(",")])
    slices = max(1, round(size_mb * 1e6 / (512 * 512 * 2 + 1400)))
    work = Path(tempfile.mkdtemp(prefix="dicomgw-wan-"))
    server = Prosody(work / "prosody", domain=DOMAIN, plugin_paths=[] if args.stock_proxy else [VARIANT])
    for user in (A_USER, B_USER):
        server.add_account(user, f"pw-{user}")
    runs = []
    try:
        study = generate_ct_study(work / "study", series=1, slices_per_series=slices, phantom=not args.random)
        print(f"study: {len(study.files)} {'random' if args.random else 'phantom'} slices, {study.size_bytes / 1e6:.1f} MB; link RTT {args.rtt_ms:g} ms", flush=True)
        server.start()
        bare = {}
        for rate in rates:
            seconds = bare_stream(study.size_bytes, rate, args.rtt_ms)
            bare[rate] = round(study.size_bytes / seconds / (rate * 1e6 / 8), 3)
            print(f"{rate:>6g} Mbit/s bare TCP through the two emulated links: {seconds:.2f} s, vs_link {bare[rate]}", flush=True)
            for method in args.methods.split(","):
                for compress in (False, True):
                    run = one_run(work / f"run{len(runs)}", server, study.files, method, compress, rate, args.rtt_ms)
                    runs.append(run)
                    print(f"{rate:>6g} Mbit/s {method:>4} compress={str(compress):5}  {run['seconds']:>8.2f} s  "
                          f"{run['mb_s']:>7.3f} MB/s  ratio {run['compression_ratio']:.2f}  vs_link {run['vs_link']}", flush=True)
                    if run.get("steps"):
                        print(f"           {run['steps']}", flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    lowest = min(rates)

    def pick(method: str, compress: bool) -> dict[str, object] | None:
        return next((r for r in runs if r["method"] == method and r["compress"] is compress and r["rate_mbit"] == lowest), None)

    plain_s5b, plain_ibb, packed_s5b = pick("s5b", False), pick("ibb", False), pick("s5b", True)
    ratios = [float(r["compression_ratio"]) for r in runs if r["compress"]]
    summary = {
        "link_mbit": lowest, "rtt_ms": args.rtt_ms, "study_mb": round(study.size_bytes / 1e6, 1),
        "s5b_vs_link": plain_s5b["vs_link"] if plain_s5b else None,
        "ibb_vs_link": plain_ibb["vs_link"] if plain_ibb else None,
        "bare_tcp_vs_link": bare.get(lowest),  # the emulated line itself, same run: the ceiling of the ratios above
        "compression_ratio": round(statistics.median(ratios), 3) if ratios else None,
        "effective_vs_link": packed_s5b["vs_link"] if packed_s5b else None,
        "real_files_zstd1_shuffle": real_file_ratios(),
        "runs": runs,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
