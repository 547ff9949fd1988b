"""`dicomgw queue` as the history grows (issue 16 §3): live units first (in flight first), paged with --limit
and --page, --state and --all; every row has its unit id and the whole Study UID, to copy into `queue retry`
and `queue show`. The real CLI in its own process on a real SQLite queue."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sqlalchemy import update

from gateway.model import InstanceHeader
from gateway.rows import StudyUnitRow
from gateway.store import QueueStore, make_engine, upgrade_schema
from tests.helpers import REPO

LONG_UID = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"  # 64 characters


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_live_units_first_paged_with_ids_and_whole_uids(tmp_path: Path) -> None:
    assert len(LONG_UID) == 64
    config = tmp_path / "gateway.toml"
    db = tmp_path / "queue.db"
    config.write_text(f'[paths]\nspool_dir = "spool"\nwatch_dir = ""\nquarantine_dir = "q"\n[queue]\ndb_url = "sqlite:///{db}"\n')
    engine = make_engine(f"sqlite:///{db}")
    upgrade_schema(engine)
    store = QueueStore(engine)
    rows = []
    for n in range(120):
        study = LONG_UID if n == 7 else f"1.2.3.{n}"
        header = InstanceHeader(f"{study}.1"[:64] if n != 7 else "1.2.3.7.1", "1.2.840.10008.5.1.4.1.1.2",
                                "1.2.840.10008.1.2.1", study, f"1.2.3.{n}.0", study_description=f"STUDY {n}", modality="CT")
        rows.append((header, f"s/{n}.dcm", 10, "a" * 64, False))
    unit_ids = store.record_instances(rows, source="test")
    ids = sorted(set(unit_ids))
    with engine.begin() as conn:  # 100 delivered (history), one sending (in flight), 19 received (live)
        conn.execute(update(StudyUnitRow).where(StudyUnitRow.id.in_(ids[:100])).values(state="delivered"))
        conn.execute(update(StudyUnitRow).where(StudyUnitRow.id == ids[110]).values(state="sending"))
    engine.dispose()

    first = json.loads(cli(config, "queue", "--json", "--limit", "15").stdout)
    assert [u["unit_id"] for u in first][:2] == [ids[110], ids[100]]  # in flight, then live in queue order
    assert len(first) == 15 and all(u["state"] != "delivered" for u in first)
    second = json.loads(cli(config, "queue", "--json", "--limit", "15", "--page", "2").stdout)
    assert [u["state"] for u in second] == ["received"] * 5 + ["delivered"] * 10  # live ones end, history follows
    assert {u["unit_id"] for u in first} & {u["unit_id"] for u in second} == set()
    assert len(json.loads(cli(config, "queue", "--json", "--all").stdout)) == 120
    delivered = json.loads(cli(config, "queue", "--json", "--state", "delivered", "--limit", "5").stdout)
    assert [u["unit_id"] for u in delivered] == sorted(ids[:100], reverse=True)[:5]  # history newest first

    table = cli(config, "queue", "--all")
    assert table.returncode == 0, table.stderr
    assert "20 live unit(s), 100 delivered" in table.stdout
    line = next(line for line in table.stdout.splitlines() if LONG_UID in line)  # whole, on one line
    assert f"{ids[7]} " in line or f" {ids[7]} " in line
    paged = cli(config, "queue", "--limit", "10")
    assert "showing 1-10" in paged.stdout and "more: dicomgw queue --page 2" in paged.stdout
    assert cli(config, "queue", "--page", "0").returncode == 2
