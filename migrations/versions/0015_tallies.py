"""Running totals for the web page and /metrics (``tallies``), kept by triggers, so that a scrape reads a few rows
instead of every unit, transfer and audit row the queue ever held (bench/queue_scale at 100k delivered studies:
the /metrics collection took 46x its time at 1k). Indexes for the newest units and the running transfers.

A tally row is a delta: the triggers append (never update a shared row, so concurrent writers on PostgreSQL do not
wait on or deadlock over one counter); readers sum per key; ``ReportsRepo`` folds the deltas into one row per key
with ``DELETE ... RETURNING`` (race-free in both databases). Kinds:

- ``units``: key ``in|state`` / ``out|state``, n = units (an insert, a state or direction change, a delete).
- ``transfers``: key ``direction|method|outcome``, n = attempts, b = study bytes, w = wire bytes, of ended attempts
  (a ``running`` row is read live); a deleted (archived) row keeps its share: the totals count every attempt ever.
- ``latency``: key = the bucket's upper bound in seconds (``inf`` above the last), n = imports, f = their seconds:
  from a received study's first ``received`` audit row to each ``delivered`` one.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-30 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

BOUNDS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)  # adapters.web.LATENCY_BUCKETS_S
UNIT_KEY = "(CASE WHEN {r}.origin_peer IS NULL THEN 'out' ELSE 'in' END || '|' || {r}.state)"
TRANSFER_KEY = "({r}.direction || '|' || COALESCE({r}.method, '') || '|' || {r}.outcome)"
TRANSFER_VALUES = "{sign} * {r}.bytes_moved, {sign} * COALESCE({r}.wire_bytes, {r}.bytes_moved)"


def _bucket(seconds: str) -> str:
    cases = " ".join(f"WHEN {seconds} <= {b} THEN '{b}'" for b in BOUNDS)
    return f"(CASE {cases} ELSE 'inf' END)"


def _statements(dialect: str) -> dict[str, tuple[str, str, str]]:
    """name -> (event, condition, body statements) of each trigger."""
    unit_in = f"INSERT INTO tallies (kind, key, n, b, w, f) VALUES ('units', {UNIT_KEY.format(r='NEW')}, 1, 0, 0, 0)"
    unit_out = f"INSERT INTO tallies (kind, key, n, b, w, f) VALUES ('units', {UNIT_KEY.format(r='OLD')}, -1, 0, 0, 0)"
    transfer_in = ("INSERT INTO tallies (kind, key, n, b, w, f) VALUES ('transfers', "
                   f"{TRANSFER_KEY.format(r='NEW')}, 1, {TRANSFER_VALUES.format(sign=1, r='NEW')}, 0)")
    transfer_out = ("INSERT INTO tallies (kind, key, n, b, w, f) VALUES ('transfers', "
                    f"{TRANSFER_KEY.format(r='OLD')}, -1, {TRANSFER_VALUES.format(sign=-1, r='OLD')}, 0)")
    distinct = "IS NOT" if dialect == "sqlite" else "IS DISTINCT FROM"
    received = ("(SELECT MIN(a.at) FROM audit_log a WHERE a.unit_id = NEW.unit_id AND a.to_state = 'received')")
    if dialect == "sqlite":
        seconds = f"MAX(0.0, (julianday(NEW.at) - julianday({received})) * 86400.0)"
    else:
        seconds = f"GREATEST(0.0, EXTRACT(EPOCH FROM (NEW.at - {received})))"
    latency = (f"INSERT INTO tallies (kind, key, n, b, w, f) SELECT 'latency', {_bucket('s.seconds')}, 1, 0, 0, s.seconds "
               f"FROM (SELECT {seconds} AS seconds) s WHERE s.seconds IS NOT NULL AND EXISTS "
               "(SELECT 1 FROM study_units u WHERE u.id = NEW.unit_id AND u.origin_peer IS NOT NULL)")
    return {
        "tally_units_insert": ("INSERT ON study_units", "", unit_in),
        "tally_units_update": ("UPDATE OF state, origin_peer ON study_units",
                               f"OLD.state {distinct} NEW.state OR (OLD.origin_peer IS NULL) <> (NEW.origin_peer IS NULL)",
                               f"{unit_out}; {unit_in}"),
        "tally_units_delete": ("DELETE ON study_units", "", unit_out),
        "tally_transfers_insert": ("INSERT ON transfers", "NEW.outcome <> 'running'", transfer_in),
        "tally_transfers_ended": ("UPDATE ON transfers", "OLD.outcome = 'running' AND NEW.outcome <> 'running'", transfer_in),
        "tally_transfers_changed": ("UPDATE ON transfers", "OLD.outcome <> 'running' AND NEW.outcome <> 'running' AND ("
                                    f"OLD.outcome {distinct} NEW.outcome OR OLD.method {distinct} NEW.method OR "
                                    f"OLD.bytes_moved {distinct} NEW.bytes_moved OR OLD.wire_bytes {distinct} NEW.wire_bytes "
                                    f"OR OLD.direction {distinct} NEW.direction)",
                                    f"{transfer_out}; {transfer_in}"),
        "tally_transfers_reopened": ("UPDATE ON transfers", "OLD.outcome <> 'running' AND NEW.outcome = 'running'", transfer_out),
        "tally_latency": ("INSERT ON audit_log", "NEW.to_state = 'delivered' AND NEW.unit_id IS NOT NULL", latency),
    }


def create_triggers(dialect: str) -> None:
    for name, (event, condition, body) in _statements(dialect).items():
        if dialect == "sqlite":
            when = f" WHEN {condition}" if condition else ""
            op.execute(f"CREATE TRIGGER {name} AFTER {event} FOR EACH ROW{when} BEGIN {body}; END")
        else:
            op.execute(f"CREATE FUNCTION {name}_fn() RETURNS trigger LANGUAGE plpgsql AS $$ "
                       f"BEGIN {body}; RETURN NULL; END $$")
            when = f" WHEN ({condition})" if condition else ""
            op.execute(f"CREATE TRIGGER {name} AFTER {event} FOR EACH ROW{when} EXECUTE FUNCTION {name}_fn()")


def drop_triggers(dialect: str) -> None:
    for name, (event, _condition, _body) in _statements(dialect).items():
        table = event.rsplit(" ON ", 1)[1]
        op.execute(f"DROP TRIGGER IF EXISTS {name}" + ("" if dialect == "sqlite" else f" ON {table}"))
        if dialect != "sqlite":
            op.execute(f"DROP FUNCTION IF EXISTS {name}_fn()")


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_table(
        "tallies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(120), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("b", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("w", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("f", sa.Float(), nullable=False, server_default="0"),
    )
    op.create_index("ix_tallies_kind", "tallies", ["kind"])
    op.create_index("ix_study_units_state_changed_at", "study_units", ["state_changed_at"])
    op.create_index("ix_transfers_outcome", "transfers", ["outcome"])
    op.create_index("ix_transfers_started_at", "transfers", ["started_at"])
    # what the queue already holds, as one delta per key
    op.execute(f"INSERT INTO tallies (kind, key, n, b, w, f) SELECT 'units', {UNIT_KEY.format(r='u')}, COUNT(*), 0, 0, 0 "
               f"FROM study_units u GROUP BY {UNIT_KEY.format(r='u')}")
    op.execute(f"INSERT INTO tallies (kind, key, n, b, w, f) SELECT 'transfers', {TRANSFER_KEY.format(r='t')}, COUNT(*), "
               "SUM(t.bytes_moved), SUM(COALESCE(t.wire_bytes, t.bytes_moved)), 0 FROM transfers t "
               f"WHERE t.outcome <> 'running' GROUP BY {TRANSFER_KEY.format(r='t')}")
    if dialect == "sqlite":
        seconds = "MAX(0.0, (julianday(d.at) - julianday(r.at)) * 86400.0)"
    else:
        seconds = "GREATEST(0.0, EXTRACT(EPOCH FROM (d.at - r.at)))"
    op.execute("INSERT INTO tallies (kind, key, n, b, w, f) "
               f"SELECT 'latency', {_bucket('s.seconds')}, COUNT(*), 0, 0, SUM(s.seconds) FROM ("
               f"SELECT {seconds} AS seconds FROM audit_log d "
               "JOIN (SELECT unit_id, MIN(at) AS at FROM audit_log WHERE to_state = 'received' GROUP BY unit_id) r "
               "ON r.unit_id = d.unit_id JOIN study_units u ON u.id = d.unit_id AND u.origin_peer IS NOT NULL "
               f"WHERE d.to_state = 'delivered') s GROUP BY {_bucket('s.seconds')}")
    create_triggers(dialect)


def downgrade() -> None:
    drop_triggers(op.get_bind().dialect.name)
    op.drop_index("ix_transfers_started_at", table_name="transfers")
    op.drop_index("ix_transfers_outcome", table_name="transfers")
    op.drop_index("ix_study_units_state_changed_at", table_name="study_units")
    op.drop_table("tallies")
