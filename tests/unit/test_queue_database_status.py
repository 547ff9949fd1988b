"""What `dicomgw status` says of the queue database's room to write (SQLite): a full disk under it answers
every read, so nothing else in `status` showed it while every instance was refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.cli import _queue_database
from gateway.store import QueueStore, make_engine


def test_the_queue_database_line_says_its_free_space_and_full_or_low(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    store = QueueStore(engine)
    roomy = _queue_database(store)
    assert roomy["writable"] is True and roomy["said"].startswith("SQLite, ") and roomy["said"].endswith(f"MB free on {tmp_path}")
    free = [100 << 20]
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(1 << 30, (1 << 30) - free[0], free[0]))
    low = _queue_database(store)
    assert low["writable"] is True and low["said"] == f"SQLite, 105 MB free on {tmp_path}"
    free[0] = 10 << 20
    assert _queue_database(store)["said"].endswith("; LOW: every instance is refused (A700) once it is full")
    free[0] = 4096
    full = _queue_database(store)
    assert full["writable"] is False and full["free_bytes"] == 4096
    assert full["said"] == f"SQLite, 0 MB free on {tmp_path}: FULL: nothing can be recorded; every instance is refused (A700)"
    engine.dispose()
