"""Namespaces and the XML this gateway sends and accepts (declared apart from behaviour).

- XEP-0095 Stream Initiation and XEP-0096 SI File Transfer: the study offer, with XEP-0020 feature
  negotiation of the stream method and XEP-0300 hashes (the SHA-256 of the bundle's manifest).
- XEP-0065 SOCKS5 Bytestreams (mediated through the server's proxy) and XEP-0047 In-Band Bytestreams.
- ``urn:dicomgw:transfer:1``: the receiver's verdict on a completed bundle (ours; XEP-0096 has none), and
  the delivery receipt: ``<receipt study=UID bundle=SHA-256 instances=N outcome='delivered'|'failed'>text``
  sent by the receiving gateway (IQ set) once its PACS holds every instance, or refused one for good. The
  ``bundle`` digest is the SHA-256 of the manifest, which lists every instance's SHA-256.
"""

from __future__ import annotations

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
BUNDLE_MIME = "application/x-dicomgw-bundle"


def q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


@dataclass(frozen=True)
class Offer:
    sid: str
    name: str
    size: int
    manifest_sha256: str
    study_instance_uid: str
    methods: tuple[str, ...]


def build_offer(offer: Offer) -> ET.Element:
    si = ET.Element(q(NS_SI, "si"), {"id": offer.sid, "mime-type": BUNDLE_MIME, "profile": NS_FT})
    file_el = ET.SubElement(si, q(NS_FT, "file"), {"name": offer.name, "size": str(offer.size)})
    ET.SubElement(file_el, q(NS_FT, "desc")).text = f"DICOM study {offer.study_instance_uid}"
    ET.SubElement(file_el, q(NS_FT, "range"))
    ET.SubElement(file_el, q(NS_HASHES, "hash"), {"algo": "sha-256"}).text = offer.manifest_sha256
    feature = ET.SubElement(si, q(NS_FEATURE, "feature"))
    form = ET.SubElement(feature, q(NS_DATA, "x"), {"type": "form"})
    field = ET.SubElement(form, q(NS_DATA, "field"), {"var": "stream-method", "type": "list-single"})
    for method in offer.methods:
        ET.SubElement(ET.SubElement(field, q(NS_DATA, "option")), q(NS_DATA, "value")).text = method
    return si


def parse_offer(si: ET.Element) -> Offer:
    """Raises ValueError (turned into bad-request) for anything malformed."""
    file_el = si.find(q(NS_FT, "file"))
    if file_el is None or si.get("profile") != NS_FT:
        raise ValueError("not a file-transfer stream initiation")
    desc = (file_el.findtext(q(NS_FT, "desc")) or "").removeprefix("DICOM study ").strip()
    hash_el = file_el.find(q(NS_HASHES, "hash"))
    methods = tuple(
        (v.text or "").strip()
        for v in si.iterfind(f"{q(NS_FEATURE, 'feature')}/{q(NS_DATA, 'x')}/{q(NS_DATA, 'field')}/{q(NS_DATA, 'option')}/{q(NS_DATA, 'value')}")
    )
    sha = (hash_el.text or "").strip() if hash_el is not None and hash_el.get("algo") == "sha-256" else ""
    if not sha or len(sha) != 64:
        raise ValueError("offer carries no SHA-256 of the bundle manifest")
    return Offer(si.get("id", ""), file_el.get("name", ""), int(file_el.get("size", "-1")), sha, desc, methods)


def build_accept(method: str, offset: int) -> ET.Element:
    si = ET.Element(q(NS_SI, "si"))
    file_el = ET.SubElement(si, q(NS_FT, "file"))
    ET.SubElement(file_el, q(NS_FT, "range"), {"offset": str(offset)})
    feature = ET.SubElement(si, q(NS_FEATURE, "feature"))
    form = ET.SubElement(feature, q(NS_DATA, "x"), {"type": "submit"})
    field = ET.SubElement(form, q(NS_DATA, "field"), {"var": "stream-method"})
    ET.SubElement(field, q(NS_DATA, "value")).text = method
    return si


def parse_accept(si: ET.Element | None) -> tuple[str, int]:
    if si is None:
        raise ValueError("the accept carries no <si/>")
    method = si.findtext(f"{q(NS_FEATURE, 'feature')}/{q(NS_DATA, 'x')}/{q(NS_DATA, 'field')}/{q(NS_DATA, 'value')}") or ""
    range_el = si.find(f"{q(NS_FT, 'file')}/{q(NS_FT, 'range')}")
    offset = int(range_el.get("offset", "0")) if range_el is not None else 0
    return method.strip(), offset


def build_result(sid: str, outcome: str, detail: str = "") -> ET.Element:
    el = ET.Element(q(NS_RESULT, "result"), {"sid": sid, "outcome": outcome})
    el.text = detail
    return el


def build_receipt(receipt: Receipt) -> ET.Element:
    el = ET.Element(q(NS_RESULT, "receipt"), {
        "study": receipt.study_instance_uid, "bundle": receipt.bundle_sha256, "instances": str(receipt.instances),
        "outcome": "delivered" if receipt.delivered else "failed",
    })
    el.text = receipt.detail
    return el


def parse_receipt(el: ET.Element | None) -> Receipt:
    """Raises ValueError (turned into bad-request) for anything malformed."""
    if el is None:
        raise ValueError("no receipt")
    bundle = el.get("bundle", "")
    outcome = el.get("outcome", "")
    if len(bundle) != 64 or outcome not in ("delivered", "failed") or not el.get("study"):
        raise ValueError("receipt needs study, a 64-digit bundle digest and outcome delivered|failed")
    return Receipt(el.get("study", ""), bundle, int(el.get("instances", "0")), outcome == "delivered", (el.text or "").strip())
