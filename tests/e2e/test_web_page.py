"""The admin web page as an admin reads it, in Debian's headless Chromium driven by Playwright (system
browser, no download), while a study moves from A to B over Prosody through a slow link; and /metrics as
Prometheus reads it. A screenshot of the queue page is kept at artifacts/web-queue.png."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.lab.localpeers import Prosody, free_port
from adapters.lab.netem import FaultRelay
from adapters.lab.synthetic import generate_ct_study
from gateway.dashboard import AWAITING_VERDICT
from gateway.passwords import hash_password
from gateway.routing import parse_rules
from gateway.settings import RoutingSettings, WebSettings
from tests.helpers import REPO, storescu, wait_for
from tests.integration.test_xmpp_transfer import (
    A_JID,
    B_JID,
    running_prosody,
    start_site,
    unit_states,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("DICOMGW_ARTIFACTS", REPO / "artifacts"))
PASSWORD = "web-admin-password-1"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture
def prosody(tmp_path: Path) -> Any:
    with running_prosody(tmp_path / "prosody") as server:
        yield server


def fresh(page: Any, url: str, selector: str) -> str:
    """The text of ``selector`` on a fresh load of ``url``. The page's own refresh (every 2 s here) may navigate
    at the same moment ("Not attached to an active page"): such a load is tried again, a bounded number of times."""
    from playwright.sync_api import Error as PlaywrightError

    for _attempt in range(20):
        try:
            page.goto(url)
            return str(page.locator(selector).inner_text())
        except PlaywrightError:
            time.sleep(0.25)
    raise AssertionError(f"{url} could not be loaded")


def test_the_admin_reads_a_moving_study_peers_stats_and_metrics(tmp_path: Path, prosody: Prosody) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is a test dependency (.ci/setup --with-test installs it)"
    # A's proxy link: the study (5.3 MB) takes ~18 s at first, so that the test's own thread, slowed on a busy
    # machine (it shares the GIL with both gateways), finds it moving; at 1.5 MB/s it once found it all sent.
    relay = FaultRelay(prosody.proxy_port, rate_bytes_s=300_000)
    port = free_port()
    web = WebSettings(port=port, refresh_s=2, auth_user="admin", auth_password_hash=hash_password(PASSWORD))
    rules = parse_rules([{"name": "trauma", "destinations": ["radiology.hospital-b"], "priority": "stat",
                          "tags": {"StudyDescription": "re:(?i)trauma"}}])
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), s5b_proxy=f"127.0.0.1:{relay.port}", web=web,
                   routing=RoutingSettings(default_destination="radiology.hospital-b", rules=rules))
    base = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(base + "/", timeout=10).status_code == 401  # nothing without the password
        assert httpx.get(base + "/", auth=("admin", "wrong password!"), timeout=10).status_code == 401
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=40, rows=256, columns=256,
                                  study_description="CT TRAUMA HEAD")
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        def streaming() -> bool:
            unit = a.gateway.store.studies()[0]
            return unit.state == "sending" and unit.progress_bytes > unit.bundle_bytes / 10

        wait_for(streaming, 60, 0.05, what=lambda: f"A to stream a tenth of the study: A {a.gateway.store.studies()}, "
                 f"attempts {a.gateway.store.transfers()}, B {b.gateway.store.studies()}")
        # Held nearly still while the browser starts and reads the page (64 KiB/s: the rest would take over a
        # minute), so that a busy machine's slow browser start cannot outrun the study; full rate again after.
        relay.configure(rate_bytes_s=65_536)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(http_credentials={"username": "admin", "password": PASSWORD},
                                          viewport={"width": 1400, "height": 900})
            page = context.new_page()
            page.goto(base + "/")
            flight = page.locator("#in-flight").inner_text()
            assert "CT TRAUMA HEAD" in flight and "STAT" in flight and "sending" in flight and B_JID in flight
            percent = float(re.search(r"([\d.]+) %", flight).group(1))  # type: ignore[union-attr]
            unit = a.gateway.store.studies()[0]
            # 100 % while `sending` is every byte handed to the network and B's verdict still to come (twice in a
            # fresh-clone CI run the browser read the page only then: its start can take seconds on a busy box);
            # the page says so.
            assert 0 < percent <= 100, (flight, unit.progress_bytes, unit.bundle_bytes, unit.size_bytes)
            assert AWAITING_VERDICT not in flight or percent == 100, flight
            assert page.locator("#xmpp").inner_text().startswith("XMPP: online")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web-queue.png"), full_page=True)
            relay.configure(rate_bytes_s=1_500_000)

            wait_for(lambda: unit_states(a.gateway) == ["sent"], 120, 0.1, what="the study to be sent")
            assert "nothing is moving" in fresh(page, base + "/", "#in-flight")  # what the auto-refresh shows a moment later
            recent = page.locator("#recent").inner_text()
            assert "sent" in recent and "CT TRAUMA HEAD" in recent

            page.click("text=CT TRAUMA HEAD")
            assert page.url.endswith(f"/study/{study.study_instance_uid}")
            body = page.locator("main").inner_text()
            assert "routed by trauma" in body
            assert "sending → sent" in body and "stable → queued" in body
            assert "received" in page.locator("table.transfers").inner_text()  # the attempt and its outcome

            page.goto(base + "/peers")
            peers = page.locator("#peers").inner_text()
            b_pin = a.gateway.pin_for(B_JID)
            assert B_JID in peers and "available" in peers and b_pin is not None and b_pin in peers

            page.goto(base + "/stats")
            cells = [page.locator(f"#summary tr:nth-child(2) td:nth-child({n})").inner_text() for n in (2, 3, 4)]
            assert cells == ["1", "1", "0"]  # N, S, F: one attempt, one success, no failure
            assert page.locator("svg.chart circle").count() == 1
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web-stats.png"), full_page=True)
            browser.close()

        metrics = httpx.get(base + "/metrics", auth=("admin", PASSWORD), timeout=10).text
        assert 'dicomgw_queue_units{direction="out",state="sent"} 1.0' in metrics
        assert re.search(r'dicomgw_transfers_total\{direction="out",method="s5b",outcome="received"\} 1\.0', metrics)
        assert re.search(r'dicomgw_transfer_bytes_total\{direction="out",method="s5b",outcome="received"\} [1-9]', metrics)
        assert "dicomgw_xmpp_connected 1.0" in metrics
        assert "dicomgw_import_latency_seconds_bucket" in metrics
    finally:
        a.stop()
        b.stop()
        relay.stop()
