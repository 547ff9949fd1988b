"""`dicomgw queue` as the history grows (issue 16 §3): ``bash bench/queue_view [--studies 0,1000,10000] [--db URL]``.

For each count, a queue (SQLite file by default, or ``--db``: PostgreSQL, emptied first) is filled through the
project's own store API with that many studies of 10 instances, all but 50 of them delivered (history), and the
real CLI is timed as an admin runs it: ``dicomgw queue`` (first page, live units first), ``queue --json`` and
``queue --page 3``. The reference is ``dicomgw --help`` (the interpreter and imports: what every command pays).

Printed: a table, then one JSON line with ``queue_s`` per count, ``reference_s``, and ``largest_vs_smallest``
(the default view at the largest count over the smallest: the view follows the live work, not the history).
Goal (issue 16): 10,000 studies under 3 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import text, update

from gateway.model import InstanceHeader
from gateway.rows import StudyUnitRow
from gateway.store import QueueStore, make_engine, upgrade_schema

REPO = Path(__file__).resolve().parents[1]


def fill(db_url: str, studies: int, live: int = 50) -> None:
    engine = make_engine(db_url)
    upgrade_schema(engine)
    store = QueueStore(engine)
    for start in range(0, studies, 1000):
        rows = []
        for k in range(start, min(studies, start + 1000)):
            for j in range(10):
                h = InstanceHeader(f"1.2.3.{k}.{j}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", f"1.2.3.{k}",
                                   f"1.2.3.{k}.0", patient_name="HISTORY^TEST", study_description=f"CT {k}", modality="CT")
                rows.append((h, f"studies/{k}/{j}.dcm", 1000, "a" * 64, False))
        store.record_instances(rows, source="bench")
    with engine.begin() as conn:
        conn.execute(update(StudyUnitRow).where(StudyUnitRow.id <= studies - live).values(state="delivered"))
    engine.dispose()


def timed(config: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(config)], cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", default="0,1000,10000")
    parser.add_argument("--db", default="", help="a PostgreSQL URL (emptied first); default: SQLite files")
    args = parser.parse_args()
    counts = [int(c) for c in args.studies.split(",")]
    work = Path(tempfile.mkdtemp(prefix="dicomgw-queue-view-"))
    try:
        results = {}
        reference = timed(work / "none.toml", "--help")
        print(f"{'studies':>8} {'queue':>8} {'--json':>8} {'--page 3':>9}   (reference: dicomgw --help {reference:.2f} s)")
        for count in counts:
            db_url = args.db or f"sqlite:///{work / f'queue-{count}.db'}"
            if args.db:
                engine = make_engine(db_url)
                with engine.begin() as conn:
                    conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
                engine.dispose()
            fill(db_url, count)
            config = work / f"gateway-{count}.toml"
            config.write_text(f'[paths]\nspool_dir = "{work}/spool"\nwatch_dir = ""\nquarantine_dir = "{work}/q"\n'
                              f'[queue]\ndb_url = "{db_url}"\n')
            timed(config, "queue")  # the first run upgrades nothing more, but warms the file cache
            row = [min(timed(config, "queue") for _ in range(3)), min(timed(config, "queue", "--json") for _ in range(3)),
                   min(timed(config, "queue", "--page", "3") for _ in range(3))]
            results[count] = row
            print(f"{count:>8} {row[0]:>8.2f} {row[1]:>8.2f} {row[2]:>9.2f}")
        print(json.dumps({"queue_s": {str(c): round(r[0], 3) for c, r in results.items()},
                          "queue_json_s": {str(c): round(r[1], 3) for c, r in results.items()},
                          "reference_s": round(reference, 3),
                          "largest_vs_smallest": round(results[counts[-1]][0] / results[counts[0]][0], 2)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
