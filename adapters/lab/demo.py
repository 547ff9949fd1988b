"""``dicomgw demo``: the chain on one machine with embedded defaults, for a newcomer to watch.

It starts Prosody on loopback with a generated config (mod_proxy65 on), a PACS for hospital B (Orthanc
with its own config when installed, else a small built-in storage SCP, labelled as such), two gateways
(hospital A and B, each with its own spool and queue in a temporary folder), generates a CT study, pushes
it into A with C-STORE (dcmtk's storescu when installed, else pynetdicom), and follows the study through
A's queue (received, stable, queued, offering, sending n %, sent, delivered) while B verifies it, imports it
into its PACS and sends the delivery receipt back. It prints the seconds of each stage (from the audit
log of both gateways) and cleans up every process it started. Without Prosody installed it shows ingest
only, and says so. ``--json`` ends with one JSON line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from adapters.dicom_scu import store_files
from adapters.lab.localpeers import (
    BuiltinStorageSCP,
    Orthanc,
    Prosody,
    free_port,
    nodelay_env,
)
from adapters.lab.modality import request_commitment, send_mpps
from adapters.lab.synthetic import generate_ct_study
from gateway.settings import (
    DicomSettings,
    PacsSettings,
    PathSettings,
    QueueSettings,
    RoutingSettings,
    Settings,
    WatchSettings,
    XmppSettings,
)

DOMAIN = "helsenett.test"
A_USER, B_USER = "radiology.hospital-a", "radiology.hospital-b"


def _site(workdir: Path, ae_title: str, stable_age_s: float) -> Settings:
    return Settings(
        dicom=DicomSettings(ae_title=ae_title, port=free_port(), allowed_calling_ae_titles=()),
        paths=PathSettings(spool_dir=workdir / "spool", watch_dir=None, quarantine_dir=workdir / "quarantine"),
        queue=QueueSettings(db_url=f"sqlite:///{workdir / 'queue.db'}", stable_age_s=stable_age_s, stable_check_interval_s=0.2),
        watch=WatchSettings(),
    )


def run_demo(as_json: bool = False, slices_per_series: int = 60, keep: bool = False, say: Any = print,
             builtin_pacs: bool = False) -> dict[str, Any]:
    from gateway.bootstrap import (
        GatewayController,  # the composition root wires the edges
    )

    workdir = Path(tempfile.mkdtemp(prefix="dicomgw-demo-"))
    log = (lambda *a: None) if as_json else say
    started: list[Any] = []
    stages: dict[str, float] = {}
    stable_age_s = 10.0  # the fallback: with the modality's MPPS the study is complete at its N-SET
    try:
        prosody = None
        a_settings = _site(workdir / "hospital-a", "HOSPITAL_A", stable_age_s)
        b_settings = _site(workdir / "hospital-b", "HOSPITAL_B", stable_age_s)
        if Prosody.available():
            variant = Path(__file__).resolve().parents[2] / "conf" / "prosody" / "plugins"
            prosody = Prosody(workdir / "prosody", domain=DOMAIN, plugin_paths=[variant] if variant.is_dir() else [])
            for user in (A_USER, B_USER):
                prosody.add_account(user, f"demo-{user}")
            prosody.start()
            started.append(prosody)
            log(f"XMPP server: Prosody on 127.0.0.1:{prosody.c2s_port}, SOCKS5 proxy {prosody.proxy_jid} on :{prosody.proxy_port}"
                + (" (the proxy65 variant from conf/prosody)" if variant.is_dir() else " (Debian's proxy65)"))

            identities = {user: _identity(workdir / site, user) for user, site in ((A_USER, "hospital-a"), (B_USER, "hospital-b"))}
            log(f"TLS to the XMPP server: STARTTLS required, verified against the CA made for this run ({prosody.ca_file})")
            log(f"end-to-end identities: A SHA-256 {identities[A_USER][2][:16]}..., B SHA-256 {identities[B_USER][2][:16]}..., "
                "each pinned by the other")

            def xmpp(user: str, peer: str) -> XmppSettings:
                key, cert, _fp = identities[user]
                return XmppSettings(
                    jid=f"{user}@{DOMAIN}/gw1", password=f"demo-{user}", port=prosody.c2s_port, use_tls=True,
                    ca_file=prosody.ca_file, identity_key_file=key, identity_cert_file=cert,
                    peers=(f"{peer}@{DOMAIN}",), peer_pins=((f"{peer}@{DOMAIN}", identities[peer][2]),),
                    retry_base_s=0.5, retry_max_s=5, dispatch_interval_s=0.1,
                )

            a_settings = replace(a_settings, xmpp=xmpp(A_USER, B_USER), routing=RoutingSettings(default_destination=B_USER))
            b_settings = replace(b_settings, xmpp=xmpp(B_USER, A_USER))
            use_orthanc = Orthanc.available() and not builtin_pacs
            pacs: Any = Orthanc(workdir / "orthanc", ae_title="PACS_B") if use_orthanc else BuiltinStorageSCP(workdir / "pacs")
            pacs.start()
            started.append(pacs)
            pacs_label = (
                f"Orthanc (AE PACS_B, DICOM :{pacs.dicom_port}, REST :{pacs.http_port})" if use_orthanc
                else f"{pacs.label}: " + ("asked for with --builtin-pacs" if builtin_pacs else "Orthanc is not installed (apt-get install orthanc)")
            )
            log(f"PACS of hospital B: {pacs_label}")
            b_settings = replace(b_settings, pacs=PacsSettings(
                ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.dicom_port, calling_ae_title="HOSPITAL_B",
                retry_base_s=0.5, retry_max_s=5,
            ))
        else:
            log("Prosody is not installed: showing ingest only (install it with: apt-get install prosody)")
        b_controller = GatewayController(b_settings)
        b = b_controller.start()
        started.append(b_controller)
        a_controller = GatewayController(a_settings)
        a = a_controller.start()
        started.append(a_controller)
        log(f"gateway A: {a_settings.xmpp.jid or 'no XMPP'}, DICOM AE HOSPITAL_A on 127.0.0.1:{a.scp.port}")
        log(f"gateway B: {b_settings.xmpp.jid or 'no XMPP'}, DICOM AE HOSPITAL_B on 127.0.0.1:{b.scp.port}")

        study = generate_ct_study(workdir / "modality", series=2, slices_per_series=slices_per_series)
        log(f"modality: CT study {study.study_instance_uid}, {len(study.files)} instances, {study.size_bytes / 1e6:.1f} MB")
        step = generate_uid()
        mpps_created = send_mpps(a.scp.port, "HOSPITAL_A", study, step, "create") == 0x0000  # the procedure starts
        t0 = time.perf_counter()
        sender, acknowledged = _push(a.scp.port, [str(p) for p in study.files])
        stages["ingest_s"] = time.perf_counter() - t0
        log(f"modality -> A ({sender}): {acknowledged}/{len(study.files)} acknowledged in {stages['ingest_s']:.2f} s")
        completed_at = time.perf_counter()
        mpps_done = mpps_created and send_mpps(a.scp.port, "HOSPITAL_A", study, step, "complete") == 0x0000
        commit_started = time.perf_counter()
        event_type, committed, failed = request_commitment(a.scp.port, "HOSPITAL_A", study)
        commitment_s = time.perf_counter() - commit_started
        log(f"commitment report from the gateway after {commitment_s:.2f} s: event type {event_type}, "
            f"{committed} committed, {failed} failed" if event_type else "commitment: no report")

        final = "delivered" if prosody else "stable"
        stable_after: float | None = None
        last_shown, t1 = "", time.perf_counter()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            units = a.store.studies()
            unit = units[0] if units else None
            shown = _state_line(unit)
            if shown != last_shown:
                log(f"  A: {shown}  (+{time.perf_counter() - t1:.1f} s)")
                last_shown = shown
            if stable_after is None and unit is not None and unit.state not in ("received",):
                stable_after = time.perf_counter() - completed_at
            if unit is not None and unit.state in (final, "failed"):
                break
            time.sleep(0.1)
        a_unit = a.store.studies()[0]
        b_units = [s for s in b.store.studies() if s.origin_peer]
        stages["stable_wait_s"] = stable_after if stable_after is not None else stable_age_s
        log(f"completeness by MPPS after {stable_after:.2f} s (stable age {stable_age_s:g} s not waited)"
            if mpps_done and stable_after is not None and stable_after < stable_age_s else
            f"completeness by stable age ({stable_age_s:g} s)")
        if prosody is not None:
            stages.update(chain_stages(a.store, b.store))
        stages["total_s"] = time.perf_counter() - t0
        in_pacs = pacs.instance_count() if prosody is not None else 0
        if b_units:
            log(f"  B: {b_units[0].state}: {b_units[0].instances} instances verified (SHA-256), {in_pacs} in its PACS, from {b_units[0].origin_peer}")
        result = {
            "study_uid": study.study_instance_uid,
            "instances_sent": len(study.files),
            "instances_acknowledged": acknowledged,
            "instances_queued": a_unit.instances,
            "bytes": a_unit.size_bytes,
            "state_a": a_unit.state,
            "instances_received_b": b_units[0].instances if b_units else 0,
            "state_b": b_units[0].state if b_units else None,
            "method": a_unit.method,
            "xmpp": prosody is not None,
            "sender": sender,
            "stages_s": {k: round(v, 3) for k, v in stages.items()},
            "instances_in_pacs": in_pacs,
            "delivered": a_unit.state == "delivered",
            "xmpp_tls": a.agent.status.get("tls_version") if a.agent is not None else None,
            "end_to_end": prosody is not None,
            "pacs": ("orthanc" if isinstance(pacs, Orthanc) else "built-in storage SCP") if prosody is not None else None,
            "mpps_completed": mpps_done,
            "stable_after_mpps_s": round(stable_after, 3) if stable_after is not None else None,
            "commitment": {"event_type": event_type, "committed": committed, "failed": failed,
                           "report_s": round(commitment_s, 3)},
        }
        log(
            f"summary: {result['instances_in_pacs']} of {result['instances_sent']} instances in B's PACS, "
            f"{'delivered' if result['delivered'] else 'NOT delivered'} (A's queue), "
            f"{result['bytes'] / 1e6:.1f} MB, method {result['method'] or '-'}, "
            + ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in result["stages_s"].items())
        )
        if as_json:
            say(json.dumps(result))
        return result
    finally:
        for thing in reversed(started):
            thing.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def chain_stages(a_store: Any, b_store: Any) -> dict[str, float]:
    """Seconds of each stage after the stable age, from both gateways' audit logs (same clock on one machine):
    transfer (A offering -> A sent; B imports verified instances meanwhile), import (A sent -> B delivered: what
    the import adds after the transfer), receipt (B delivered -> A delivered)."""
    from datetime import datetime

    def first(store: Any, state: str, last: bool = False) -> datetime | None:
        entries = [e for e in store.audit_entries(limit=10000) if e["to_state"] == state]  # newest first
        if not entries:
            return None
        return datetime.fromisoformat(entries[0 if last else -1]["at"])

    marks = {
        "offering": first(a_store, "offering"), "sent": first(a_store, "sent", last=True),
        "b_delivered": first(b_store, "delivered", last=True),
        "a_delivered": first(a_store, "delivered", last=True),
    }
    stages = {}
    for name, start, end in (("transfer_s", "offering", "sent"), ("import_s", "sent", "b_delivered"),
                             ("receipt_s", "b_delivered", "a_delivered")):
        if marks[start] and marks[end]:
            stages[name] = max(0.0, (marks[end] - marks[start]).total_seconds())  # type: ignore[operator]
    return stages


def _state_line(unit: Any) -> str:
    if unit is None:
        return "waiting for the first instance"
    text = f"{unit.state}, {unit.instances} instances"
    if unit.state == "sending" and unit.bundle_bytes:
        text += f", {100 * unit.progress_bytes // unit.bundle_bytes} % over {unit.method}"
    if unit.state == "sent":
        text += f" over {unit.method}, verified by B; B imports it into its PACS"
    if unit.state == "delivered":
        text += f" over {unit.method}: B's PACS holds every instance (receipt from B)"
    if unit.error and unit.state not in ("sent",):
        text += f" ({unit.error})"
    return text


def _identity(site_dir: Path, user: str) -> tuple[Path, Path, str]:
    from adapters.xmpp.e2e import ensure_identity

    key, cert = site_dir / "identity" / "gateway.key", site_dir / "identity" / "gateway.crt"
    return key, cert, ensure_identity(key, cert, f"{user}@{DOMAIN}")[0].fingerprint


DCMTK_STORESCU = "/usr/bin/storescu"  # by path: the venv's pynetdicom ships a storescu of its own


def _push(port: int, files: list[str]) -> tuple[str, int]:
    if Path(DCMTK_STORESCU).exists():
        done = subprocess.run(
            [DCMTK_STORESCU, "-v", "-aet", "MODALITY", "-aec", "HOSPITAL_A", "127.0.0.1", str(port), *files],
            env=nodelay_env(), capture_output=True, text=True, timeout=600, check=False,
        )
        return "dcmtk storescu", (done.stdout + done.stderr).count("Received Store Response (Success)")
    statuses = store_files("HOSPITAL_A", "127.0.0.1", port, files, calling_ae="MODALITY")
    return "pynetdicom C-STORE SCU", sum(1 for s in statuses if s == 0)
