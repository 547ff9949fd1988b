"""``dicomgw demo``: the chain on one machine with embedded defaults, for a newcomer to watch.

Today it shows ingest: a gateway with its own temporary spool and queue, a generated CT study pushed
into it with C-STORE (dcmtk's storescu when installed, else pynetdicom), the queue until the study is
stable, and a summary. It cleans up everything it started. ``--json`` ends with one JSON line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from adapters.dicom_scu import store_files
from adapters.localpeers import free_port, nodelay_env
from adapters.synthetic import generate_ct_study
from gateway.settings import DicomSettings, PathSettings, QueueSettings, Settings, WatchSettings


def run_demo(as_json: bool = False, slices_per_series: int = 60, keep: bool = False, say: Any = print) -> dict[str, Any]:
    from gateway.bootstrap import GatewayController  # the composition root wires the edges

    workdir = Path(tempfile.mkdtemp(prefix="dicomgw-demo-"))
    log = (lambda *a: None) if as_json else say
    stages: dict[str, float] = {}
    settings = Settings(
        dicom=DicomSettings(ae_title="HOSPITAL_A", port=free_port(), allowed_calling_ae_titles=()),
        paths=PathSettings(spool_dir=workdir / "a" / "spool", watch_dir=None, quarantine_dir=workdir / "a" / "quarantine"),
        queue=QueueSettings(db_url=f"sqlite:///{workdir / 'a' / 'queue.db'}", stable_age_s=2.0, stable_check_interval_s=0.2),
        watch=WatchSettings(),
    )
    controller = GatewayController(settings)
    try:
        t0 = time.perf_counter()
        gateway = controller.start()
        log(f"gateway A: AE HOSPITAL_A on 127.0.0.1:{gateway.scp.port}, spool {settings.paths.spool_dir}")
        study = generate_ct_study(workdir / "modality", series=2, slices_per_series=slices_per_series, rows=512, columns=512)
        stages["generate_s"] = time.perf_counter() - t0
        log(f"modality: generated CT study {study.study_instance_uid}: {len(study.files)} instances, {study.size_bytes / 1e6:.1f} MB")
        t1 = time.perf_counter()
        sender, acknowledged = _push(gateway.scp.port, [str(p) for p in study.files])
        stages["ingest_s"] = time.perf_counter() - t1
        log(f"modality -> gateway A with {sender}: {acknowledged} of {len(study.files)} acknowledged in {stages['ingest_s']:.2f} s")
        t2 = time.perf_counter()
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            units = gateway.store.studies()
            state = units[0].state if units else ""
            if state == "stable":
                break
            time.sleep(0.2)
        stages["stable_wait_s"] = time.perf_counter() - t2
        (summary,) = gateway.store.studies()
        log(f"queue: study {summary.study_instance_uid} is {summary.state} with {summary.instances} instances, {summary.size_bytes / 1e6:.1f} MB")
        result = {
            "study_uid": study.study_instance_uid,
            "instances_sent": len(study.files),
            "instances_acknowledged": acknowledged,
            "instances_queued": summary.instances,
            "state": summary.state,
            "bytes": summary.size_bytes,
            "sender": sender,
            "stages_s": {k: round(v, 3) for k, v in stages.items()},
            "method": None,
            "delivered": False,
            "instances_in_pacs": 0,
            "note": "transfer over XMPP and import into the PACS are not built yet",
        }
        if as_json:
            say(json.dumps(result))
        return result
    finally:
        controller.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _push(port: int, files: list[str]) -> tuple[str, int]:
    if shutil.which("storescu"):
        done = subprocess.run(
            ["storescu", "-v", "-aet", "MODALITY", "-aec", "HOSPITAL_A", "127.0.0.1", str(port), *files],
            env=nodelay_env(), capture_output=True, text=True, timeout=600, check=False,
        )
        return "dcmtk storescu", (done.stdout + done.stderr).count("Received Store Response (Success)")
    statuses = store_files("HOSPITAL_A", "127.0.0.1", port, files, calling_ae="MODALITY")
    return "pynetdicom C-STORE SCU", sum(1 for s in statuses if s == 0)
