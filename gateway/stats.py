"""The field study's transfer metrics, computed from the ``transfers`` table (one row per attempt).

As defined in the study (section 5.6, Table 20): T = time with active transfers (the union of the
attempts' intervals, so two parallel transfers count once), N = attempted transfers, S = successful, F =
failed, success rate = S / N, MTBF = T / F. An attempt succeeded when the receiver verified the bundle
(``received``) or already held it (``held``); it failed when it was cut, rejected, refused or interrupted
by a stopped process; one still ``running`` is not counted, nor one ``suspended`` to give the link to a
STAT study (it is no failure; its time counts in T). Throughput is bundle bytes moved per second of
the byte stream (``stream_s``) of successful attempts, per method (S5B mediated, IBB) and per size class.
Bytes are study bytes (the bundle's own) at both ends; the stream's (compressed) bytes are ``wire_mb`` beside
them, with the compression ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select

from gateway.rows import StudyUnitRow, TransferArchiveRow, TransferRow, utcnow

SUCCESS = ("received", "held")
SIZE_CLASSES = ((1e6, "< 1 MB"), (10e6, "1-10 MB"), (100e6, "10-100 MB"), (1e9, "100 MB - 1 GB"), (float("inf"), ">= 1 GB"))


@dataclass(frozen=True)
class Attempt:
    peer_jid: str
    direction: str
    method: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str
    bytes_moved: int
    stream_s: float | None
    bundle_bytes: int
    wire_bytes: int = 0


def attempts(engine: Engine, since: datetime | None = None, peer: str | None = None) -> list[Attempt]:
    """Every attempt started since ``since`` (to ``peer``), the archived ones included (``gateway.store_archive``)."""
    found = []
    with engine.connect() as conn:
        for table in (TransferRow, TransferArchiveRow):
            query = select(table, StudyUnitRow.bundle_bytes).outerjoin(StudyUnitRow, table.unit_id == StudyUnitRow.id)
            if since is not None:
                query = query.where(table.started_at >= since)
            if peer:
                query = query.where(table.peer_jid.like(f"{peer}%"))
            found.extend(conn.execute(query).all())
    found.sort(key=lambda r: (r.started_at, r.id))
    return [Attempt(r.peer_jid, r.direction, r.method, r.started_at, r.ended_at, r.outcome, r.bytes_moved, r.stream_s,
                    int(r.bundle_bytes or 0), r.wire_bytes if r.wire_bytes is not None else r.bytes_moved) for r in found]


def active_seconds(items: list[Attempt], now: datetime | None = None) -> float:
    """T: the length of the union of the attempts' [start, end] intervals."""
    moment = now or utcnow()
    spans = sorted((a.started_at, a.ended_at or moment) for a in items)
    total, current_start, current_end = 0.0, None, None
    for start, end in spans:
        if current_end is None or start > current_end:
            if current_end is not None and current_start is not None:
                total += (current_end - current_start).total_seconds()
            current_start, current_end = start, end
        elif end > current_end:
            current_end = end
    if current_end is not None and current_start is not None:
        total += (current_end - current_start).total_seconds()
    return total


def size_class(size: int) -> str:
    return next(label for limit, label in SIZE_CLASSES if size < limit)


def _throughput(items: list[Attempt]) -> dict[str, float | int | None]:
    """Study bytes (the bundle's own, the same count at both ends) moved, per second of stream where the
    stream was timed; wire bytes beside them and their ratio (compression: study MB per wire MB)."""
    timed = [a for a in items if a.stream_s]
    seconds = sum(a.stream_s or 0.0 for a in timed)
    moved = sum(a.bytes_moved for a in items)
    wire = sum(a.wire_bytes for a in items)
    timed_moved = sum(a.bytes_moved for a in timed)
    return {"transfers": len(items), "mb": round(moved / 1e6, 3), "wire_mb": round(wire / 1e6, 3),
            "compression": round(moved / wire, 2) if wire else None,
            "mb_s": round(timed_moved / seconds / 1e6, 3) if seconds else 0.0}


def summary(items: list[Attempt], now: datetime | None = None) -> dict[str, object]:
    ended = [a for a in items if a.outcome not in ("running", "suspended")]
    suspended = [a for a in items if a.outcome == "suspended"]
    good = [a for a in ended if a.outcome in SUCCESS]
    failed = len(ended) - len(good)
    active = active_seconds(ended + suspended, now)
    by_method: dict[str, list[Attempt]] = {}
    by_size: dict[str, list[Attempt]] = {}
    for a in good:
        if not a.method:  # answered "held" (the peer already had it): no stream, no throughput
            continue
        by_method.setdefault(a.method, []).append(a)
        by_size.setdefault(size_class(a.bundle_bytes or a.bytes_moved), []).append(a)
    return {
        "T_s": round(active, 1), "N": len(ended), "S": len(good), "F": failed,
        "success_rate": round(len(good) / len(ended), 4) if ended else None,
        "mtbf_s": round(active / failed, 1) if failed else None,
        "failures": {o: sum(1 for a in ended if a.outcome == o) for o in sorted({a.outcome for a in ended} - set(SUCCESS))},
        "by_method": {m: _throughput(v) for m, v in sorted(by_method.items())},
        "by_size": {label: _throughput(by_size[label]) for _limit, label in SIZE_CLASSES if label in by_size},
        "running": sum(1 for a in items if a.outcome == "running"),
        "suspended": len(suspended),
    }
