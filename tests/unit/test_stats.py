"""The study's metrics (Table 20): T as the union of active intervals, N, S, F, success rate, MTBF, MB/s."""

from __future__ import annotations

from datetime import datetime, timedelta

from gateway.stats import Attempt, active_seconds, size_class, summary

T0 = datetime(2026, 11, 25, 8, 0, 0)


def attempt(start_s: float, end_s: float, outcome: str, method: str = "s5b", moved: int = 10_000_000,
            stream_s: float | None = 1.0, bundle: int = 10_000_000) -> Attempt:
    return Attempt("b@x/gw1", "out", method, T0 + timedelta(seconds=start_s), T0 + timedelta(seconds=end_s), outcome,
                   moved, stream_s, bundle)


def test_parallel_transfers_count_once_in_t() -> None:
    items = [attempt(0, 10, "received"), attempt(5, 15, "received"), attempt(100, 110, "cut")]
    assert active_seconds(items) == 25.0


def test_the_table_of_the_study() -> None:
    items = [attempt(0, 100, "received", moved=200_000_000, stream_s=2.0, bundle=200_000_000),
             attempt(200, 300, "cut", moved=150_000_000, stream_s=None),
             attempt(300, 310, "received", method="ibb", moved=50_000_000, stream_s=5.0, bundle=200_000_000),
             attempt(400, 401, "held", moved=0, stream_s=None, bundle=500_000),
             attempt(500, 600, "interrupted", stream_s=None),
             attempt(700, 700, "running", stream_s=None)]
    figures = summary(items, now=T0 + timedelta(seconds=700))
    assert (figures["N"], figures["S"], figures["F"], figures["running"]) == (5, 3, 2, 1)
    assert figures["T_s"] == 311.0 and figures["mtbf_s"] == 155.5 and figures["success_rate"] == 0.6
    assert figures["failures"] == {"cut": 1, "interrupted": 1}
    assert figures["by_method"]["s5b"]["mb_s"] == 100.0 and figures["by_method"]["ibb"]["mb_s"] == 10.0
    assert set(figures["by_size"]) == {"100 MB - 1 GB", "< 1 MB"}


def test_no_failure_no_mtbf_and_size_classes() -> None:
    assert summary([attempt(0, 1, "received")])["mtbf_s"] is None
    assert summary([])["success_rate"] is None
    assert [size_class(s) for s in (5, 1_000_000, 50_000_000, 999_999_999, 10**9)] == [
        "< 1 MB", "1-10 MB", "10-100 MB", "100 MB - 1 GB", ">= 1 GB"]


def test_since_takes_an_age_or_an_iso_time_and_refuses_anything_else() -> None:
    import pytest

    from gateway.cli import _since
    from gateway.store import utcnow

    assert abs((utcnow() - _since("24h")).total_seconds() - 86400) < 5
    assert _since("2026-11-25T08:00:00") == T0 and _since(None) is None
    with pytest.raises(ValueError, match="an age like 24h"):
        _since("yesterday")
