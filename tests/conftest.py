"""Fixtures shared by every tier: database URLs (SQLite always, PostgreSQL when GATEWAY_TEST_PG_URL is set)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

PG_URL = os.environ.get("GATEWAY_TEST_PG_URL", "")


def _pg_param() -> list[object]:
    if PG_URL:
        return [pytest.param("postgresql", marks=pytest.mark.postgres)]
    if os.environ.get("CI"):
        raise RuntimeError("CI must set GATEWAY_TEST_PG_URL (.ci/run starts PostgreSQL)")
    # Local runs without a PostgreSQL: the queue tests still run on SQLite; CI always runs both.
    return [pytest.param("postgresql", marks=pytest.mark.skip(reason="GATEWAY_TEST_PG_URL not set"))]


@pytest.fixture(params=["sqlite", *_pg_param()])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new schema-isolated PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'queue.db'}"
        return
    name = f"gwtest_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
