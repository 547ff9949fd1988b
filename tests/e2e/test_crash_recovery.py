"""Crash cases as regression tests: `dicomgw run` processes, real Prosody and Orthanc, links capped through
``adapters.lab.netem.FaultRelay`` so that a kill lands mid-stream (and B's PACS link so that one lands
mid-import). Each case ends with the study `delivered` at both ends, every SOP Instance UID once in Orthanc,
and no unit left in a transient state."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.lab.localpeers import Orthanc, Prosody
from adapters.lab.netem import FaultRelay
from adapters.lab.synthetic import generate_ct_study
from bench.soak import A_USER, B_USER, Site
from bench.transfer import DOMAIN, identity
from tests.helpers import storescu, wait_for

TRANSIENT = {"offering", "sending", "receiving", "importing"}


def state(site: Site) -> str:
    unit = site.gateway.unit_state()
    return unit[0] if unit else ""


def kill_and_restart(site: Site) -> None:
    site.restart(0.5)


def in_orthanc(pacs: Orthanc, uid: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{pacs.http_port}/tools/lookup", data=uid.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return sum(1 for hit in json.loads(response.read()) if hit.get("Type") == "Instance")


CASES: dict[str, tuple[str, str, Callable[..., None]]] = {
    # case: (whose state to wait for, which state, what to kill)
    "A killed mid-send": ("a", "sending", lambda a, b, server: kill_and_restart(a)),
    "B killed mid-receive": ("a", "sending", lambda a, b, server: kill_and_restart(b)),
    "B killed mid-import": ("pacs", "some", lambda a, b, server: kill_and_restart(b)),
    "Prosody killed mid-transfer": ("a", "sending", lambda a, b, server: (server.kill(), time.sleep(1.0), server.start())),
    "A killed between ingest and send": ("a", "received", lambda a, b, server: kill_and_restart(a)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_crash_ends_delivered_once(tmp_path: Path, case: str) -> None:
    whose, wanted, strike = CASES[case]
    server = Prosody(tmp_path / "prosody", domain=DOMAIN)
    for user in (A_USER, B_USER):
        server.add_account(user, f"pw-{user}")
    pacs = Orthanc(tmp_path / "orthanc", ae_title="PACS_B")
    pacs_link = FaultRelay(0, rate_bytes_s=6e6)  # a slow PACS: the import lasts seconds
    a = b = None
    try:
        server.start()
        pacs.start()
        pacs_link.target_port = pacs.dicom_port
        a_fp, b_fp = identity(tmp_path / "a"), identity(tmp_path / "b")
        b = Site(tmp_path / "b", B_USER, A_USER, server, 12e6, fingerprint=a_fp)
        b.gateway.text += (f'[pacs]\nae_title = "PACS_B"\nhost = "127.0.0.1"\nport = {pacs_link.port}\nretry_base_s = 0.3\n'
                           f'retry_max_s = 2\n')
        a = Site(tmp_path / "a", A_USER, B_USER, server, 12e6, B_USER, fingerprint=b_fp)
        if wanted == "received":  # time to kill A before the study is stable
            a.gateway.text = a.gateway.text.replace("stable_age_s = 0.3", "stable_age_s = 3")
        b.gateway.start()
        a.gateway.start()
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=60, rows=512, columns=512)  # ~32 MB
        assert storescu(a.gateway.port, study.files).returncode == 0
        if whose == "pacs":  # B's import streams into the PACS while it receives: some instances there, not all
            wait_for(lambda: 0 < pacs.instance_count() < len(study.files), 120, 0.02, what="the PACS to hold some")
        else:
            watched = a if whose == "a" else b
            wait_for(lambda: state(watched) == wanted, 120, 0.02, what=f"{whose.upper()} to be {wanted}")
        strike(a, b, server)
        wait_for(lambda: state(a) == "delivered" and state(b) == "delivered", 180, 0.5,
                 what=lambda: f"delivered at both ends (A {state(a)}, B {state(b)})")
        for site in (a, b):
            states = [u["state"] for u in site.gateway.cli("queue")]
            assert not TRANSIENT & set(states) and states == ["delivered"], states
        assert [in_orthanc(pacs, uid) for uid in study.sop_instance_uids] == [1] * len(study.sop_instance_uids)
        assert pacs.instance_count() == len(study.sop_instance_uids)
    finally:
        for site in (a, b):
            if site is not None:
                site.stop()
        pacs_link.stop()
        pacs.stop()
        server.stop()
