"""DICOM over TLS (PS3.15 B.1, the BCP 195 profile): contexts for the SCP's TLS port and the PACS client.

TLS 1.2 or 1.3 only; on TLS 1.2 ECDHE/DHE with AES-GCM only (TLS 1.3's suites are OpenSSL's defaults:
AES-GCM and ChaCha20-Poly1305; Python cannot narrow them). The server presents ``cert_file``/``key_file``
and, with ``require_client_cert``, accepts only clients whose certificate chains to ``ca_file``. The client
verifies the server's chain against ``ca_file`` (or the system store) and presents its own certificate when
given one. Host names are checked when the client is told which name to expect.
"""

from __future__ import annotations

import ssl
from pathlib import Path

BCP195_TLS12_CIPHERS = "ECDHE+AESGCM:DHE+AESGCM"


def _profile(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_TLS12_CIPHERS)
    return context


def server_context(cert_file: Path, key_file: Path, ca_file: Path | None, require_client_cert: bool) -> ssl.SSLContext:
    context = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(cert_file, key_file)
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else (ssl.CERT_OPTIONAL if ca_file else ssl.CERT_NONE)
    return context


def client_context(ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None,
                   check_hostname: bool = False) -> ssl.SSLContext:
    context = _profile(ssl.create_default_context(cafile=str(ca_file) if ca_file else None))
    context.check_hostname = check_hostname
    if cert_file is not None and key_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


#: OpenSSL reason codes (``ssl.SSLError.reason``) in words an admin can act on.
_TLS_REASONS = (
    (("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
      "TLSV1_ALERT_DECRYPT_ERROR"), "the peer does not accept this gateway's certificate (it does not trust our CA: "
                                   "give its admin the CA of [dicom] tls_cert_file)"),
    (("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
     "no client certificate (this port requires one: [dicom] require_client_cert)"),
    (("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE", "WRONG_SSL_VERSION"),
     "a TLS version below 1.2 (BCP 195: TLS 1.2 or 1.3 only)"),
    (("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"),
     "not TLS: plain DICOM (or something else) on the TLS port"),
    (("NO_SHARED_CIPHER", "SSLV3_ALERT_HANDSHAKE_FAILURE"), "no cipher suite in common (BCP 195: ECDHE/DHE with AES-GCM)"),
    (("TLSV1_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_EXPIRED"), "the peer says our certificate has expired"),
)


def tls_refusal_reason(exc: BaseException, timeout_s: float) -> str:
    """Why a TLS handshake (or the first read after it) failed, in words: who refused what, and what to check."""
    if isinstance(exc, ssl.SSLCertVerificationError) or getattr(exc, "reason", "") == "CERTIFICATE_VERIFY_FAILED":
        message = getattr(exc, "verify_message", "") or "verification failed"
        if "unable to get local issuer" in message or "self-signed" in message or "self signed" in message:
            return f"the client's certificate is not signed by our CA ([dicom] tls_ca_file): {message}"
        return f"the client's certificate was not accepted: {message}"
    reason = str(getattr(exc, "reason", "") or "")
    for codes, words in _TLS_REASONS:
        if reason in codes:
            return words
    if isinstance(exc, TimeoutError | ssl.SSLWantReadError) or "timed out" in str(exc):
        return f"no complete TLS handshake within {timeout_s:g} s"
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError) or reason in ("UNEXPECTED_EOF_WHILE_READING", "EOF"):
        return "the peer closed the connection during the TLS handshake"
    return f"TLS failed ({reason or type(exc).__name__}: {str(exc)[:120]})"
