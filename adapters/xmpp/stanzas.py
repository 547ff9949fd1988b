"""Namespaces and the XML this gateway sends and accepts (declared apart from behaviour).

- XEP-0095 Stream Initiation and XEP-0096 SI File Transfer: the study offer, with XEP-0020 feature
  negotiation of the stream method and XEP-0300 hashes (the SHA-256 of the bundle's manifest).
- XEP-0065 SOCKS5 Bytestreams (mediated through the server's proxy) and XEP-0047 In-Band Bytestreams.
- ``urn:dicomgw:transfer:1``: the receiver's verdict on a completed bundle (ours; XEP-0096 has none), and
  the delivery receipt: ``<receipt bundle=SHA-256 instances=N outcome='delivered'|'failed'>text`` sent by
  the receiving gateway (IQ set) once its PACS holds every instance, or refused one for good. The
  ``bundle`` digest is the SHA-256 of the manifest, which lists every instance's SHA-256. Both carry the
  signer's certificate and signature (``cert``, ``sig``: ``adapters.xmpp.attest``); a verdict's outcome is
  one of ``received``, ``rejected``, ``incomplete``, ``refused``.
- ``urn:dicomgw:e2e:1``: ``<identity>`` in an offer carries the sender's certificate (base64 DER) for the
  end-to-end channel (``adapters.xmpp.e2e``); an offer without it is a plaintext (lab-only) transfer. While
  the sender rotates its key, ``<identity previous='1'>`` carries its old certificate too, and ``<expect>``
  the fingerprints the sender pins for the receiver (so the receiver presents, and signs with, a certificate
  the sender accepts); the accept's ``<identity-used fingerprint=...>`` says which of the sender's two the
  receiver pins (the one the sender must present in the handshake).

Nothing here names a patient or a study: an offer's file name is its stream id, it has no description,
and a bundle is referred to by the SHA-256 of its manifest (opaque; the manifest itself travels inside
the end-to-end channel). Parsers raise ``ValueError`` for anything malformed (turned into ``bad-request``
before any admission).
"""

from __future__ import annotations

import base64
import binascii
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from gateway.transfer import Receipt

NS_SI = "http://jabber.org/protocol/si"
NS_FT = "http://jabber.org/protocol/si/profile/file-transfer"
NS_FEATURE = "http://jabber.org/protocol/feature-neg"
NS_DATA = "jabber:x:data"
NS_S5B = "http://jabber.org/protocol/bytestreams"
NS_IBB = "http://jabber.org/protocol/ibb"
NS_HASHES = "urn:xmpp:hashes:2"
NS_DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_RESULT = "urn:dicomgw:transfer:1"
NS_E2E = "urn:dicomgw:e2e:1"
NS_WIRE = "urn:dicomgw:wire:1"  # the bundle as compressed frames (gateway.wire)
WIRE_ALGO = "zstd-frames-1"
BUNDLE_MIME = "application/x-dicomgw-bundle"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
EXPECT = re.compile(r"^[0-9a-f]{64}(,[0-9a-f]{64}){0,2}$")
SID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_CERT_BYTES = 16384
VERDICT_OUTCOMES = ("received", "rejected", "incomplete", "refused")  # a closed set: it becomes a row's outcome and a label


def q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


@dataclass(frozen=True)
class Offer:
    sid: str
    name: str
    size: int
    manifest_sha256: str
    methods: tuple[str, ...]
    cert_der: bytes = b""  # the sender's certificate: the bundle travels end-to-end encrypted
    compress: bool = False  # the sender can send the bundle as compressed frames (gateway.wire)
    priority: str = "routine"  # "stat": the receiver admits it into the room it keeps for STAT studies
    previous_cert_der: bytes = b""  # the sender's old certificate while it rotates its key
    expect: str = ""  # the fingerprints the sender pins for the receiver, comma-separated ("" = unknown)
    # The SOCKS5 proxy the sender will name in its XEP-0065 query (jid, host, port): the receiver may open its
    # leg to it while it answers the offer, so that the query finds it ready (one round trip to the proxy
    # less on the path to the first byte). A hint only: the query still decides which streamhost is used.
    streamhost: tuple[str, str, int] | None = None
    # That proxy takes the SOCKS5 greeting and CONNECT request in one packet and links the legs as soon as both
    # are up (the dicomgw proxy65 variant's disco feature, NS_EARLY_LINK): the receiver may pipeline its
    # request. A hint as well: if the proxy refuses, the receiver connects again the XEP-0065 way.
    pipelined: bool = False


def build_offer(offer: Offer) -> ET.Element:
    si = ET.Element(q(NS_SI, "si"), {"id": offer.sid, "mime-type": BUNDLE_MIME, "profile": NS_FT})
    file_el = ET.SubElement(si, q(NS_FT, "file"), {"name": offer.name, "size": str(offer.size)})
    ET.SubElement(file_el, q(NS_FT, "range"))
    ET.SubElement(file_el, q(NS_HASHES, "hash"), {"algo": "sha-256"}).text = offer.manifest_sha256
    feature = ET.SubElement(si, q(NS_FEATURE, "feature"))
    form = ET.SubElement(feature, q(NS_DATA, "x"), {"type": "form"})
    field = ET.SubElement(form, q(NS_DATA, "field"), {"var": "stream-method", "type": "list-single"})
    for method in offer.methods:
        ET.SubElement(ET.SubElement(field, q(NS_DATA, "option")), q(NS_DATA, "value")).text = method
    if offer.cert_der:
        ET.SubElement(si, q(NS_E2E, "identity")).text = base64.b64encode(offer.cert_der).decode("ascii")
    if offer.previous_cert_der:
        ET.SubElement(si, q(NS_E2E, "identity"), {"previous": "1"}).text = base64.b64encode(offer.previous_cert_der).decode()
    if offer.expect:
        ET.SubElement(si, q(NS_E2E, "expect")).text = offer.expect
    if offer.compress:
        ET.SubElement(si, q(NS_WIRE, "frames"), {"algo": WIRE_ALGO})
    if offer.priority == "stat":
        ET.SubElement(si, q(NS_WIRE, "priority"), {"level": "stat"})
    if offer.streamhost is not None:
        jid, host, port = offer.streamhost
        ET.SubElement(si, q(NS_WIRE, "streamhost"), {"jid": jid, "host": host, "port": str(port),
                                                      **({"pipelined": "1"} if offer.pipelined else {})})
    return si


HOST = re.compile(r"^[A-Za-z0-9.:\[\]_-]{1,255}$")  # a DNS name or an IPv4/IPv6 literal, nothing else
JID_TEXT = re.compile(r"^[^\s\x00-\x1f\x7f]{1,1023}$")


def parse_streamhost(si: ET.Element) -> tuple[tuple[str, str, int] | None, bool]:
    """The offer's streamhost hint and whether its proxy takes a pipelined SOCKS5 request, checked as strictly
    as the rest (ValueError: bad-request)."""
    el = si.find(q(NS_WIRE, "streamhost"))
    if el is None:
        return None, False
    jid, host, port = el.get("jid", ""), el.get("host", ""), el.get("port", "")
    if not JID_TEXT.match(jid) or not HOST.match(host):
        raise ValueError("offer's streamhost hint has no usable jid or host")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536):
        raise ValueError(f"offer's streamhost hint has port {port[:16]!r} (1-65535)")
    pipelined = el.get("pipelined")
    if pipelined not in (None, "1"):
        raise ValueError(f"offer's streamhost hint has pipelined={pipelined[:16]!r} (only \"1\")")
    return (jid, host, int(port)), pipelined == "1"


def parse_offer(si: ET.Element) -> Offer:
    """Raises ValueError (turned into bad-request) for anything malformed."""
    file_el = si.find(q(NS_FT, "file"))
    if file_el is None or si.get("profile") != NS_FT:
        raise ValueError("not a file-transfer stream initiation")
    hash_el = file_el.find(q(NS_HASHES, "hash"))
    methods = tuple(
        (v.text or "").strip()
        for v in si.iterfind(f"{q(NS_FEATURE, 'feature')}/{q(NS_DATA, 'x')}/{q(NS_DATA, 'field')}/{q(NS_DATA, 'option')}/{q(NS_DATA, 'value')}")
    )
    sha = (hash_el.text or "").strip() if hash_el is not None and hash_el.get("algo") == "sha-256" else ""
    if not HEX64.match(sha):
        raise ValueError("offer carries no SHA-256 of the bundle manifest (64 lower-case hex digits)")
    sid = si.get("id", "")
    if not SID.match(sid):
        raise ValueError("offer has no usable stream id (1-64 letters, digits, '_', '.', '-')")
    size_text = file_el.get("size", "")
    if not size_text.isdigit() or len(size_text) > 19:
        raise ValueError(f"offer size {size_text[:32]!r} is not a whole number of bytes")
    if any(m not in (NS_S5B, NS_IBB) for m in methods) or not methods:
        raise ValueError("offer lists no stream method or an unknown one (XEP-0065, XEP-0047 only)")
    certs = {"current": b"", "previous": b""}
    for el in si.findall(q(NS_E2E, "identity"))[:2]:
        which = "previous" if el.get("previous") == "1" else "current"
        try:
            certs[which] = base64.b64decode((el.text or "").strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("offer's identity is not valid base64") from exc
        if len(certs[which]) > MAX_CERT_BYTES:
            raise ValueError("offer's identity certificate is too large")
    cert_der = certs["current"]
    expect = (si.findtext(q(NS_E2E, "expect")) or "").strip()
    if expect and not EXPECT.match(expect):
        raise ValueError("offer's expected fingerprints are not SHA-256 hex digests separated by commas")
    priority_el = si.find(q(NS_WIRE, "priority"))
    priority = "stat" if priority_el is not None and priority_el.get("level") == "stat" else "routine"
    streamhost, pipelined = parse_streamhost(si) if NS_S5B in methods else (None, False)
    return Offer(sid, file_el.get("name", "")[:256], int(size_text), sha, methods, cert_der, offers_frames(si), priority,
                 certs["previous"] if cert_der else b"", expect, streamhost, pipelined)


def build_accept(method: str, offset: int, compress: bool = False, identity_used: str = "") -> ET.Element:
    si = ET.Element(q(NS_SI, "si"))
    if compress:
        ET.SubElement(si, q(NS_WIRE, "frames"), {"algo": WIRE_ALGO})
    if identity_used:
        ET.SubElement(si, q(NS_E2E, "identity-used"), {"fingerprint": identity_used})
    file_el = ET.SubElement(si, q(NS_FT, "file"))
    ET.SubElement(file_el, q(NS_FT, "range"), {"offset": str(offset)})
    feature = ET.SubElement(si, q(NS_FEATURE, "feature"))
    form = ET.SubElement(feature, q(NS_DATA, "x"), {"type": "submit"})
    field = ET.SubElement(form, q(NS_DATA, "field"), {"var": "stream-method"})
    ET.SubElement(field, q(NS_DATA, "value")).text = method
    return si


def offers_frames(si: ET.Element | None) -> bool:
    """The offer (or accept) asks for the bundle as compressed frames (gateway.wire)."""
    el = si.find(q(NS_WIRE, "frames")) if si is not None else None
    return el is not None and el.get("algo") == WIRE_ALGO


def identity_used(si: ET.Element | None) -> str:
    """Which of the sender's certificates the receiver pins (its fingerprint; "" = the current one)."""
    el = si.find(q(NS_E2E, "identity-used")) if si is not None else None
    value = el.get("fingerprint", "") if el is not None else ""
    return value if HEX64.match(value) else ""


def parse_accept(si: ET.Element | None) -> tuple[str, int]:
    if si is None:
        raise ValueError("the accept carries no <si/>")
    method = si.findtext(f"{q(NS_FEATURE, 'feature')}/{q(NS_DATA, 'x')}/{q(NS_DATA, 'field')}/{q(NS_DATA, 'value')}") or ""
    range_el = si.find(f"{q(NS_FT, 'file')}/{q(NS_FT, 'range')}")
    offset_text = range_el.get("offset", "0") if range_el is not None else "0"
    if not offset_text.isdigit() or len(offset_text) > 19:
        raise ValueError(f"accept's offset {offset_text[:32]!r} is not a whole number")
    return method.strip(), int(offset_text)


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str, limit: int = 2000) -> str:
    """``text`` with the characters XML 1.0 cannot carry replaced (a PACS's reason may hold any byte)."""
    return _NOT_XML.sub("?", text[:limit])


def statement_text(text: str) -> str:
    """A verdict's or receipt's text as it arrives unchanged (what is signed): XML-safe, one line, stripped."""
    return " ".join(xml_text(text).replace("\r", "\n").split("\n")).strip()


@dataclass(frozen=True)
class Signature:
    """A signed statement's ``cert`` and ``sig`` attributes (base64; see ``adapters.xmpp.attest``)."""

    cert_b64: str = ""
    sig_b64: str = ""


@dataclass(frozen=True)
class Verdict:
    sid: str
    outcome: str  # one of VERDICT_OUTCOMES
    detail: str
    signature: Signature


def _signed(el: ET.Element, signature: Signature | None) -> ET.Element:
    if signature is not None and signature.sig_b64:
        el.set("cert", signature.cert_b64)
        el.set("sig", signature.sig_b64)
    return el


def _signature_of(el: ET.Element) -> Signature:
    cert, sig = el.get("cert", ""), el.get("sig", "")
    if len(cert) > MAX_CERT_BYTES * 2 or len(sig) > 1024:
        raise ValueError("signature or certificate too long")
    return Signature(cert, sig)


def build_result(sid: str, outcome: str, detail: str = "", signature: Signature | None = None) -> ET.Element:
    el = ET.Element(q(NS_RESULT, "result"), {"sid": sid, "outcome": outcome})
    el.text = statement_text(detail)
    return _signed(el, signature)


def parse_result(el: ET.Element | None) -> Verdict:
    """Raises ValueError (turned into bad-request) for anything malformed or an outcome outside the set."""
    if el is None:
        raise ValueError("no verdict")
    sid, outcome = el.get("sid", ""), el.get("outcome", "")
    if not SID.match(sid):
        raise ValueError("verdict has no usable stream id")
    if outcome not in VERDICT_OUTCOMES:
        raise ValueError(f"verdict outcome must be one of {', '.join(VERDICT_OUTCOMES)}")
    return Verdict(sid, outcome, (el.text or "").strip()[:2000], _signature_of(el))


def build_receipt(receipt: Receipt, signature: Signature | None = None) -> ET.Element:
    el = ET.Element(q(NS_RESULT, "receipt"), {
        "bundle": receipt.bundle_sha256, "instances": str(receipt.instances),
        "outcome": "delivered" if receipt.delivered else "failed",
    })
    el.text = statement_text(receipt.detail)
    return _signed(el, signature)


def receipt_signature(el: ET.Element) -> Signature:
    return _signature_of(el)


def parse_receipt(el: ET.Element | None) -> Receipt:
    """Raises ValueError (turned into bad-request) for anything malformed."""
    if el is None:
        raise ValueError("no receipt")
    bundle = el.get("bundle", "")
    outcome = el.get("outcome", "")
    instances = el.get("instances", "0")
    if not HEX64.match(bundle) or outcome not in ("delivered", "failed") or not instances.isdigit() or len(instances) > 9:
        raise ValueError("receipt needs a 64-digit bundle digest, a count of instances and outcome delivered|failed")
    return Receipt("", bundle, int(instances), outcome == "delivered", (el.text or "").strip()[:2000])
