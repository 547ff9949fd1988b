"""A backlog turning stable at once (issue 15 §4): ``bash bench/stable [--units 10000] [--db URL]``.

After downtime thousands of received units may pass their stable age in the same tick. The queue (SQLite
file by default, or ``--db``) is filled through the project's own store API with ``--units`` single-instance
units, and with a tenth of that for the reference; then ``mark_stable`` runs while a second thread ingests
an instance every 20 ms (as a modality's C-STOREs would) and times each of those writes.

Printed, the last line one JSON object: ``stable_s`` (all units stable), ``stable_small_s`` (the tenth),
``linearity`` (seconds per unit at the full count over seconds per unit at the tenth: 1.0 is linear; the
quadratic code this replaced gave ~3 at 1,000 vs 250), ``ingest_max_s`` and ``ingest_p95_s`` during the run,
``ingest_idle_s`` (the same write with nothing else running, the reference). Goal: ``stable_s`` < 10 at
10,000 units, ingest answering throughout (``ingest_max_s`` far below a modality's timeout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

from gateway.model import InstanceHeader
from gateway.store import QueueStore, make_engine, upgrade_schema, utcnow


def header(n: int, study_prefix: str) -> InstanceHeader:
    return InstanceHeader(sop_instance_uid=f"{study_prefix}.{n}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid=f"{study_prefix}.{n}",
                          series_instance_uid=f"{study_prefix}.{n}.0", patient_name="BACKLOG^TEST", modality="CT")


def fill(store: QueueStore, units: int, prefix: str) -> None:
    rows = []
    for n in range(units):
        h = header(n, prefix)
        rows.append((h, f"studies/{h.study_instance_uid}/{h.sop_instance_uid}.dcm", 1000, f"{n:064x}", False))
        if len(rows) == 1000:
            store.record_instances(rows, "bench")
            rows = []
    if rows:
        store.record_instances(rows, "bench")


def run(db_url: str, units: int) -> dict[str, float]:
    engine = make_engine(db_url)
    upgrade_schema(engine)
    store = QueueStore(engine)
    prefix = f"2.25.{int(time.time() * 1000)}"
    fill(store, units, prefix)
    latencies: list[float] = []
    stop = threading.Event()

    def ingest() -> None:
        n = 0
        while not stop.is_set() and n < 100_000:
            h = header(n, prefix + ".live")
            started = time.perf_counter()
            store.record_instance(h, spool_path=f"live/{n}.dcm", size_bytes=1000, sha256=f"{n:064x}", source="bench", conflict=False)
            latencies.append(time.perf_counter() - started)
            n += 1
            time.sleep(0.02)

    writer = threading.Thread(target=ingest, daemon=True)
    writer.start()
    time.sleep(0.2)
    started = time.perf_counter()
    moved = store.mark_stable(0.0, now=utcnow() + timedelta(seconds=1))
    seconds = time.perf_counter() - started
    stop.set()
    writer.join(30)
    engine.dispose()
    return {"units": len(moved), "seconds": seconds, "ingest_max_s": max(latencies, default=0.0),
            "ingest_p95_s": statistics.quantiles(latencies, n=20)[-1] if len(latencies) >= 20 else max(latencies, default=0.0)}


def idle_write(db_url: str) -> float:
    engine = make_engine(db_url)
    upgrade_schema(engine)
    store = QueueStore(engine)
    times = []
    for n in range(20):
        h = header(n, f"2.25.{int(time.time() * 1000)}.idle")
        started = time.perf_counter()
        store.record_instance(h, spool_path=f"idle/{n}.dcm", size_bytes=1000, sha256=f"{n:064x}", source="bench", conflict=False)
        times.append(time.perf_counter() - started)
    engine.dispose()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--db", default="", help="a database URL (default: a new SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicomgw-stable-") as tmp:
        url = args.db or f"sqlite:///{Path(tmp) / 'small.db'}"
        small = run(url, max(1, args.units // 10))
        url = args.db or f"sqlite:///{Path(tmp) / 'full.db'}"
        full = run(url, args.units)
        idle = idle_write(args.db or f"sqlite:///{Path(tmp) / 'idle.db'}")
    result = {
        "units": full["units"], "stable_s": round(full["seconds"], 3), "stable_small_s": round(small["seconds"], 3),
        "linearity": round((full["seconds"] / max(1, full["units"])) / (small["seconds"] / max(1, small["units"])), 2),
        "ingest_max_s": round(full["ingest_max_s"], 4), "ingest_p95_s": round(full["ingest_p95_s"], 4),
        "ingest_idle_s": round(idle, 4), "goal_stable_s": 10.0,
    }
    print(f"{result['units']} units stable in {result['stable_s']} s ({result['stable_small_s']} s for a tenth; linearity "
          f"{result['linearity']}); ingest during it: max {result['ingest_max_s']} s, p95 {result['ingest_p95_s']} s "
          f"(idle {result['ingest_idle_s']} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
