"""A queue with history (issue 18 §3): ``bash bench/queue_scale [--studies 1000,10000,100000] [--db URL] [--quick]``.

For each count a queue (SQLite file by default, or ``--db``: PostgreSQL, emptied first) is filled through the
project's own store API with that many delivered studies of 10 instances (each with its transfer row and the audit trail of
its six state moves, delivered over the days before, 1000 a minute; its running totals folded and, on PostgreSQL,
vacuumed and analyzed, as a queue that grew over a year would be) plus 50 live ones (stable, routed on the first tick), then timed: the dispatcher's tick (routing, receipts
overdue) and one claim, ``dicomgw queue`` (a process, the first page), ``dicomgw stats --since 24h`` (a process),
the web page's overview, the ``/metrics`` collection (these three in-process reads: the best of three), and an ingest of 400 instances through ``record_instance``
(the SCP's per-instance write); then the retention of rows (the gateway's ``RowArchiver``) moves every delivered study's rows to the archive, 100
studies per batch (``archive_batch_max``: the longest batch, its commit's passive checkpoint included, which holds
no other writer; ``ingest_during_archive_max``/``_median``: the SCP's instance write, every 5 ms on another thread
meanwhile: what the site's other writers wait for; ``archive_all_s`` grows
with the history by design and is left out of the ratios), ``dicomgw queue show`` of an archived study and the
``/metrics`` collection once more. Printed: a table, then one JSON line with the seconds per operation and count and
``worst_100k_vs_1k`` (the largest ratio of an operation's time at the largest count over its time at the smallest;
goal <= 2: the cost follows the live work, not the history).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text, update

from gateway.claims import Claims
from gateway.dispatch import Dispatcher
from gateway.model import InstanceHeader
from gateway.retention import RowArchiver
from gateway.routing import Router, Rules
from gateway.rows import AuditRow, StudyUnitRow, TransferRow
from gateway.store import QueueStore, make_engine, upgrade_schema, utcnow

REPO = Path(__file__).resolve().parents[1]
PEER = "radiology.hospital-b@helsenett.test"


def header(study: str, n: int) -> InstanceHeader:
    return InstanceHeader(f"{study}.{n}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", study, f"{study}.0",
                          patient_name="HISTORY^TEST", study_description="CT HISTORY", modality="CT")


def fill(store: QueueStore, studies: int, live: int = 50) -> None:
    for start in range(0, studies + live, 100):
        rows = [(header(f"1.2.3.{k}", n), f"studies/{k}/{n}.dcm", 1000, f"{k:032x}{n:032x}", False)
                for k in range(start, min(studies + live, start + 100)) for n in range(10)]
        store.record_instances(rows, source="scp:CT01\\DICOMGW@127.0.0.1")
    old = utcnow() - timedelta(days=3)
    with store.engine.begin() as conn:
        for start in range(1, studies + 1, 1000):  # delivered over days, not all in one instant: 1000 per minute
            conn.execute(update(StudyUnitRow).where(StudyUnitRow.id >= start, StudyUnitRow.id < start + 1000).values(
                state="delivered", destination=PEER, state_changed_at=old - timedelta(minutes=(studies - start) // 1000),
                bundle_bytes=10_000, receipt_at=old))
        conn.execute(update(StudyUnitRow).where(StudyUnitRow.id > studies).values(state="stable"))
        moves = (("received", "stable"), ("stable", "queued"), ("queued", "offering"), ("offering", "sending"),
                 ("sending", "sent"), ("sent", "delivered"))
        for start in range(1, studies + 1, 2000):  # each delivered unit's audit trail, as the state machine writes it
            conn.execute(insert(AuditRow), [
                {"at": old, "unit_id": u, "study_instance_uid": f"1.2.3.{u - 1}", "event": "transition",
                 "from_state": a, "to_state": b, "detail": f"{a} -> {b}"}
                for u in range(start, min(studies + 1, start + 2000)) for a, b in moves])
        for start in range(1, studies + 1, 5000):
            conn.execute(insert(TransferRow), [
                {"unit_id": u, "sid": f"s{u}", "peer_jid": f"{PEER}/gw1", "direction": "out", "method": "s5b",
                 "offset_bytes": 0, "bytes_moved": 10_000, "started_at": old, "ended_at": old, "outcome": "received",
                 "stream_s": 0.01} for u in range(start, min(studies + 1, start + 5000))])
    store.fold_tallies("units")  # what a queue that grew over a year holds: its running totals folded as it went
    store.fold_tallies("transfers")
    if store.engine.dialect.name == "postgresql":
        # ... and its tables vacuumed and their statistics gathered by autovacuum many times; one filled in
        # minutes has not (400k folded deltas left as dead rows, a planner that thinks the tables small).
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))


class OfflineSender:
    online = True

    def peer_availability(self, bare_jid: str, priority: str = "routine") -> tuple[str | None, str]:
        return None, "offline"


def timed(fn, *args, runs: int = 1) -> float:  # type: ignore[no-untyped-def]
    """The best of ``runs`` calls (repeatable reads: the first call of a fresh process also pays for warming caches)."""
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - started)
    return best


def cli(config: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(config)], cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    return time.perf_counter() - started


def measure(db_url: str, config: Path) -> dict[str, float]:
    from adapters.web import QueueCollector
    from gateway import dashboard

    engine = make_engine(db_url)
    store = QueueStore(engine)
    router = Router(Rules((), "radiology.hospital-b"), "helsenett.test", store, Path("/nonexistent"),
                    lambda _p, keys: {k: "" for k in keys}, store.peer_configs)
    dispatcher = Dispatcher(store, Path("/nonexistent"), OfflineSender(), router, claims=Claims(engine))
    result = {"tick": timed(lambda: asyncio.run(dispatcher.tick()))}  # routes the 50 live ones, offers none
    result["tick_again"] = timed(lambda: asyncio.run(dispatcher.tick()))
    result["claim"] = timed(lambda: [dispatcher.claims.release(u) for u in dispatcher.claims.claim_due(dispatcher._due_where({}), 1)],
                            runs=3)
    result["queue_cli"] = cli(config, "queue")
    result["stats_cli"] = cli(config, "stats", "--since", "24h")
    result["web_overview"] = timed(dashboard.overview, store, runs=3)
    result["metrics"] = timed(lambda: list(QueueCollector(store, lambda: True).collect()), runs=3)
    started = time.perf_counter()
    for n in range(400):
        store.record_instance(header("9.9.9", n), spool_path=f"studies/ingest/{n}.dcm", size_bytes=1000,
                              sha256=f"{n:064x}", source="scp:CT01\\DICOMGW@127.0.0.1", conflict=False)
    result["ingest_400"] = time.perf_counter() - started
    # retention of rows: every delivered unit's rows to the archive, batch by batch (what holds other writers: a batch)
    with engine.begin() as conn:
        conn.execute(update(StudyUnitRow).where(StudyUnitRow.state == "delivered").values(purged_at=utcnow()))
    cutoff, batches, started = utcnow() - timedelta(days=1), [], time.perf_counter()
    # Meanwhile a modality's instances keep coming (another thread, the SCP's write): how long each one waits is
    # what the retention makes the site's other writers wait. A batch's own time also counts SQLite's passive
    # checkpoint after its commit, which holds no other writer.
    archiving, waits = threading.Event(), []

    def ingest_meanwhile() -> None:
        for n in range(100_000):  # bounded; ends with the archive
            if not archiving.is_set():
                return
            began = time.perf_counter()
            store.record_instance(header("9.9.8", n), spool_path=f"studies/meanwhile/{n}.dcm", size_bytes=1000,
                                  sha256=f"{n + 1_000_000:064x}", source="scp:CT01\\DICOMGW@127.0.0.1", conflict=False)
            waits.append(time.perf_counter() - began)
            time.sleep(0.005)  # a modality's pace: one instance every few ms

    archive_rows = store.archive_rows

    def timed_batch(*args: Any, **kwargs: Any) -> list[int]:
        batch_started = time.perf_counter()
        moved = archive_rows(*args, **kwargs)
        if moved:
            batches.append(time.perf_counter() - batch_started)
        return moved

    store.archive_rows = timed_batch  # type: ignore[method-assign]
    archiving.set()
    writer = threading.Thread(target=ingest_meanwhile, name="ingest-meanwhile")
    writer.start()
    try:  # the gateway's own retention loop, its budget per tick unbounded here
        RowArchiver(store, keep_rows_days=(utcnow() - cutoff).total_seconds() / 86400, keep_delivered_s=0,
                    batch=100, budget_s=3600).tick()
    finally:
        archiving.clear()
        writer.join(120)
        store.archive_rows = archive_rows  # type: ignore[method-assign]
    result["archive_all_s"] = time.perf_counter() - started
    result["ingest_during_archive_max"] = max(waits, default=0.0)
    result["ingest_during_archive_median"] = sorted(waits)[len(waits) // 2] if waits else 0.0
    result["archive_batch_max"] = max(batches, default=0.0)
    result["archive_batch_median"] = sorted(batches)[len(batches) // 2] if batches else 0.0
    result["queue_show_archived"] = cli(config, "queue", "show", "1.2.3.0")
    result["metrics_after_archive"] = timed(lambda: list(QueueCollector(store, lambda: True).collect()), runs=3)
    engine.dispose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", default="1000,10000,100000")
    parser.add_argument("--db", default="", help="a PostgreSQL URL (emptied first); default: SQLite files")
    parser.add_argument("--quick", action="store_true", help="1,000 and 10,000 studies")
    args = parser.parse_args()
    counts = [1000, 10000] if args.quick else [int(c) for c in args.studies.split(",")]
    work = Path(tempfile.mkdtemp(prefix="dicomgw-queue-scale-"))
    try:
        results: dict[int, dict[str, float]] = {}
        for count in counts:
            db_url = args.db or f"sqlite:///{work / f'queue-{count}.db'}"
            engine = make_engine(db_url)
            if args.db:
                with engine.begin() as conn:
                    conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
            upgrade_schema(engine)
            filled = time.perf_counter()
            fill(QueueStore(engine), count)
            engine.dispose()
            config = work / f"gateway-{count}.toml"
            config.write_text(f'[paths]\nspool_dir = "{work}/spool"\nwatch_dir = ""\nquarantine_dir = "{work}/q"\n'
                              f'[queue]\ndb_url = "{db_url}"\n')
            results[count] = measure(db_url, config)
            print(f"{count:>7} studies (filled in {time.perf_counter() - filled:.0f} s): "
                  + "  ".join(f"{k} {v:.3f}" for k, v in results[count].items()), flush=True)
        first, last = results[counts[0]], results[counts[-1]]
        # archive_all_s moves every delivered study: it grows with the history by design (its batch must not)
        ratios = {k: round(last[k] / first[k], 2) for k in first if first[k] > 0 and k != "archive_all_s"}
        print(json.dumps({"db": "postgresql" if args.db else "sqlite", "counts": counts,
                          "seconds": {str(c): {k: round(v, 4) for k, v in r.items()} for c, r in results.items()},
                          "ratios": ratios, "worst_100k_vs_1k": max(ratios.values()),
                          "worst_operation": max(ratios, key=ratios.get)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
