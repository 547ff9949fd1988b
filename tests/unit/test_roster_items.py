"""The ejabberd roster-items export (``peers export ejabberd-roster``): what it prints reads back to the same pairs,
merges like the group exports, and hostile lines are refused with their place."""

from __future__ import annotations

import pytest

from gateway.roster import ejabberd_items_text, merge, pair_groups, parse_ejabberd

A, B, C = (f"radiology.hospital-{x}@helsenett.test" for x in "abc")


def test_items_read_back_and_merge_to_the_same_pairs() -> None:
    a_text = ejabberd_items_text(pair_groups("DICOM gateways", A, {B: "Radiology B", C: "Radiology C"}))
    b_text = ejabberd_items_text(pair_groups("DICOM gateways", B, {A: "Radiology A"}))
    assert a_text.count("\n") == 4 and "ejabberdctl add_rosteritem radiology.hospital-a helsenett.test radiology.hospital-b" in a_text
    merged = merge([("a", parse_ejabberd(a_text, "a")), ("b", parse_ejabberd(b_text, "b"))])
    assert [sorted(g.members) for g in merged.groups] == [[A, B]]
    assert merged.groups[0].members == {A: "Radiology A", B: "Radiology B"}  # the names the admins gave
    assert len(merged.one_sided) == 1 and C in merged.one_sided[0]
    assert parse_ejabberd(ejabberd_items_text(merged.groups), "again")[0].members == merged.groups[0].members


@pytest.mark.parametrize("line", [
    "ejabberdctl add_rosteritem radiology.hospital-a helsenett.test radiology.hospital-b helsenett.test 'B' 'G' to",
    "ejabberdctl add_rosteritem radiology.hospital-a helsenett.test radiology.hospital-b helsenett.test 'B\x1b[2J' 'G' both",
    "ejabberdctl add_rosteritem radiology.hospital-a helsenett.test radiology.hospital-b helsenett.test 'B' 'G\nX' both",
    "ejabberdctl add_rosteritem radiology.hospital-a helsenett.test radiology.hospital-b 'B' 'G' both",
    "ejabberdctl add_rosteritem 'radiology hospital' helsenett.test radiology.hospital-b helsenett.test 'B' 'G' both",
    "ejabberdctl add_rosteritem radiology.hospital-a helsenett.test radiology.hospital-b helsenett.test 'B 'G' both",
    "ejabberdctl add_rosteritem " + "x" * 5000,
])
def test_hostile_item_lines_are_refused_with_their_place(line: str) -> None:
    with pytest.raises(ValueError, match=r"^f:1"):  # RosterFileError, or a bad name (ValueError): both name the line
        parse_ejabberd(line + "\n", "f")
