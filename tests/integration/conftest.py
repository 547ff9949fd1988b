"""Fixtures of the integration tier."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.spool import Spool
from gateway.store import QueueStore, make_engine, upgrade_schema


@pytest.fixture
def store(db_url: str) -> Iterator[QueueStore]:
    """The queue repository on a fresh database at the newest schema (SQLite, and PostgreSQL when set)."""
    engine = make_engine(db_url)
    upgrade_schema(engine)
    yield QueueStore(engine)
    engine.dispose()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    """A spool (and its quarantine) under the test's temporary directory, started and stopped."""
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    spool.start()
    yield spool
    spool.stop()
