"""Fixtures of the integration tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.store import QueueStore, make_engine, upgrade_schema


@pytest.fixture
def store(db_url: str) -> Iterator[QueueStore]:
    """The queue repository on a fresh database at the newest schema (SQLite, and PostgreSQL when set)."""
    engine = make_engine(db_url)
    upgrade_schema(engine)
    yield QueueStore(engine)
    engine.dispose()
