"""What the admin web page shows, read from the queue (``adapters.web`` renders it; read-only).

Each function returns plain data for one page: the overview (XMPP connection, maintenance, the queue by
state, studies in flight with their progress, the latest moves), one study (its units, instances, audit
trail and transfer attempts), the peers (presence, pin, settings) and the transfer statistics of
``gateway.stats`` with the points of a throughput chart. ``presence(jid)`` is the agent's view of a peer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from gateway import stats
from gateway.lifecycle import State
from gateway.maintenance import maintenance
from gateway.model import StudySummary
from gateway.processes import overall
from gateway.store import QueueStore, utcnow

STATE_ORDER = [s.value for s in State]


def xmpp_state(store: QueueStore) -> dict[str, Any]:
    """The connection of a running process, from the heartbeats `dicomgw status` reads (``gateway.processes``):
    a stopped gateway's last state is never shown as current."""
    found = overall(store, utcnow())
    data = found.xmpp if found.running else {}
    state = str(data.get("state") or ("not running" if not found.running else "not configured"))
    return {"state": state, "server": str(data.get("server") or ""),
            "tls_version": str(data.get("tls_version") or ""), "last_error": str(data.get("last_error") or ""),
            "jid": str(data.get("jid") or ""),
            "updated_at": found.last_heartbeat_at.isoformat(timespec="seconds") if found.last_heartbeat_at else "",
            "running": found.running,
            "processes": [{"owner": p.owner, "summary": p.summary, "running": p.running} for p in found.processes[:10]]}


AWAITING_VERDICT = "every byte sent, waiting for the receiver's verdict"


def awaiting_verdict(s: StudySummary) -> bool:
    """An outbound unit still ``sending`` whose every byte was handed to the network: the percentage counts what
    the sender's kernel took, and buffers along the path can hold megabytes; B's verdict ends it."""
    return s.origin_peer is None and s.state == "sending" and 0 < s.bundle_bytes <= s.progress_bytes


def unit_row(s: StudySummary) -> dict[str, Any]:
    total = s.bundle_bytes or s.size_bytes
    percent = round(100 * s.progress_bytes / total, 1) if total and s.progress_bytes else (100 if s.state in ("sent", "delivered") else 0)
    return {
        "awaiting": AWAITING_VERDICT if awaiting_verdict(s) else "",
        "unit_id": s.unit_id, "study_uid": s.study_instance_uid, "state": s.state, "priority": s.priority,
        "patient": s.patient_name, "description": s.study_description, "modalities": s.modalities,
        "instances": s.instances, "mb": round(s.size_bytes / 1e6, 1),
        "peer": s.destination or s.origin_peer or "", "direction": "in" if s.origin_peer else "out",
        "percent": min(100, percent), "method": s.method or "", "error": s.error or "", "rule": s.rule or "",
        "changed": s.state_changed_at.isoformat(timespec="seconds"),
        "next_try": s.next_attempt_at.isoformat(timespec="seconds") if s.next_attempt_at else "",
    }


def spool_room(free_bytes: int, reserve_bytes: int) -> dict[str, Any]:
    """The spool's room as `dicomgw status` and the web page show it: MB free, MB kept for the site's own
    modalities, and low (peers' studies refused: ``gateway.transfer.InboundPolicy``) below the reserve."""
    return {"free_bytes": free_bytes, "reserve_bytes": reserve_bytes, "low": free_bytes < reserve_bytes,
            "free": f"{free_bytes / 1e6:,.0f}", "reserve": f"{reserve_bytes / 1e6:,.0f}"}


def overview(store: QueueStore) -> dict[str, Any]:
    counts = store.state_counts()
    by_state = [{"state": state, "out": counts.get(("out", state), 0), "in": counts.get(("in", state), 0)}
                for state in STATE_ORDER if counts.get(("out", state)) or counts.get(("in", state))]
    recent = [unit_row(s) for s in store.recent_units(50)]
    in_flight = [r for r in recent if r["state"] in ("offering", "sending", "receiving", "importing")]
    switch = maintenance(store)
    return {"xmpp": xmpp_state(store), "maintenance": switch.status_text if switch.on else "",
            "by_state": by_state, "in_flight": in_flight, "recent": recent}


def study(store: QueueStore, study_uid: str) -> dict[str, Any] | None:
    units = store.study_units(study_uid)
    if not units:
        return None
    shown = []
    for summary, instances in units:
        shown.append({
            **unit_row(summary),
            "series": sorted({(i.series_number or 0, i.series_description, i.modality) for i in instances}),
            "audit": store.audit_entries(limit=200, unit_id=summary.unit_id)[::-1],
            "transfers": store.transfers(summary.unit_id),
        })
    first = units[0][0]
    uids = {i.sop_instance_uid for _s, instances in units for i in instances}
    commitments = []
    for r in store.commitment_requests(limit=500):  # the modality's Storage Commitment requests naming this study
        named = [uid for _cls, uid in r["refs"] if uid in uids]
        if named:
            result = r["result"] or {}
            commitments.append({
                "requested_at": r["requested_at"].isoformat(timespec="seconds"), "modality": r["calling_ae"],
                "transaction": r["transaction_uid"], "instances": len(r["refs"]), "of_this_study": len(named),
                "state": r["state"], "event_type": r["event_type"] or "",
                "committed": len(result.get("committed", [])), "failed": len(result.get("failed", [])),
                "reported_at": r["reported_at"].isoformat(timespec="seconds") if r["reported_at"] else "",
                "error": r["last_error"] or ""})
    steps = [{"uid": step["sop_instance_uid"], "modality": step["calling_ae"], "status": step["status"],
              "instances": len(step["refs"]), "reason": step["reason"], "settled": step["settled"],
              "updated_at": step["updated_at"].isoformat(timespec="seconds")}
             for step in store.mpps_steps() if study_uid in step["study_uids"] or uids & {u for _c, u in step["refs"]}]
    return {"study_uid": study_uid, "patient": first.patient_name, "patient_id": first.patient_id,
            "description": first.study_description, "units": shown, "commitments": commitments, "mpps": steps}


def peers(store: QueueStore, configured: Sequence[str], presence: Callable[[str], str],
          pin_for: Callable[[str], str | None] = lambda _jid: None) -> list[dict[str, Any]]:
    """Every peer, from the database and ``[xmpp] peers``, with its presence and the pin in force (the
    database's, else the config file's)."""
    rows = {r["jid"]: r for r in store.peers()}
    for jid in configured:  # peers listed in [xmpp] peers and not (yet) in the database
        rows.setdefault(jid, {"jid": jid, "name": "", "allowed": True, "fingerprint": None, "destinations": [],
                              "max_concurrent": 1, "directions": "both", "schedule": "", "created_at": ""})
    return [{**row, "fingerprint": row["fingerprint"] or pin_for(jid), "presence": presence(jid) if row["allowed"] else "removed"}
            for jid, row in sorted(rows.items())]


def statistics(store: QueueStore, hours: float = 24.0) -> dict[str, Any]:
    """``gateway.stats`` over the last ``hours`` and the chart's points: one per finished attempt with bytes
    (its end time, MB/s over its stream time, method, outcome)."""
    items = stats.attempts(store.engine, since=utcnow() - timedelta(hours=hours))
    points = [{"at": a.ended_at.isoformat(timespec="seconds"), "mb_s": round(a.bytes_moved / a.stream_s / 1e6, 3),
               "method": a.method, "outcome": a.outcome, "direction": a.direction}
              for a in items if a.ended_at and a.stream_s and a.bytes_moved]
    return {"hours": hours, "summary": stats.summary(items), "points": points}


def chart_svg(points: list[dict[str, Any]], width: int = 720, height: int = 200) -> str:
    """An inline SVG scatter of throughput (MB/s) over time, S5B and IBB in two colours; no script needed."""
    if not points:
        return f'<svg class="chart" width="{width}" height="{height}" role="img"><text x="10" y="20">no transfer in this period</text></svg>'
    from datetime import datetime

    times = [datetime.fromisoformat(p["at"]).timestamp() for p in points]
    t0, t1 = min(times), max(times)
    top = max(p["mb_s"] for p in points) or 1.0
    pad = 40
    marks = []
    for p, t in zip(points, times, strict=True):
        x = pad + (t - t0) / ((t1 - t0) or 1) * (width - 2 * pad)
        y = height - pad - p["mb_s"] / top * (height - 2 * pad)
        colour = "#1f77b4" if p["method"] == "s5b" else "#ff7f0e"
        marks.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"><title>{p["at"]} {p["method"]} '
                     f'{p["mb_s"]} MB/s {p["outcome"]}</title></circle>')
    axis = (f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>'
            f'<text x="4" y="{pad}" font-size="11">{top:.1f} MB/s</text>'
            f'<text x="{pad}" y="{height - 10}" font-size="11">{points[0]["at"]}</text>'
            f'<text x="{width - pad - 120}" y="{height - 10}" font-size="11">{points[-1]["at"]}</text>'
            f'<text x="{width - 150}" y="16" font-size="11" fill="#1f77b4">● S5B</text>'
            f'<text x="{width - 90}" y="16" font-size="11" fill="#ff7f0e">● IBB</text>')
    return (f'<svg class="chart" width="{width}" height="{height}" role="img" aria-label="throughput per transfer">'
            f'{axis}{"".join(marks)}</svg>')
