"""Password hashes for the admin web page's basic auth (``[web] auth_password_hash``): PBKDF2-HMAC-SHA256
with a random 16-byte salt and 310,000 iterations (OWASP's figure for PBKDF2-SHA256), stored as
``pbkdf2_sha256$ITERATIONS$SALT$HASH`` (base64); compared in constant time. The password itself is never
stored."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

PBKDF2_ITERATIONS = 310_000


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != "pbkdf2_sha256":
            return False
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
        return hmac.compare_digest(got, base64.b64decode(digest))
    except (ValueError, binascii.Error):
        return False
