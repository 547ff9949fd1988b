"""Certificate pins of peer gateways, and what may be said about a study on a relayed channel.

- A gateway's identity is a self-signed certificate; its fingerprint is the SHA-256 of the certificate's
  DER encoding. Operators read it to each other out of band; :func:`normalize_fingerprint` accepts it as
  64 hex digits, with or without colons, spaces or a ``SHA256:`` prefix, and returns 64 lower-case hex
  digits (or raises ``ValueError`` naming what is wrong). :func:`grouped` prints it for reading aloud.
- A pin may hold two fingerprints (comma-separated, :func:`pin_set`) while a peer rotates its key.
- :func:`redact` replaces study and SOP Instance UIDs in a text that leaves over the XMPP server (a verdict
  or a receipt) with positional names: the server routes, it never learns which study or instance.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def normalize_fingerprint(text: str) -> str:
    value = text.strip().lower()
    value = value.removeprefix("sha256:").removeprefix("sha-256:").strip()
    value = re.sub(r"[\s:]", "", value)
    if not _HEX64.match(value):
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits, colons and spaces allowed)")
    return value


def pin_set(pin: str | None) -> tuple[str, ...]:
    """The fingerprints a pin holds: one, or several separated by commas while a peer rotates its key (its old
    and its new certificate are both accepted until its operator drops the old: `peers edit --remove-fingerprint`)."""
    return tuple(normalize_fingerprint(part) for part in (pin or "").split(",") if part.strip())


def cert_fingerprint(cert_der: bytes) -> str:
    """A certificate's fingerprint: the SHA-256 of its DER encoding."""
    import hashlib

    return hashlib.sha256(cert_der).hexdigest()


def pinned_cert(offer: object, pin: str | None) -> bytes:
    """Of an offer's certificates (the sender's current one and, while it rotates, its previous one) the one
    ``pin`` holds; the current one when neither is (the check then refuses it, naming it)."""
    current, previous = getattr(offer, "cert_der", b""), getattr(offer, "previous_cert_der", b"")
    try:
        pins = pin_set(pin)
    except ValueError:
        pins = ()
    if previous and cert_fingerprint(current) not in pins and cert_fingerprint(previous) in pins:
        return previous
    return current


def grouped(fingerprint: str) -> str:
    """``AB12 CD34 ...``: 16 groups of four, as an operator reads it over the phone."""
    value = normalize_fingerprint(fingerprint).upper()
    return " ".join(value[i : i + 4] for i in range(0, 64, 4))


def redact(text: str, study_instance_uid: str, sop_instance_uids: Iterable[str]) -> str:
    """``text`` with the study UID as ``<study>`` and each SOP Instance UID as ``<instance n>`` (1-based,
    bundle order). Longer UIDs are replaced first so that a UID that prefixes another is not split."""
    names = {uid: f"<instance {n}>" for n, uid in enumerate(sop_instance_uids, 1) if uid}
    if study_instance_uid:
        names[study_instance_uid] = "<study>"
    for uid in sorted(names, key=len, reverse=True):
        text = re.sub(rf"(?<![\d.]){re.escape(uid)}(?!\.?\d)", names[uid], text)
    return text
