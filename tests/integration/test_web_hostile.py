"""The admin web page against hostile requests (issue 16 §2): bad query values are 400, any bytes in the basic
auth header are 401 (never 500), a wrong user costs the same password check as a wrong password, and failed
logins per address are limited. Starlette's test client against the real app on a real SQLite queue."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from adapters import web
from adapters.web import WebAccess, make_app
from gateway.passwords import hash_password
from gateway.store import QueueStore, make_engine, upgrade_schema

PASSWORD = "correct horse battery"


def basic(user: bytes, password: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user + b":" + password).decode()}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    engine = make_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    upgrade_schema(engine)
    access = WebAccess(auth_user="admin", auth_password_hash=hash_password(PASSWORD, iterations=1000))
    app = make_app(QueueStore(engine), lambda _jid: "available", (), lambda: True, access)
    with TestClient(app) as test_client:
        yield test_client
    engine.dispose()


def test_bad_hours_are_400_not_500(client: TestClient) -> None:
    auth = basic(b"admin", PASSWORD.encode())
    for value in ("abc", "nan", "inf", "1e999x"):
        answer = client.get(f"/stats?hours={value}", headers=auth)
        assert answer.status_code == 400 and "hours must be a number" in answer.text, value
    assert client.get("/stats?hours=2", headers=auth).status_code == 200


def test_any_bytes_in_basic_auth_are_401_and_a_wrong_user_costs_a_password_check(client: TestClient,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[str] = []
    real = web.check_password
    monkeypatch.setattr(web, "check_password", lambda password, stored: checked.append(password) or real(password, stored))
    for headers in (basic("ädmin".encode(), b"x"), basic(b"\xff\xfe", b"\x00"), {"Authorization": "Basic !!!"},
                    {"Authorization": "Bearer x"}, basic(b"nobody", PASSWORD.encode())):
        assert client.get("/", headers=headers).status_code == 401, headers
    assert len(checked) == 5  # the password hash was checked for every attempt, the wrong user's too
    assert client.get("/", headers=basic(b"admin", PASSWORD.encode())).status_code == 200


def test_failed_logins_from_one_address_are_limited(client: TestClient) -> None:
    for _ in range(web._BasicAuth.MAX_FAILURES):
        assert client.get("/", headers=basic(b"admin", b"guess")).status_code == 401
    limited = client.get("/", headers=basic(b"admin", PASSWORD.encode()))
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert "too many failed logins" in limited.text


def test_metrics_have_one_sample_per_label_set_and_closed_label_values(tmp_path: Path) -> None:
    """Refusals recorded with two methods, and an outcome from outside the set: each series once in the scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.rows import utcnow

    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    upgrade_schema(engine)
    store = QueueStore(engine)
    for n, (method, outcome) in enumerate((("s5b", "refused"), ("", "refused"), ("ibb", "refused"), ("s5b", "weird<\\n>"))):
        store.record_transfer(None, f"sid{n}", "b@net.test/gw1", "out", method, 0, 0, utcnow(), outcome, "x")
    app = make_app(store, lambda _jid: "available", (), lambda: True, WebAccess())
    with TestClient(app) as test_client:
        text = test_client.get("/metrics").text
    engine.dispose()
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in seen, f"duplicate sample {key}"
            seen.add(key)
    failures = {dict(labels)["kind"]: None for name, labels in seen if name == "dicomgw_transfer_failures_total"}
    assert set(failures) == {"refused", "other"}
    outcomes = {dict(labels)["outcome"] for name, labels in seen if name == "dicomgw_transfers_total"}
    assert outcomes <= {"refused", "other"}


def test_the_page_says_when_the_spool_is_below_its_reserve_and_when_it_cannot_be_read(tmp_path: Path) -> None:
    """The overview's spool line: free space against the reserve, red with why below it (peers' studies are
    refused), and a file system error said instead of a 500; /metrics then has no spool sample rather than a
    wrong one."""
    engine = make_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    upgrade_schema(engine)
    room = [(500_000_000, 1_024_000_000)]

    def spool_space() -> tuple[int, int]:
        if not room:
            raise OSError(5, "Input/output error")
        return room[0]

    app = make_app(QueueStore(engine), lambda _jid: "available", (), lambda: True, spool_space=spool_space)
    with TestClient(app) as client:
        page = client.get("/").text
        assert '<span class="bad">500 MB free</span>, 1,024 MB kept for' in page
        assert "peers' studies are refused until there is room" in page
        assert "dicomgw_spool_free_bytes 5e+08" in client.get("/metrics").text
        room.clear()
        answer = client.get("/")
        assert answer.status_code == 200 and "free space cannot be read (Input/output error)" in answer.text
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and "dicomgw_spool_free_bytes" not in metrics.text
    engine.dispose()


def test_every_page_says_503_and_why_while_the_queue_database_cannot_be_reached(tmp_path: Path) -> None:
    """A PostgreSQL that does not answer: every page, /metrics too (a failed scrape), answers 503 naming the
    reason and what the gateway does meanwhile (was a bare 500 Internal Server Error)."""
    from adapters.lab.localpeers import free_port

    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/queue")
    app = make_app(QueueStore(engine), lambda _jid: "available", (), lambda: True, None)
    with TestClient(app, raise_server_exceptions=False) as client:
        for path in ("/", "/peers", "/stats", "/study/1.2.3", "/metrics"):
            answer = client.get(path)
            assert answer.status_code == 503 and answer.headers["retry-after"] == "5", (path, answer.status_code)
            assert answer.headers["refresh"] == "5"  # a browser left on it shows the queue once the database is back
            assert answer.text.startswith("The queue database cannot be reached (") and "Connection refused" in answer.text
            assert "Out of Resources, A700" in answer.text, (path, answer.text)
    engine.dispose()


def test_every_page_says_when_the_queue_database_takes_no_writes_while_it_answers_reads(tmp_path: Path) -> None:
    """A disk full under the queue database (or a read-only standby) leaves its reads working: the pages showed
    the queue as usual while every instance was refused. Every page now carries the outage (what, since when, the
    driver's words, escaped) and /metrics says the database is not writable and for how long; without an outage
    there is no banner and writable is 1."""
    engine = make_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    upgrade_schema(engine)
    since = time.time() - 90
    state: list[dict[str, object]] = []
    app = make_app(QueueStore(engine), lambda _jid: "available", (), lambda: True, None,
                   outage=lambda: state[0] if state else None)
    with TestClient(app) as client:
        assert 'id="outage"' not in client.get("/").text
        assert "dicomgw_queue_database_writable 1.0" in client.get("/metrics").text
        state.append({"kind": "full", "said": "the queue database cannot be written: its disk is full",
                      "reason": "database or disk is full <script>x</script>", "since": since})
        for path in ("/", "/peers", "/stats"):
            answer = client.get(path)
            assert answer.status_code == 200, (path, answer.status_code)
            assert ('<div class="banner bad" id="outage">The queue database cannot be written: its disk is full (since '
                    + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))) in answer.text, (path, answer.text)
            assert ("database or disk is full &lt;script&gt;x&lt;/script&gt;). Every instance is refused (Out of "
                    "Resources, A700) and nothing is sent or imported until it takes writes again.") in answer.text
            assert "<script>x" not in answer.text
        metrics = client.get("/metrics").text
        assert "dicomgw_queue_database_writable 0.0" in metrics
        lasting = next(line for line in metrics.splitlines() if line.startswith("dicomgw_queue_database_outage_seconds "))
        assert 89 <= float(lasting.split()[1]) < 3600, lasting
    engine.dispose()
