"""Routing rules: first match wins, each condition explained, parsing refuses what it cannot use."""

from __future__ import annotations

import re

import pytest

from gateway.addressing import destination_jid
from gateway.routing import RuleError, Rules, StudyFacts, parse_rules, scp_source

RAW = [
    {"name": "trauma", "destinations": ["radiology.hospital-b", "archive.hospital-c"], "priority": "stat",
     "tags": {"StudyDescription": "re:(?i)trauma"}},
    {"name": "stat request", "destinations": "radiology.hospital-b", "priority": "stat", "tags": {"0040,1003": ["STAT", "HIGH"]}},
    {"name": "ct from CT01", "destinations": ["radiology.hospital-b"], "calling_ae": "CT01", "modality": ["CT", "PT"]},
    {"name": "emergency folder", "destinations": ["er.hospital-b"], "folder": "emergency"},
    {"name": "to archive AE", "destinations": ["archive.hospital-c"], "called_ae": "ARCHIVE"},
]


def rules(default: str = "") -> Rules:
    return Rules(parse_rules(RAW, lambda d: destination_jid(d, "example.org")), default)


def test_first_matching_rule_decides_and_says_why_the_others_did_not() -> None:
    facts = StudyFacts(scp_source("CT01", "DICOMGW", "10.0.0.5"), ("CT",),
                       {"StudyDescription": "Head routine", "0040,1003": "ROUTINE"})
    verdict = rules().decide(facts)
    assert verdict.rule == "ct from CT01"
    assert verdict.destinations == ("radiology.hospital-b",)
    assert verdict.priority == "routine"
    assert verdict.explanation == (
        "rule 'trauma' does not match: StudyDescription 'Head routine' is not /(?i)trauma/",
        "rule 'stat request' does not match: 0040,1003 'ROUTINE' is not any of 'STAT', 'HIGH'",
        "rule 'ct from CT01' matches: calling_ae 'CT01' is 'CT01'; modality 'CT' is 'CT' -> radiology.hospital-b (routine)",
    )


def test_regex_on_a_tag_routes_to_two_destinations_as_stat() -> None:
    verdict = rules().decide(StudyFacts("folder:x.dcm", ("MR",), {"StudyDescription": "MR TRAUMA spine"}))
    assert (verdict.rule, verdict.destinations, verdict.priority) == (
        "trauma", ("radiology.hospital-b", "archive.hospital-c"), "stat")


def test_requested_procedure_priority_by_tag_number() -> None:
    verdict = rules().decide(StudyFacts("", ("US",), {"0040,1003": "HIGH "}))
    assert (verdict.rule, verdict.priority) == ("stat request", "stat")


def test_folder_and_called_ae_conditions() -> None:
    assert rules().decide(StudyFacts("folder:emergency/ct/1.dcm", ("CR",), {})).rule == "emergency folder"
    assert rules().decide(StudyFacts("folder:emergencyx/1.dcm", ("CR",), {})).rule == ""  # not a subfolder of it
    assert rules().decide(StudyFacts(scp_source("MR01", "ARCHIVE", "h"), ("MR",), {})).rule == "to archive AE"


def test_no_match_falls_to_the_default_destination_or_stays() -> None:
    facts = StudyFacts(scp_source("MR01", "DICOMGW", "h"), ("MR",), {})
    assert rules("radiology.hospital-b").decide(facts).rule == "default_destination"
    verdict = rules().decide(facts)
    assert verdict.destinations == () and verdict.explanation[-1].startswith("no rule matched and no default")


def test_source_titles_parse_even_with_odd_characters() -> None:
    facts = StudyFacts(scp_source("A@B>C", "X Y", "10.1.1.1"))
    assert (facts.calling_ae, facts.called_ae) == ("A@B>C", "X Y")
    assert StudyFacts("scp:OLD@10.0.0.1").calling_ae == "OLD"  # instances recorded before the called AE was kept


@pytest.mark.parametrize("raw, message", [
    ([{"name": "x"}], "needs destinations"),
    ([{"name": "x", "destinations": ["a.b"], "priority": "urgent"}], "priority 'urgent'"),
    ([{"name": "x", "destinations": ["a.b"], "modalty": "CT"}], "unknown key(s) modalty"),
    ([{"name": "x", "destinations": ["a.b"], "tags": {"StudyDescription": "re:(unclosed"}}], "not a regular expression"),
    ([{"name": "x", "destinations": ["a.b"], "tags": {"Study Description": "x"}}], "a DICOM keyword"),
    ([{"name": "x", "destinations": ["nodot"]}], "destination 'nodot'"),
    ([{"name": "x", "destinations": ["a.b"]}, {"name": "x", "destinations": ["a.b"]}], "a second rule"),
])
def test_bad_rules_are_refused_with_the_rule_named(raw: list, message: str) -> None:
    with pytest.raises(RuleError, match="rule"):
        parse_rules(raw, lambda d: destination_jid(d, "example.org"))
    with pytest.raises(RuleError) as info:
        parse_rules(raw, lambda d: destination_jid(d, "example.org"))
    assert message in str(info.value)


def test_tag_keys_are_what_the_rules_name() -> None:
    assert rules().tag_keys() == ("StudyDescription", "0040,1003")


def test_a_backtracking_pattern_cannot_run_away_and_unsupported_ones_are_named() -> None:
    """``^(a+)+$`` against 35 characters froze the gateway with Python's re (exponential); with RE2 it is linear."""
    import time

    runaway = Rules(parse_rules([{"name": "evil", "destinations": "radiology.hospital-b",
                                  "tags": {"StudyDescription": "re:^(a+)+$"}}], lambda d: destination_jid(d, "example.org")), "")
    started = time.perf_counter()
    for length in (35, 1000, 100_000):
        verdict = runaway.decide(StudyFacts("folder:x.dcm", ("CT",), {"StudyDescription": "a" * length + "b"}))
        assert verdict.rule == ""
    assert time.perf_counter() - started < 5  # was: not done in minutes at 35 characters (a bound, not a timing claim)
    assert runaway.decide(StudyFacts("folder:x.dcm", ("CT",), {"StudyDescription": "a" * 35})).rule == "evil"
    for pattern, why in (("re:(a)\\1", "invalid escape sequence"), ("re:(?<=a)b", "invalid perl operator")):
        with pytest.raises(RuleError, match=f"is not a regular expression RE2 accepts: {re.escape(why)}"):
            parse_rules([{"name": "x", "destinations": "b", "tags": {"StudyDescription": pattern}}], lambda d: d)


@pytest.mark.parametrize("written", ["stat", "Stat", "HIGH", "high "])
def test_priority_values_match_ignoring_case(written: str) -> None:
    """A scanner writing `stat` or `High` in (0040,1003) is a STAT request (it went routine silently)."""
    verdict = rules().decide(StudyFacts("", ("US",), {"0040,1003": written}))
    assert (verdict.rule, verdict.priority) == ("stat request", "stat")
    keyword = Rules(parse_rules([{"name": "k", "destinations": "radiology.hospital-b", "priority": "stat",
                                  "tags": {"RequestedProcedurePriority": "STAT"}}]))
    assert keyword.decide(StudyFacts("", (), {"RequestedProcedurePriority": "stat"})).rule == "k" or written[0] in "hH"
    other = Rules(parse_rules([{"name": "desc", "destinations": "radiology.hospital-b", "tags": {"StudyDescription": "CT"}}]))
    assert other.decide(StudyFacts("", (), {"StudyDescription": "ct"})).rule == ""  # other attributes: exact


def test_a_priority_value_the_standard_does_not_define_is_warned_about() -> None:
    found = Rules(parse_rules([{"name": "urgent", "destinations": "radiology.hospital-b", "priority": "stat",
                                "tags": {"0040,1003": ["URGENT", "high"]}}])).warnings()
    assert found == ["rule 'urgent': tags.0040,1003 'URGENT' can never match: 0040,1003 is one of "
                     "STAT, HIGH, ROUTINE, MEDIUM, LOW (compared ignoring case)"]
    assert rules().warnings() == []
