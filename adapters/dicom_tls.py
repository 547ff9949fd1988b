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
