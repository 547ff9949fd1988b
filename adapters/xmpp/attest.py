"""Signed statements between two gateways: the receiver's verdict on a stream and its delivery receipt.

The XMPP server routes these stanzas and could forge them: anyone on the peer's account (another resource,
the server's operator) can send a ``<receipt outcome='delivered'>`` naming a bundle digest that every offer
shows the server. So each statement carries the signer's certificate and an ECDSA P-256 / SHA-256 signature
made with its end-to-end identity key (``adapters.xmpp.e2e``) over a canonical text that names

    ``dicomgw-<kind>/1``, the signer's bare JID, the addressee's bare JID, then the statement's fields

(a verdict: stream id, outcome, detail; a receipt: bundle digest, instances, outcome, detail), one per line.
The addressee checks that the certificate's SHA-256 is the pin it holds for the sender's bare JID and that
the signature verifies; a statement from a peer with a pin and no valid signature is refused
(:class:`Unattested`). Binding both JIDs means a statement cannot be replayed to another gateway or
presented as from another peer. Without a pin (``require_e2e`` off, lab only) statements go unsigned.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
from collections.abc import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from adapters.xmpp.e2e import Identity, fingerprint
from gateway.pins import pin_set

log = logging.getLogger(__name__)
# x509 is imported above, not at the first verdict checked: its import alone takes ~17 ms.

MAX_SIGNATURE_BYTES = 256


class Unattested(ValueError):
    """A statement that is not signed by the key pinned for its sender (text says why, in words)."""


def canonical(kind: str, signer_bare: str, addressee_bare: str, *fields: str) -> bytes:
    """The exact bytes signed: no field may hold a newline (``detail`` as ``stanzas.statement_text`` makes it)."""
    return "\n".join((f"dicomgw-{kind}/1", signer_bare, addressee_bare, *fields)).encode()


@functools.lru_cache(maxsize=8)
def _private_key(key_path: str, cert_der: bytes) -> ec.EllipticCurvePrivateKey:
    """The key of ``cert_der`` (cached per certificate: after `dicomgw keys rotate` the same path holds another
    key, and a key that is not the certificate's is refused rather than used for a signature nobody accepts)."""
    with open(key_path, "rb") as fh:
        key = serialization.load_pem_private_key(fh.read(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{key_path} is not an EC key")
    if key.public_key().public_numbers() != _public_key(cert_der).public_numbers():
        raise ValueError(f"{key_path} is not the key of the certificate it is used with (rotated meanwhile?)")
    return key


def prepare(identities: Iterable[Identity]) -> None:
    """Load our keys and sign once, at session start on a worker thread: the first signature of a process
    otherwise pays the key's loading and OpenSSL's start (measured: a verdict's round trip 14 ms longer)."""
    for identity in identities:
        try:
            sign(identity, b"warm-up")
        except (OSError, TypeError, ValueError) as exc:  # said again, with its statement, when it is used
            log.debug("identity %s not prepared: %s", identity.key_path, exc)


def sign(identity: Identity, data: bytes) -> tuple[str, str]:
    """(certificate, signature), both base64, for a stanza's ``cert`` and ``sig`` attributes."""
    signature = _private_key(str(identity.key_path), identity.cert_der).sign(data, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(identity.cert_der).decode(), base64.b64encode(signature).decode()


@functools.lru_cache(maxsize=256)
def _public_key(cert_der: bytes) -> ec.EllipticCurvePublicKey:
    key = x509.load_der_x509_certificate(cert_der).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise Unattested("the signer's certificate holds no EC key")
    return key


def verify(pin: str, cert_b64: str, signature_b64: str, data: bytes, signer: str) -> None:
    """Raise :class:`Unattested` unless ``cert_b64`` is the certificate pinned as ``pin`` and
    ``signature_b64`` is its key's signature of ``data``."""
    if not cert_b64 or not signature_b64:
        raise Unattested(f"not signed, and {signer} has a pinned certificate")
    try:
        cert_der = base64.b64decode(cert_b64, validate=True)
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Unattested("signature or certificate is not valid base64") from exc
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise Unattested("signature too long")
    seen = fingerprint(cert_der)
    if seen not in pin_set(pin):
        raise Unattested(f"signed with certificate SHA-256 {seen}, not the one pinned for {signer}")
    try:
        _public_key(cert_der).verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError) as exc:
        raise Unattested(f"signature does not verify with {signer}'s pinned certificate") from exc
