"""Transfer benchmark (issue 3): the study's throughput table on loopback, in one run.

For each size (1, 10, 50, 100, 200 MB; ``--quick``: 1 and 10) and each of three runs:
  (a) the gateway's own study transfer over mediated S5B through Prosody's stock proxy65,
  (a') the same through the proxy65 variant shipped in conf/prosody (256 KiB relay buffers),
  (a'') the same as (a') in plaintext (``require_e2e = false``, lab only): ``encrypted_vs_plain`` = a'/a'',
  (b) the gateway over IBB with the study's settings (4096-byte blocks, one in flight),
  (c) the gateway over IBB tuned (65535-byte blocks, 8 in flight), (c') the same in plaintext (lab only),
  (d) a bare S5B relay of the same number of bytes through the same stock proxy (both ends in this process,
      only SOCKS5 + the activate IQ: the proxy's ceiling),
  (e) a raw TCP copy over loopback (the physical limit).
(a)-(c) run two real gateway processes (``dicomgw run``): the study is pushed into A with storescu, A routes
it to B, and the figure is A's transfer attempt for it. Each pair first sends a one-instance warm-up study
(a running gateway has sent studies before: the first of a process also pays its first TLS contexts, key
loads and database statements: 10 MB took 79-83 ms from offer to verdict cold, 64-73 warm); ``--cold`` measures the first study
instead. The attempt is timed (end to end encrypted unless said otherwise; c2s TLS to
Prosody verified against a CA made for the run) from offer to B's verdict (B has verified every SHA-256 and
stored every instance by then). MB/s = 10^6 bytes of bundle per second, median of the runs; the methods take
turns within each run (a, a', a'', ..., a, a', ...), and ``encrypted_vs_plain_verified_paired`` is the median
over runs of each run's a''/a' time ratio (offer to verdict), the figure least moved by this machine's
drift. Peak RSS of
sender, receiver and Prosody is read from /proc (VmHWM). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import slixmpp

from adapters.dicom_files import inspect_part10_file
from adapters.lab.localpeers import (
    PeerProcess,
    Prosody,
    free_port,
    nodelay_env,
    peak_rss_mb,
    port_open,
)
from adapters.lab.synthetic import generate_ct_study
from adapters.xmpp import socks5
from adapters.xmpp.stanzas import NS_S5B, q

REPO = Path(__file__).resolve().parent.parent
DOMAIN = "helsenett.test"
SLICE_BYTES = 512 * 512 * 2
VARIANT = REPO / "conf" / "prosody" / "plugins"


class GatewayProcess(PeerProcess):
    name = "gateway"

    def __init__(self, workdir: Path, user: str, prosody: Prosody, peer: str, destination: str = "", xmpp: str = "",
                 peer_fingerprint: str = "") -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.config = workdir / "gateway.toml"
        self.log_level = "WARNING"  # INFO: the log has each attempt's steps and round trips (bench.wan reads them)
        peer_entry = f'{{ jid = "{peer}@{DOMAIN}", fingerprint = "{peer_fingerprint}" }}' if peer_fingerprint else f'"{peer}@{DOMAIN}"'
        self.text = (
            f'[dicom]\nae_title = "DICOMGW"\nport = {self.port}\nallowed_calling_ae_titles = []\n'
            f'[paths]\nspool_dir = "spool"\nwatch_dir = ""\nquarantine_dir = "quarantine"\n'
            # The queue's ticks at the site's defaults (1 s): every hand-off of a study is woken by its event
            # (stable at its stable age, a verdict, an import's end), so 20 Hz polling would only burn CPU.
            # storescu on a busy machine may pause longer than the short stable age between two instances: the
            # open association holds its study, so a study stays one unit.
            f'[queue]\ndb_url = "sqlite:///queue.db"\nstable_age_s = 0.3\nassociation_pause_s = 120\n'
            f'[xmpp]\njid = "{user}@{DOMAIN}/gw1"\npassword = "pw-{user}"\nport = {prosody.c2s_port}\nuse_tls = true\n'
            f'ca_file = "{prosody.ca_file}"\nrequire_e2e = {"true" if peer_fingerprint else "false"}\n'
            f'peers = [{peer_entry}]\nretry_base_s = 0.2\nretry_max_s = 1\n{xmpp}\n'
            f'[routing]\ndefault_destination = "{destination}"\n'
        )

    def start(self) -> GatewayProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.text)
        self.config.chmod(0o600)  # it holds a password
        self._spawn([sys.executable, "-m", "gateway", "run", "--config", str(self.config), "--log-level", self.log_level], cwd=REPO)
        self._wait_ready(lambda: port_open(self.port), 30)
        return self

    def attempt_steps(self) -> list[str]:
        """The sender's line per transfer attempt (``adapters.xmpp.common.Phases``), when it logs at INFO."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [line.split(" attempt ", 1)[1] for line in text.splitlines() if "before the first byte" in line]

    def unit_state(self, index: int = 0) -> tuple[str, str] | None:
        """(state, error) of the study unit number ``index`` (0 = the first), read straight from the queue DB (stdlib sqlite3, read-only).
        Polling through ``dicomgw queue --json`` would start a Python process (~0.5 CPU-s) per poll and take a
        core away from the transfer being measured on a 2-core machine."""
        db = self.workdir / "queue.db"
        if not db.exists():
            return None
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
                row = conn.execute("SELECT state, coalesce(error, '') FROM study_units ORDER BY id LIMIT 1 OFFSET ?",
                                   (index,)).fetchone()
        except sqlite3.OperationalError:  # schema not created yet
            return None
        return (row[0], row[1]) if row else None

    def cli(self, *args: str) -> Any:
        out = subprocess.run([sys.executable, "-m", "gateway", *args, "--json", "--config", str(self.config)],
                             cwd=REPO, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)


def prosody_rss(server: Prosody) -> float:
    try:
        return peak_rss_mb(int((server.workdir / "prosody.pid").read_text().strip()))
    except (OSError, ValueError):
        return 0.0


def identity(workdir: Path) -> str:
    """Make a gateway's end-to-end identity where its config expects it (var/identity); its fingerprint."""
    from adapters.xmpp.e2e import ensure_identity

    return ensure_identity(workdir / "var/identity/gateway.key", workdir / "var/identity/gateway.crt", workdir.name)[0].fingerprint


def _push_and_wait(a: GatewayProcess, files: list[Path], unit_index: int) -> None:
    """storescu the files into A and wait until its study unit number ``unit_index`` (0 = the first) is sent."""
    pushed = subprocess.run(["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "DICOMGW", "127.0.0.1", str(a.port), *map(str, files)],
                            env=nodelay_env(), capture_output=True, text=True, timeout=600)
    if pushed.returncode != 0:
        raise RuntimeError(pushed.stderr[-2000:])
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        unit = a.unit_state(unit_index)
        if unit and unit[0] == "sent":
            return
        if unit and unit[0] == "failed":
            raise RuntimeError(unit[1])
        time.sleep(0.1)
    raise TimeoutError("transfer did not finish")


def gateway_transfer(root: Path, server: Prosody, files: list[Path], xmpp: str, encrypted: bool = True,
                     warm_up: list[Path] | None = None) -> tuple[float, float, int, dict[str, float]]:
    """(seconds of the stream incl. its set-up, seconds from offer to B's verdict, bundle bytes, peak RSS);
    checks that B holds every SHA-256 that A sent. With ``warm_up``, that study goes from A to B first, so
    the measured one is not the first of the two processes (as in a gateway that has been running)."""
    a_fp, b_fp = (identity(root / "a"), identity(root / "b")) if encrypted else ("", "")
    b = GatewayProcess(root / "b", "radiology.hospital-b", server, "radiology.hospital-a", peer_fingerprint=a_fp).start()
    a = GatewayProcess(root / "a", "radiology.hospital-a", server, "radiology.hospital-b", "radiology.hospital-b", xmpp,
                       peer_fingerprint=b_fp).start()
    try:
        if warm_up:
            _push_and_wait(a, warm_up, 0)
        _push_and_wait(a, files, 1 if warm_up else 0)
        units = [u for u in a.cli("queue") if not warm_up or u["study_uid"] != inspect_part10_file(warm_up[0]).study_instance_uid]
        attempts = [t for t in a.cli("audit", "--transfers", "--limit", "100") if t["outcome"] == "received"]
        seconds = (datetime.fromisoformat(attempts[-1]["ended_at"]) - datetime.fromisoformat(attempts[-1]["started_at"])).total_seconds()
        sent = a.cli("queue", "show", units[0]["study_uid"])["instances"]
        got = b.cli("queue", "show", units[0]["study_uid"])["instances"]
        if sorted((i["sop_instance_uid"], i["sha256"]) for i in sent) != sorted((i["sop_instance_uid"], i["sha256"]) for i in got):
            raise RuntimeError("SHA-256 mismatch between sender and receiver")
        rss = {"sender": peak_rss_mb(a.pid), "receiver": peak_rss_mb(b.pid), "prosody": prosody_rss(server)}
        return float(attempts[-1]["stream_s"]), seconds, int(units[0]["bundle_bytes"]), rss
    finally:
        a.stop()
        b.stop()  # their files stay until the size is done (the caller removes them)


async def _bare_s5b(server: Prosody, size: int) -> tuple[float, bool]:
    import ssl

    client = slixmpp.ClientXMPP(f"bench@{DOMAIN}/r", "pw-bench")
    client.enable_direct_tls = False
    client.ssl_context = ssl.create_default_context(cafile=str(server.ca_file))  # c2s as the gateways run it
    online = asyncio.Event()
    client.add_event_handler("session_start", lambda _e: online.set())
    client.connect("127.0.0.1", server.c2s_port)
    await asyncio.wait_for(online.wait(), 20)
    sid = "bench"
    # The proxy hashes the activating (initiator) full JID: ours, as bound by the server.
    digest = socks5.dst_addr(sid, client.boundjid.full, f"bench@{DOMAIN}/t")
    t_reader, t_writer = await socks5.connect("127.0.0.1", server.proxy_port, digest)
    i_reader, i_writer = await socks5.connect("127.0.0.1", server.proxy_port, digest)
    activate = client.make_iq_set(ito=server.proxy_jid)
    activate.xml.append(_activate(sid, f"bench@{DOMAIN}/t"))
    await activate.send(timeout=20)
    block = os.urandom(1 << 20)
    expected = hashlib.sha256()
    received = hashlib.sha256()

    async def pump_out() -> None:
        left = size
        while left > 0:
            chunk = block[: min(len(block), left)]
            expected.update(chunk)
            i_writer.write(chunk)
            await i_writer.drain()
            left -= len(chunk)
        # Half-close as the gateway does: Prosody 0.12's paused link can leave the tail unread until a new
        # socket event arrives (seen here: a 1,050,123-byte stream stalled at the end without it).
        i_writer.write_eof()

    async def pump_in() -> None:
        got = 0
        while got < size:
            data = await t_reader.read(1 << 20)
            if not data:
                break
            received.update(data)
            got += len(data)

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(pump_out(), pump_in()), 600)
    seconds = time.perf_counter() - start
    for w in (i_writer, t_writer):
        w.close()
    try:
        await asyncio.wait_for(client.disconnect(), 3)
    except (TimeoutError, OSError):
        client.abort()
    return seconds, expected.hexdigest() == received.hexdigest()


def _activate(sid: str, target: str) -> Any:
    import xml.etree.ElementTree as ET

    query = ET.Element(q(NS_S5B, "query"), {"sid": sid})
    ET.SubElement(query, q(NS_S5B, "activate")).text = target
    return query


def raw_tcp(size: int, route: Callable[[int], int] | None = None) -> tuple[float, bool]:
    """Seconds to copy ``size`` bytes over one loopback TCP connection until the receiver has them all, and
    whether both ends hashed the same bytes. ``route``: given the receiver's port, the port to connect to
    instead (a chain of relays in front of it, e.g. ``bench.wan``'s emulated links)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    if route is not None:
        port = route(port)
    block = os.urandom(1 << 20)
    digests = [hashlib.sha256(), hashlib.sha256()]

    def serve() -> None:
        conn, _ = listener.accept()
        buffer = bytearray(1 << 20)
        got = 0
        while got < size:
            n = conn.recv_into(buffer)
            if not n:
                break
            digests[1].update(memoryview(buffer)[:n])
            got += n
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        left = size
        while left > 0:
            chunk = block[: min(len(block), left)]
            digests[0].update(chunk)
            sock.sendall(chunk)
            left -= len(chunk)
    thread.join()
    seconds = time.perf_counter() - start
    listener.close()
    return seconds, digests[0].hexdigest() == digests[1].hexdigest()


def _no_nan(value: Any) -> Any:
    """JSON has no NaN: columns not run (--only) become null."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    return None if isinstance(value, float) and value != value else value


def _ratio(row: dict[str, float], top: str, bottom: str) -> float:
    return row[top] / row[bottom] if top in row and bottom in row else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sizes up to 10 MB only")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", type=lambda text: [int(x) for x in text.split(",")], help="e.g. 50,200")
    parser.add_argument("--cold", action="store_true", help="measure each gateway pair's first study (no warm-up study before it)")
    parser.add_argument("--only", help="comma-separated gateway columns to run "
                        "(a_s5b,a2_s5b_variant,a3_s5b_variant_plain,b_ibb_4096,c_ibb_tuned,c2_ibb_tuned_plain)")
    args = parser.parse_args()
    sizes_mb = args.sizes or ([1, 10] if args.quick else [1, 10, 50, 100, 200])
    root = Path(tempfile.mkdtemp(prefix="dicomgw-bench-transfer-"))
    servers = {
        "stock": Prosody(root / "prosody-stock", domain=DOMAIN),
        "variant": Prosody(root / "prosody-variant", domain=DOMAIN, plugin_paths=[VARIANT]),
    }
    for server in servers.values():
        for user in ("radiology.hospital-a", "radiology.hospital-b", "bench"):
            server.add_account(user, f"pw-{user}")
        server.start()
    methods = {
        "a_s5b": ("stock", 'methods = ["s5b"]'),
        "a2_s5b_variant": ("variant", 'methods = ["s5b"]'),
        "a3_s5b_variant_plain": ("variant", 'methods = ["s5b"]'),
        "b_ibb_4096": ("stock", 'methods = ["ibb"]\nibb_block_bytes = 4096\nibb_window = 1'),
        "c_ibb_tuned": ("stock", 'methods = ["ibb"]\nibb_block_bytes = 65535\nibb_window = 8'),
        "c2_ibb_tuned_plain": ("stock", 'methods = ["ibb"]\nibb_block_bytes = 65535\nibb_window = 8'),
    }
    if args.only:
        methods = {k: v for k, v in methods.items() if k in args.only.split(",")}
    warm_up = None if args.cold else generate_ct_study(root / "warm-up", series=1, slices_per_series=1, rows=64, columns=64, seed=99).files
    table: dict[int, dict[str, float]] = {}
    rss: dict[str, float] = {"sender": 0.0, "receiver": 0.0, "prosody": 0.0}
    sha_ok = True
    try:
        for size_mb in sizes_mb:
            slices = max(1, round(size_mb * 1e6 / (SLICE_BYTES + 1400)))
            study = generate_ct_study(root / f"study{size_mb}", series=1, slices_per_series=slices, seed=size_mb)
            row: dict[str, float] = {}
            bundle_bytes = 0
            stream_times: dict[str, list[float]] = {name: [] for name in methods}
            verdict_times: dict[str, list[float]] = {name: [] for name in methods}
            for run in range(args.runs):  # the methods take turns, so a machine that slows down weighs on each alike
                for name, (server_name, xmpp) in methods.items():
                    stream_s, verdict_s, bundle_bytes, peaks = gateway_transfer(
                        root / f"{name}-{size_mb}-{run}", servers[server_name], study.files, xmpp, encrypted=not name.endswith("_plain"),
                        warm_up=warm_up,
                    )
                    stream_times[name].append(stream_s)
                    verdict_times[name].append(verdict_s)
                    print(f"    {size_mb} MB run {run + 1} {name}: stream {stream_s * 1e3:.1f} ms, offer to verified "
                          f"{verdict_s * 1e3:.1f} ms", flush=True)
                    for k, v in peaks.items():
                        rss[k] = max(rss[k], v)
            for name in methods:
                row[name] = bundle_bytes / 1e6 / statistics.median(stream_times[name])
                row[name + "_verified"] = bundle_bytes / 1e6 / statistics.median(verdict_times[name])
                print(f"  {size_mb} MB {name}: stream {row[name]:.1f} MB/s, offer to verified {row[name + '_verified']:.1f} MB/s", flush=True)
            if "a2_s5b_variant" in methods and "a3_s5b_variant_plain" in methods:  # each run's pair, side by side
                row["paired_encrypted_vs_plain_verified"] = statistics.median(
                    plain / enc for enc, plain in zip(verdict_times["a2_s5b_variant"], verdict_times["a3_s5b_variant_plain"]))
                print(f"  {size_mb} MB encrypted / plain, offer to verified, median of the {args.runs} side-by-side pairs: "
                      f"{row['paired_encrypted_vs_plain_verified']:.3f}", flush=True)
            bare = [asyncio.run(_bare_s5b(servers["stock"], bundle_bytes)) for _ in range(args.runs)]
            raw = [raw_tcp(bundle_bytes) for _ in range(args.runs)]
            sha_ok = sha_ok and all(ok for _, ok in bare + raw)
            row["d_bare_s5b"] = bundle_bytes / 1e6 / statistics.median(t for t, _ in bare)
            row["e_raw_tcp"] = bundle_bytes / 1e6 / statistics.median(t for t, _ in raw)
            table[size_mb] = row
            # Only now: files deleted seconds before a transfer make its gateways' file creates slow (ext4
            # skips recently freed inodes), so the pairs of one size run with nothing deleted between them.
            shutil.rmtree(root / f"study{size_mb}", ignore_errors=True)
            for run in range(args.runs):
                for name in methods:
                    shutil.rmtree(root / f"{name}-{size_mb}-{run}", ignore_errors=True)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)

    columns = [c for c in ["a_s5b", "a2_s5b_variant", "a3_s5b_variant_plain", "b_ibb_4096", "c_ibb_tuned", "c2_ibb_tuned_plain"] if c in methods] + ["d_bare_s5b", "e_raw_tcp"]
    print("MB/s of bundle bytes; gateway columns: the stream incl. its set-up [offer to receiver's verdict]")
    print(f"{'MB':>5}" + "".join(f"{c:>22}" for c in columns) + f"{'a/d':>7}{'c/b':>7}")
    for size_mb, row in table.items():
        cells = [f"{row[c]:.1f} [{row[c + '_verified']:.1f}]" if c + "_verified" in row else f"{row[c]:.1f}" for c in columns]
        print(f"{size_mb:>5}" + "".join(f"{cell:>22}" for cell in cells)
              + f"{_ratio(row, 'a_s5b', 'd_bare_s5b'):>7.2f}{_ratio(row, 'c_ibb_tuned', 'b_ibb_4096'):>7.1f}")
    print(f"peak RSS MB: sender {rss['sender']:.1f}, receiver {rss['receiver']:.1f}, prosody {rss['prosody']:.1f}")
    largest = table[max(table)]
    print(json.dumps(_no_nan({
        "largest_mb": max(table),
        "s5b_mb_s": round(largest.get("a_s5b", float("nan")), 2),
        "s5b_verified_mb_s": round(largest.get("a_s5b_verified", float("nan")), 2),
        "s5b_variant_mb_s": round(largest.get("a2_s5b_variant", float("nan")), 2),
        "ibb_mb_s": round(largest.get("c_ibb_tuned", float("nan")), 2),
        "ibb_verified_mb_s": round(largest.get("c_ibb_tuned_verified", float("nan")), 2),
        "ibb_4096_mb_s": round(largest.get("b_ibb_4096", float("nan")), 2),
        "bare_s5b_mb_s": round(largest["d_bare_s5b"], 2),
        "tcp_mb_s": round(largest["e_raw_tcp"], 1),
        "s5b_vs_ref": round(_ratio(largest, "a_s5b", "d_bare_s5b"), 3),
        "ibb_vs_4096": round(_ratio(largest, "c_ibb_tuned", "b_ibb_4096"), 2),
        "variant_vs_stock": round(_ratio(largest, "a2_s5b_variant", "a_s5b"), 2),
        "s5b_variant_plain_mb_s": round(largest.get("a3_s5b_variant_plain", float("nan")), 2),
        "encrypted_vs_plain": round(_ratio(largest, "a2_s5b_variant", "a3_s5b_variant_plain"), 3),
        "encrypted_vs_plain_verified": round(_ratio(largest, "a2_s5b_variant_verified", "a3_s5b_variant_plain_verified"), 3),
        "encrypted_vs_plain_verified_paired": round(largest.get("paired_encrypted_vs_plain_verified", float("nan")), 3),
        "ibb_plain_mb_s": round(largest.get("c2_ibb_tuned_plain", float("nan")), 2),
        "ibb_encrypted_vs_plain": round(_ratio(largest, "c_ibb_tuned", "c2_ibb_tuned_plain"), 3),
        "peak_rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "sha256_ok": sha_ok,
        "table_mb_s": {str(k): {c: round(v, 2) for c, v in r.items()} for k, r in table.items()},
    })))


if __name__ == "__main__":
    main()
