"""Signed verdicts and receipts (adapters.xmpp.attest) and refusals counted in memory (gateway.refusals)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from adapters.xmpp import attest
from adapters.xmpp.e2e import ensure_identity
from adapters.xmpp.stanzas import (
    Signature,
    build_receipt,
    build_result,
    parse_receipt,
    parse_result,
    receipt_signature,
    statement_text,
)
from gateway.refusals import RefusalLog
from gateway.transfer import Receipt

B, A = "radiology.hospital-b@net.test", "radiology.hospital-a@net.test"


def test_a_signed_receipt_verifies_only_with_its_pin_its_jids_and_its_fields(tmp_path: Path) -> None:
    b, _ = ensure_identity(tmp_path / "b.key", tmp_path / "b.crt", "b")
    other, _ = ensure_identity(tmp_path / "o.key", tmp_path / "o.crt", "o")
    detail = statement_text("3 instance(s)\r\nstored\x00 in the PACS ")
    data = attest.canonical("receipt", B, A, "ab" * 32, "3", "delivered", detail)
    cert, sig = attest.sign(b, data)
    el = ET.fromstring(ET.tostring(build_receipt(Receipt("", "ab" * 32, 3, True, "3 instance(s)\r\nstored\x00 in the PACS "),
                                                 Signature(cert, sig))))
    got, signature = parse_receipt(el), receipt_signature(el)
    assert got.detail == detail  # what was signed is what arrives
    attest.verify(b.fingerprint, signature.cert_b64, signature.sig_b64,
                  attest.canonical("receipt", B, A, got.bundle_sha256, str(got.instances), "delivered", got.detail), B)
    with pytest.raises(attest.Unattested, match="not the one pinned"):
        attest.verify(other.fingerprint, cert, sig, data, B)
    with pytest.raises(attest.Unattested, match="does not verify"):  # another addressee: not replayable to C
        attest.verify(b.fingerprint, cert, sig, attest.canonical("receipt", B, "c@net.test", "ab" * 32, "3", "delivered", detail), B)
    with pytest.raises(attest.Unattested, match="does not verify"):  # another outcome
        attest.verify(b.fingerprint, cert, sig, attest.canonical("receipt", B, A, "ab" * 32, "3", "failed", detail), B)
    with pytest.raises(attest.Unattested, match="not signed"):
        attest.verify(b.fingerprint, "", "", data, B)
    with pytest.raises(attest.Unattested, match="base64"):
        attest.verify(b.fingerprint, "!!", sig, data, B)


def test_verdict_outcomes_come_from_a_closed_set() -> None:
    for outcome in ("received", "rejected", "incomplete", "refused"):
        assert parse_result(ET.fromstring(ET.tostring(build_result("s1", outcome, "x")))).outcome == outcome
    for outcome in ("", "delivered", "x" * 40, "received "):
        with pytest.raises(ValueError, match="outcome must be one of"):
            parse_result(build_result("s1", outcome))


def test_refusals_are_counted_in_memory_with_bounded_keys() -> None:
    log = RefusalLog(max_keys=3)
    for n in range(1000):
        log.note("offer_refused", f"x{n % 10}@net.test", f"offer from x{n % 10}")
    tallies = {t.key: t.count for t in log.drain()}
    assert sum(tallies.values()) == 1000 and len(tallies) == 4 and tallies["(others)"] == 700
    assert log.drain() == [] and log.total == 1000


def test_refusals_whose_write_failed_are_written_next_time_and_counted_once() -> None:
    log = RefusalLog()
    for _ in range(5):
        log.note("offer_refused", "x@net.test", "offer from x")
    tallies = log.drain()
    log.note("offer_refused", "x@net.test", "offer from x")
    log.restore(tallies)
    (tally,) = log.drain()
    assert tally.count == 6 and log.total == 6


def test_prepare_loads_our_keys_before_the_first_statement_and_tolerates_a_missing_one(tmp_path: Path) -> None:
    """At session start the identities' keys are loaded and used once, so the first verdict is not the one
    that pays for it; a key file gone (rotated meanwhile) is left for the statement that needs it to report."""
    from dataclasses import replace

    b, _ = ensure_identity(tmp_path / "b.key", tmp_path / "b.crt", "b")
    gone = replace(b, key_path=tmp_path / "gone.key")
    attest._private_key.cache_clear()
    attest.prepare([gone, b])
    assert attest._private_key.cache_info().currsize == 1  # ours, loaded; the missing one not
    with pytest.raises(OSError):
        attest.sign(gone, b"a statement")  # still said where it is used
