"""[[import.coerce]] rules: first match per peer, templates, the CSV table, prefix or hold, refused rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.coercion import CoerceError, Coercer, Coercion, Hold, parse_rules

A = "radiology.hospital-a@helsenett.test"


def test_first_matching_rule_with_templates_table_and_prefix(tmp_path: Path) -> None:
    (tmp_path / "map.csv").write_text("# foreign,local\nP1,L1\n")
    coercer = Coercer(parse_rules([
        {"name": "c", "from": "*hospital-c@*", "set": {"InstitutionName": "C"}},
        {"name": "a", "from": ["*@helsenett.test"], "set": {"IssuerOfPatientID": "{peer_institution}",
                                                            "InstitutionName": "{peer_department} at {peer_institution}"},
         "patient_id_map": "map.csv", "on_unmapped": "prefix"},
    ], tmp_path))
    assert coercer.plan(A, "P1") == Coercion("a", {"IssuerOfPatientID": "hospital-a",
                                                   "InstitutionName": "radiology at hospital-a", "PatientID": "L1"})
    assert coercer.plan(A, "P2").set["PatientID"] == "hospital-a-P2"  # type: ignore[union-attr]
    assert coercer.plan("x@elsewhere.test", "P1") is None


def test_hold_when_unmapped_and_the_table_is_reread(tmp_path: Path) -> None:
    table = tmp_path / "map.csv"
    table.write_text("P1,L1\n")
    coercer = Coercer(parse_rules([{"patient_id_map": str(table), "on_unmapped": "hold"}], tmp_path))
    held = coercer.plan(A, "P9")
    assert isinstance(held, Hold) and "P9" in held.reason and "dicomgw queue release" in held.reason
    import os

    table.write_text("P1,L1\nP9,L9\n")
    os.utime(table, (1, 2_000_000_000))  # a new mtime, whatever the clock's resolution
    assert coercer.plan(A, "P9").set["PatientID"] == "L9"  # type: ignore[union-attr]


@pytest.mark.parametrize(("raw", "message"), [
    ([{"set": {"NotAKeyword": "x"}}], "'NotAKeyword' is not a DICOM keyword"),
    ([{"set": {"PixelData": "x"}}], "pixel data is never changed"),
    ([{"on_unmapped": "guess"}], "on_unmapped 'guess'"),
    ([{"colour": "red"}], "unknown key(s) colour"),
])
def test_bad_rules_are_refused(tmp_path: Path, raw: list, message: str) -> None:
    with pytest.raises(CoerceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_rules(raw, tmp_path)


def test_the_description_names_attributes_not_values() -> None:
    text = Coercion("r", {"PatientID": "SECRET-ID"}, ("OtherPatientIDs",)).describe()
    assert "SECRET-ID" not in text and "PatientID set" in text and "OtherPatientIDs removed" in text


def test_a_hostile_mapping_table_holds_the_study_with_the_reason(tmp_path: Path) -> None:
    table = tmp_path / "map.csv"
    coercer = Coercer(parse_rules([{"patient_id_map": str(table)}], tmp_path))
    table.write_bytes(b"P1,\xff\xfe\x00not utf-8\n")
    held = coercer.plan(A, "P1")
    assert isinstance(held, Hold) and "cannot be read as a CSV table in UTF-8" in held.reason
    table.write_text("".join(f"P{n},L{n}\x1b[2J{'9' * 200}\n" for n in range(1000)))
    import os

    os.utime(table, (1, 2_000_000_001))
    assert len(coercer.plan(A, "P7").set["PatientID"]) <= 64  # type: ignore[union-attr]
