"""The JID naming standard: build, parse, validate, map destinations."""

from __future__ import annotations

import pytest

from gateway.addressing import AddressError, build, destination_jid, parse


def test_build_and_parse_round_trip() -> None:
    address = build("radiology", "hospital-b", "helsenett.test", "gw1")
    assert address.full == "radiology.hospital-b@helsenett.test/gw1"
    assert address.bare == "radiology.hospital-b@helsenett.test"
    assert address.destination == "radiology.hospital-b"
    assert parse(address.full) == address
    assert parse("nuclear-med.ous@nhn.no").node == ""


@pytest.mark.parametrize(
    ("jid", "message"),
    [
        ("Radiology.hospital-b@helsenett.test", "department 'Radiology' must be lower case"),
        ("radiology@helsenett.test", "must be <department>.<institution>"),
        ("radiology.hospital b@helsenett.test", "institution 'hospital b' must be 1-63 characters"),
        ("radiology.-b@helsenett.test", "institution '-b'"),
        ("radiology.hospital-b", "has no '@domain' part"),
        ("radiology.hospital-b@Helsenett..test", "domain 'Helsenett..test' is not a valid"),
        ("radiology.hospital-b@helsenett.test/gw 1", "gateway node 'gw 1'"),
    ],
)
def test_bad_names_say_what_is_wrong(jid: str, message: str) -> None:
    with pytest.raises(AddressError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse(jid)


def test_destination_mapping() -> None:
    assert destination_jid("radiology.hospital-b", "helsenett.test") == "radiology.hospital-b@helsenett.test"
    assert destination_jid("radiology.hospital-b@other.test/gw2", "helsenett.test") == "radiology.hospital-b@other.test"
    with pytest.raises(AddressError):
        destination_jid("radiology", "helsenett.test")


def test_an_address_of_hundreds_of_characters_is_named_cut_with_its_length() -> None:
    """A JID or destination from a config, the CLI or a peer's stanza repeats in the refusal: cut, its length said."""
    for refuse, value, length in ((lambda v: destination_jid(v, "helsenett.test"), "x" * 300, 300), (parse, "y" * 300, 300),
                                  (parse, "radiology@" + "Z" * 200, 210),
                                  (parse, "r" * 200 + ".hospital-b@helsenett.test", 200)):  # the department alone
        with pytest.raises(AddressError) as refused:
            refuse(value)
        said = str(refused.value)
        assert f"... ({length} characters)" in said and len(said) < 220, said
