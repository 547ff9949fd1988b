"""The retry policy: one table of transient and permanent errors, backoff with jitter and a cap, `dead`."""

from __future__ import annotations

import random

import pytest

from gateway.importing import Verdict, classify_store_status
from gateway.retry import ERROR_TABLE, ErrorKind, RetryPolicy, classify


@pytest.mark.parametrize(
    ("detail", "kind"),
    [
        ("peer refused the offer: forbidden (x is not an allowed peer of this gateway)", ErrorKind.PERMANENT),
        ("peer refused the offer: not-authorized (certificate SHA-256 ab does not match the pin cd)", ErrorKind.PERMANENT),
        ("peer refused the offer: not-acceptable (study of 5 bytes exceeds this gateway's limit of 4)", ErrorKind.PERMANENT),
        ("end-to-end channel refused: b's certificate SHA-256 ab does not match the pin cd", ErrorKind.PERMANENT),
        ("no pinned certificate for b@x: nothing is sent unencrypted", ErrorKind.PERMANENT),
        ("spool file of instance 1.2.3 changed since ingest", ErrorKind.PERMANENT),
        ("peer refused the offer: resource-constraint (busy: 2 inbound transfer(s) running)", ErrorKind.TRANSIENT),
        ("offer not answered: XMPP connection lost", ErrorKind.TRANSIENT),
        ("S5B failed: SOCKS5 stream cut: EOF", ErrorKind.TRANSIENT),
        ("IBB failed: timed out", ErrorKind.TRANSIENT),
        ("SHA-256 mismatch for instance <instance 3>", ErrorKind.TRANSIENT),
        ("something nobody foresaw", ErrorKind.TRANSIENT),
    ],
)
def test_each_failure_is_transient_or_permanent_by_the_one_table(detail: str, kind: ErrorKind) -> None:
    assert classify(detail) is kind


def test_no_row_of_the_table_is_shadowed_by_an_earlier_row_of_the_other_kind() -> None:
    for needle, kind, _meaning in ERROR_TABLE:
        assert classify(f"x {needle} y") is kind, needle


@pytest.mark.parametrize(
    ("status", "verdict"),
    [(0x0000, Verdict.STORED), (0xB000, Verdict.WARNING), (0xA700, Verdict.TRANSIENT), (0x0110, Verdict.TRANSIENT),
     (0xA900, Verdict.PERMANENT), (0xC000, Verdict.PERMANENT), (0x0122, Verdict.PERMANENT)],
)
def test_pacs_statuses_share_the_table(status: int, verdict: Verdict) -> None:
    assert classify_store_status(status) is verdict


def test_backoff_grows_with_jitter_and_stays_under_the_cap() -> None:
    policy = RetryPolicy(base_s=2.0, cap_s=60.0, rng=random.Random(7))
    for failures in range(1, 12):
        ceiling = min(60.0, 2.0 * 2 ** (failures - 1))
        delays = [policy.delay_s(failures) for _ in range(200)]
        assert all(min(1.0, ceiling) <= d <= ceiling for d in delays)
        assert len({round(d, 6) for d in delays}) > 150  # jittered: studies of one peer do not retry in step
    assert max(policy.delay_s(30) for _ in range(100)) <= 60.0


def test_backoff_is_per_peer_and_resets_on_success() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=1000.0, rng=random.Random(1))
    for _ in range(5):
        policy.peer_failed("b@x")
    assert policy.peer_failures("b@x") == 5 and policy.peer_failures("c@x") == 0
    assert policy.peer_failed("c@x") <= 1.0  # another peer starts at the base
    delay = policy.peer_failed("b@x", now_s=100.0)
    assert abs(policy.peer_wait_s("b@x", now_s=100.0) - delay) < 1e-9 and policy.peer_wait_s("b@x", now_s=101.0 + delay) == 0.0
    policy.peer_ok("b@x")
    assert policy.peer_failures("b@x") == 0 and policy.peer_wait_s("b@x") == 0.0


def test_a_study_dies_after_the_attempts_or_the_age() -> None:
    policy = RetryPolicy(max_attempts=5, max_age_s=3600.0)
    assert not policy.gives_up(4, 3599.0)
    assert policy.gives_up(5, 0.0)
    assert policy.gives_up(0, 3600.0)
