"""Ingest benchmark (issue 2): storescu pushes a ~200 MB CT study (400 slices of 512x512 16-bit) to

  (a) the gateway, started as a user starts it (``dicomgw run --config``), every instance fsynced and
      committed before its Success;
  (b) Orthanc from Debian's package with SyncStorageArea true (what a site would run instead);
  (c) dcmtk storescp writing to disk (the C++ ceiling, no fsync);
  (d) a bare pynetdicom SCP writing the received bytes with fsync + rename (the library's ceiling).

Every sender and receiver runs with TCP_NODELAY=1 (Debian's dcmtk leaves Nagle on otherwise). Each target
gets a fresh work directory per run, kept until the bench ends (files deleted seconds before a receiver
runs make its file creates slow: ext4 skips recently freed inodes), and the dirty pages of the receivers before
it are written out first (``sync``, not timed: storescp leaves its 210 MB to the kernel's writeback, which ran
into the next receivers' fsyncs); the figure is the median of ``--runs``. The gateway's peak RSS is
read from /proc (VmHWM) after the 1x study and again after a 2x study, to show it flat in study size.
``--associations n``: n storescu processes send the study at once, each every n-th slice (modalities sending
at the same moment; storescp then forks a child per association). ``--db-sync-delay-ms d``: the gateway's
queue database as on slower storage, each commit's fdatasync d ms longer (bench/slowsync.c, LD_PRELOAD, the
gateway only): where the group commit of concurrent associations shows. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from adapters.lab.localpeers import (
    Orthanc,
    PeerProcess,
    StoreSCP,
    free_port,
    nodelay_env,
    peak_rss_mb,
    port_open,
)
from adapters.lab.synthetic import generate_ct_study

REPO = Path(__file__).resolve().parent.parent


class GatewayUnderTest(PeerProcess):
    name = "gateway"
    env: dict[str, str] | None = None  # --db-sync-delay-ms: LD_PRELOAD of bench/slowsync.c (slow_db_sync)

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()

    def start(self) -> GatewayUnderTest:
        config = self.workdir / "gateway.toml"
        self.workdir.mkdir(parents=True, exist_ok=True)
        config.write_text(
            f'[dicom]\nae_title = "DICOMGW"\nport = {self.port}\nallowed_calling_ae_titles = ["STORESCU"]\n'
            f'[paths]\nspool_dir = "spool"\nwatch_dir = ""\nquarantine_dir = "quarantine"\n'
            f'[queue]\ndb_url = "sqlite:///queue.db"\nstable_age_s = 3600\n'
        )
        self._spawn([sys.executable, "-m", "gateway", "run", "--config", str(config), "--log-level", "WARNING"], cwd=REPO,
                    env=self.env)
        self._wait_ready(lambda: port_open(self.port), 30)
        return self


def slow_db_sync(delay_ms: float, build_dir: Path) -> dict[str, str]:
    """The environment that makes the gateway's database commits wait ``delay_ms`` longer for the disk
    (bench/slowsync.c, built here with cc)."""
    library = build_dir / "slowsync.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(REPO / "bench" / "slowsync.c"), "-ldl"],
                   check=True, capture_output=True, timeout=120)
    return {**os.environ, "LD_PRELOAD": str(library), "SLOWSYNC_US": str(round(delay_ms * 1000))}


class BarePynetdicom(PeerProcess):
    name = "bare-pynetdicom"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()

    def start(self) -> BarePynetdicom:
        self._spawn([sys.executable, "-m", "bench.bare_scp", str(self.port), str(self.workdir / "out")], cwd=REPO)
        self._wait_ready(lambda: port_open(self.port), 30)
        return self


def push(port: int, called_ae: str, files: list[Path], associations: int = 1) -> float:
    """Seconds for storescu to send ``files``, over ``associations`` storescu processes at once (every
    ``associations``-th file each: several modalities sending at the same moment)."""
    parts = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    senders = [subprocess.Popen(
        ["/usr/bin/storescu", "-aet", "STORESCU", "-aec", called_ae, "127.0.0.1", str(port), *map(str, part)],
        env=nodelay_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for part in parts]
    errors = []
    for sender in senders:
        try:
            errors.append(sender.communicate(timeout=600)[1])
        except subprocess.TimeoutExpired:
            sender.kill()
            sender.wait()
            errors.append("storescu timed out after 600 s")
    elapsed = time.perf_counter() - start
    for sender, stderr in zip(senders, errors, strict=True):
        if sender.returncode != 0 or "Failed" in stderr:
            raise RuntimeError(f"storescu to {called_ae} failed: {stderr[-2000:]}")
    return elapsed


def one_push(label: str, make: Callable[[Path], PeerProcess], files: list[Path], workdir: Path, check: Callable[[PeerProcess], None],
             associations: int = 1) -> tuple[float, float]:
    """Start a fresh receiver, push the study once, check what it stored, stop it; (seconds, peak RSS MiB)."""
    with make(workdir) as peer:
        peer.start()  # type: ignore[attr-defined]
        port = getattr(peer, "port", None) or peer.dicom_port  # type: ignore[attr-defined]
        os.sync()  # no receiver waits behind the writeback of another's files
        seconds = push(port, getattr(peer, "ae_title", "ANY"), files, associations)
        check(peer)
        rss = peak_rss_mb(peer.pid)
    # Its files stay until the bench ends: deleting 400 files here would slow the next receiver's file
    # creates (ext4 skips the inodes of files deleted in the last seconds, 1 ms of CPU per create then).
    return seconds, rss


def measure_all(targets: dict[str, tuple[Callable[[Path], PeerProcess], Callable[[PeerProcess], None]]], files: list[Path], root: Path, runs: int,
                associations: int = 1) -> dict[str, tuple[float, float]]:
    """Rounds interleave the receivers (a, b, c, d, a, b, ...) after one untimed warm-up round, so that the
    machine's state (page cache, memory first touch) weighs on every receiver alike."""
    times: dict[str, list[float]] = {name: [] for name in targets}
    rss: dict[str, float] = {name: 0.0 for name in targets}
    for round_no in range(runs + 1):
        for name, (make, check) in targets.items():
            seconds, peak = one_push(name, make, files, root / f"{name}-{round_no}", check, associations)
            if round_no == 0:
                continue  # warm-up
            times[name].append(seconds)
            rss[name] = max(rss[name], peak)
        if round_no:
            print(f"round {round_no}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    return {name: (statistics.median(times[name]), rss[name]) for name in targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=400, help="slices in the 1x study (512x512 16-bit)")
    parser.add_argument("--associations", type=int, default=1, help="storescu processes sending the study at once "
                        "(each every n-th slice; storescp then runs with --fork)")
    parser.add_argument("--db-sync-delay-ms", type=float, default=0.0, help="the gateway's database on slower storage: "
                        "each of its commits waits this much longer for the disk (an LD_PRELOAD shim, built with cc)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="dicomgw-bench-ingest-"))
    try:
        if args.db_sync_delay_ms > 0:
            GatewayUnderTest.env = slow_db_sync(args.db_sync_delay_ms, root)
        study = generate_ct_study(root / "study1x", series=1, slices_per_series=args.slices, seed=1)
        files = study.files
        n, total_mb = len(files), study.size_bytes / 1e6
        print(f"study: {n} instances, {total_mb:.1f} MB over {args.associations} association(s) at once; median of "
              f"{args.runs} runs; TCP_NODELAY=1 everywhere", flush=True)

        def gateway_check(peer: PeerProcess) -> None:
            out = subprocess.run(
                [sys.executable, "-m", "gateway", "queue", "--json", "--config", str(peer.workdir / "gateway.toml")],
                cwd=REPO, capture_output=True, text=True, check=True,
            )
            stored = sum(row["instances"] for row in json.loads(out.stdout))
            if stored != n:
                raise RuntimeError(f"gateway recorded {stored} of {n} instances")

        def orthanc_check(peer: PeerProcess) -> None:
            if peer.instance_count() != n:  # type: ignore[attr-defined]
                raise RuntimeError("Orthanc did not store every instance")

        def files_check(peer: PeerProcess) -> None:
            count = sum(1 for p in (peer.workdir / "out").rglob("*") if p.is_file() and not p.name.startswith("."))
            if count != n:
                raise RuntimeError(f"{peer.name} wrote {count} of {n} files")

        results = measure_all(
            {
                "gateway": (GatewayUnderTest, gateway_check),
                "orthanc": (lambda w: Orthanc(w, sync_storage=True), orthanc_check),
                "storescp": (lambda w: StoreSCP(w, forked=args.associations > 1), files_check),
                "bare_pynetdicom": (BarePynetdicom, files_check),
            },
            files, root, args.runs, args.associations,
        )
        study2 = generate_ct_study(root / "study2x", series=2, slices_per_series=args.slices, seed=2)
        time_2x, rss_2x = one_push("gateway2x", GatewayUnderTest, study2.files, root / "gateway2x", lambda p: None,
                                   args.associations)

        print(f"{'receiver':<18}{'seconds':>9}{'inst/s':>9}{'MB/s':>9}{'peak RSS MB':>13}")
        for name, (seconds, rss) in results.items():
            print(f"{name:<18}{seconds:>9.2f}{n / seconds:>9.0f}{total_mb / seconds:>9.1f}{rss:>13.1f}")
        print(f"{'gateway, 2x study':<18}{time_2x:>9.2f}{2 * n / time_2x:>9.0f}{study2.size_bytes / 1e6 / time_2x:>9.1f}{rss_2x:>13.1f}")
        gw_s = results["gateway"][0]
        summary = {
            "instances": n,
            "associations": args.associations,
            "db_sync_delay_ms": args.db_sync_delay_ms,
            "study_mb": round(total_mb, 1),
            "mb_s": round(total_mb / gw_s, 1),
            "instances_s": round(n / gw_s, 1),
            "seconds": {k: round(v[0], 3) for k, v in results.items()},
            "ratio_vs_orthanc": round(results["orthanc"][0] / gw_s, 3),
            "ratio_vs_storescp": round(results["storescp"][0] / gw_s, 3),
            "ratio_vs_bare_pynetdicom": round(results["bare_pynetdicom"][0] / gw_s, 3),
            "peak_rss_mb": round(results["gateway"][1], 1),
            "peak_rss_mb_2x_study": round(rss_2x, 1),
        }
        print(json.dumps(summary))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
