"""Property-based tests (hypothesis) of every parser that reads bytes or XML from a peer: each either
returns what was built or raises its one documented error, never anything else."""

from __future__ import annotations

import string
import xml.etree.ElementTree as ET

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from adapters.dicom_assoc import check_associate_rq as _check_associate_rq
from adapters.dicom_ul import UI, US, Command, ProtocolError, encode_command, iter_pdvs
from adapters.xmpp.stanzas import (
    NS_IBB,
    NS_S5B,
    Offer,
    build_offer,
    build_receipt,
    parse_offer,
    parse_receipt,
)
from gateway.manifest import BundleError, BundleFile, Manifest
from gateway.transfer import Receipt
from tests import rawdicom as raw

uids = st.from_regex(r"\A[1-9][0-9]{0,5}(\.[1-9][0-9]{0,5}){1,8}\Z")
hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 255), st.integers(0, 3), st.binary(max_size=300)), min_size=1, max_size=5))
def test_pdvs_round_trip(pdvs: list[tuple[int, int, bytes]]) -> None:
    body = raw.pdata(*pdvs)[6:]
    assert [(c, f, bytes(d)) for c, f, d in iter_pdvs(body)] == pdvs


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_pdv_parser_raises_only_protocol_errors(body: bytes) -> None:
    try:
        for _context, _flags, fragment in iter_pdvs(body):
            assert len(fragment) <= len(body)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(uid=uids, message_id=st.integers(0, 65535), status=st.integers(0, 65535))
def test_command_round_trip(uid: str, message_id: int, status: int) -> None:
    command = Command.decode(encode_command([(0x00001000, UI, uid), (0x00000110, US, message_id), (0x00000900, US, status)]))
    assert (command.text(0x00001000), command.us(0x00000110), command.us(0x00000900)) == (uid, message_id, status)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_command_parser_raises_only_protocol_errors(data: bytes) -> None:
    try:
        Command.decode(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_association_request_checks_answer_or_abort(data: st.DataObject) -> None:
    body = bytearray(raw.associate_rq()[6:])
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    try:
        verdict = _check_associate_rq(bytes(body[:cut]))
    except ProtocolError:
        return
    assert verdict is None or (len(verdict) == 2 and verdict[0][0] in (1, 2))


files = st.builds(BundleFile, uids, uids, uids, st.integers(0, 10**9), hex64)


@settings(max_examples=100, deadline=None)
@given(study=uids, seq=st.integers(1, 99), chunk=st.integers(1, 1 << 20), entries=st.lists(files, max_size=5))
def test_manifest_round_trip(study: str, seq: int, chunk: int, entries: list[BundleFile]) -> None:
    manifest = Manifest(study, seq, chunk, tuple(entries))
    assert Manifest.decode(manifest.encode()) == manifest


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_manifest_parser_raises_only_bundle_errors(data: bytes) -> None:
    try:
        Manifest.decode(data)
    except BundleError:
        pass


methods = st.lists(st.sampled_from((NS_S5B, NS_IBB)), min_size=1, max_size=2, unique=True).map(tuple)


@settings(max_examples=150, deadline=None)
@given(sid=st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=64), size=st.integers(0, 2**62),
       sha=hex64, chosen=methods, cert=st.binary(max_size=2000))
def test_offer_round_trip(sid: str, size: int, sha: str, chosen: tuple[str, ...], cert: bytes) -> None:
    offer = Offer(sid, f"{sid}.dgwb", size, sha, chosen, cert)
    assert parse_offer(ET.fromstring(ET.tostring(build_offer(offer)))) == offer


@settings(max_examples=300, deadline=None)
@given(attrs=st.dictionaries(st.sampled_from(["id", "size", "profile", "algo"]), st.text(max_size=80)), body=st.text(max_size=80))
def test_offer_parser_raises_only_value_errors(attrs: dict[str, str], body: str) -> None:
    si = build_offer(Offer("s1", "s1.dgwb", 10, "ab" * 32, (NS_IBB,)))
    file_el = si[0]
    for key, value in attrs.items():
        (si if key in ("id", "profile") else file_el).set(key if key != "algo" else "size", value)
    file_el.find("{urn:xmpp:hashes:2}hash").text = body or None  # type: ignore[union-attr]
    try:
        parse_offer(si)
    except ValueError:
        pass


@settings(max_examples=150, deadline=None)
@given(bundle=hex64, instances=st.integers(0, 10**6), delivered=st.booleans(), detail=st.text(max_size=100))
def test_receipt_round_trip_names_no_study(bundle: str, instances: int, delivered: bool, detail: str) -> None:
    assume("1.2.3.4" not in detail)
    el = build_receipt(Receipt("1.2.3.4", bundle, instances, delivered, detail))
    assert "1.2.3.4" not in ET.tostring(el).decode()
    got = parse_receipt(ET.fromstring(ET.tostring(el)))
    assert (got.bundle_sha256, got.instances, got.delivered) == (bundle, instances, delivered)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["bundle", "instances", "outcome"]), st.text(max_size=70)))
def test_receipt_parser_raises_only_value_errors(attrs: dict[str, str]) -> None:
    el = ET.Element("{urn:dicomgw:transfer:1}receipt", attrs)
    try:
        parse_receipt(el)
    except ValueError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_bundle_header_parser_raises_only_bundle_errors(data: bytes) -> None:
    import io

    from gateway.manifest import MAGIC, read_manifest

    for candidate in (data, MAGIC + data):
        try:
            read_manifest(io.BytesIO(candidate))
        except BundleError:
            pass


def test_offer_expect_and_previous_identity_refuse_hostile_values() -> None:
    """<expect> and <identity previous='1'> (key rotation): anything but up to three SHA-256 hex digests, or valid
    base64 of at most 16 KiB, is a bad-request ValueError; 1000 of them change nothing."""
    import base64
    import xml.etree.ElementTree as ET

    import pytest

    from adapters.xmpp.stanzas import NS_E2E, NS_IBB, Offer, build_offer, parse_offer, q

    good = build_offer(Offer("sid1", "sid1.dgwb", 10, "ab" * 32, (NS_IBB,), b"cert", False, "routine", b"old", "cd" * 32))
    parsed = parse_offer(good)
    assert (parsed.previous_cert_der, parsed.expect) == (b"old", "cd" * 32)
    for expect in ["zz" * 32, "ab" * 32 + ",", ",".join(["ab" * 32] * 4), "ab" * 32 + "\x1b[2J", "\xff" * 64, "ab" * 10000]:
        si = build_offer(Offer("sid1", "sid1.dgwb", 10, "ab" * 32, (NS_IBB,), b"cert"))
        ET.SubElement(si, q(NS_E2E, "expect")).text = expect
        with pytest.raises(ValueError):
            parse_offer(si)
    for text in ["not base64!", base64.b64encode(b"x" * 20000).decode(), "\x00\x07"]:
        si = build_offer(Offer("sid1", "sid1.dgwb", 10, "ab" * 32, (NS_IBB,), b"cert"))
        ET.SubElement(si, q(NS_E2E, "identity"), {"previous": "1"}).text = text
        with pytest.raises(ValueError):
            parse_offer(si)
    si = build_offer(Offer("sid1", "sid1.dgwb", 10, "ab" * 32, (NS_IBB,), b"cert"))
    for _ in range(1000):
        ET.SubElement(si, q(NS_E2E, "identity"), {"previous": "1"}).text = "AAAA"
    assert parse_offer(si).cert_der == b"cert"  # only the first two identities are read


def test_offer_streamhost_hint_round_trips_and_refuses_hostile_values() -> None:
    """The proxy an S5B offer names (``Offer.streamhost``): read back as sent; a jid or host with spaces,
    control characters or beyond its length, a port outside 1-65535 (or not ASCII digits) is a bad-request
    ValueError; on an IBB-only offer the hint is not read at all."""
    import xml.etree.ElementTree as ET

    import pytest

    from adapters.xmpp.stanzas import (
        NS_IBB,
        NS_S5B,
        NS_WIRE,
        Offer,
        build_offer,
        parse_offer,
        q,
    )

    hint = ("proxy.helsenett.test", "10.0.0.5", 5000)
    assert parse_offer(build_offer(Offer("sid1", "sid1.dgwb", 10, "ab" * 32, (NS_S5B, NS_IBB), streamhost=hint))).streamhost == hint
    assert parse_offer(build_offer(Offer("sid1", "sid1.dgwb", 10, "ab" * 32, (NS_S5B,)))).streamhost is None
    for pipelined in (False, True):  # the proxy takes a pipelined SOCKS5 request: said only with a hint
        read = parse_offer(build_offer(Offer("sid1", "sid1.dgwb", 10, "ab" * 32, (NS_S5B,), streamhost=hint, pipelined=pipelined)))
        assert (read.streamhost, read.pipelined) == (hint, pipelined)
    assert not parse_offer(build_offer(Offer("sid1", "sid1.dgwb", 10, "ab" * 32, (NS_S5B,), pipelined=True))).pipelined
    hostile = [
        {"jid": "proxy", "host": "127.0.0.1", "port": "5000", "pipelined": "true"},  # only "1"
        {"jid": "proxy", "host": "127.0.0.1", "port": "5000", "pipelined": ""},
        {"jid": "proxy", "host": "127.0.0.1", "port": "5000", "pipelined": "1" * 1000},
        {"jid": "", "host": "127.0.0.1", "port": "5000"},
        {"jid": "proxy x", "host": "127.0.0.1", "port": "5000"},
        {"jid": "proxy\x1b[2J", "host": "127.0.0.1", "port": "5000"},
        {"jid": "p" * 2000, "host": "127.0.0.1", "port": "5000"},
        {"jid": "proxy", "host": "127.0.0.1; rm -rf /", "port": "5000"},
        {"jid": "proxy", "host": "h" * 300, "port": "5000"},
        {"jid": "proxy", "host": "", "port": "5000"},
        {"jid": "proxy", "host": "127.0.0.1", "port": "0"},
        {"jid": "proxy", "host": "127.0.0.1", "port": "65536"},
        {"jid": "proxy", "host": "127.0.0.1", "port": "٥٠٠٠"},  # Arabic-Indic digits: isdigit() but not a port
        {"jid": "proxy", "host": "127.0.0.1", "port": "9" * 1000},
        {"jid": "proxy", "host": "127.0.0.1"},
        {"jid": "proxy", "host": "pr\u00f8xy.test", "port": "5000"},  # not ASCII: no host name we connect to
        {"jid": "proxy", "host": "127.0.0.1\udcff", "port": "5000"},  # a byte that was not UTF-8, as Python keeps it
    ]
    for attrs in hostile:
        si = build_offer(Offer("sid1", "sid1.dgwb", 10, "ab" * 32, (NS_S5B,)))
        ET.SubElement(si, q(NS_WIRE, "streamhost"), attrs)
        with pytest.raises(ValueError):
            parse_offer(si)
        si = build_offer(Offer("sid1", "sid1.dgwb", 10, "ab" * 32, (NS_IBB,)))
        ET.SubElement(si, q(NS_WIRE, "streamhost"), attrs)
        assert (parse_offer(si).streamhost, parse_offer(si).pipelined) == (None, False)  # not S5B: the hint is not looked at
    si = build_offer(Offer("sid1", "sid1.dgwb", 10, "ab" * 32, (NS_S5B,), streamhost=hint))
    for _ in range(1000):  # repeated: only the first is read
        ET.SubElement(si, q(NS_WIRE, "streamhost"), {"jid": "other", "host": "10.9.9.9", "port": "1"})
    assert parse_offer(si).streamhost == hint
