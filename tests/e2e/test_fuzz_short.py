"""A short run of bench/fuzz in CI: mutated association and C-STORE streams against a running gateway
process. The full run is `bash bench/fuzz --seconds 600` (README, Benchmarks)."""

from __future__ import annotations

from bench.fuzz import run


def test_a_short_mutation_fuzz_run_finds_no_crash_hang_traceback_or_wrong_store() -> None:
    result = run(seconds=15, clients=4, seed=7)
    assert result["cases"] > 50 and result["outcomes"].get("hang", 0) == 0
    assert result["alive"] and result["tracebacks"] == 0 and result["stored_not_as_sent"] == 0
    assert result["rss_end_mb"] - result["rss_start_mb"] < 50 and result["storescu_after"], result
