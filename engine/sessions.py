"""Session tokens: ``s1.<id>.<issued_ms>.<mac>``, signed, so any worker checks them alone.

A session groups one browser's attempts under its own token bucket. A client may drop its
session and get a new one with its next challenge; then only its address and network
buckets limit it (docs/abuse.md).
"""

from __future__ import annotations

import base64
import hmac
import secrets

from engine.tokens import hmac_sha256

HEADER = "Guichet-Session"


def _mac(secret: bytes, body: str) -> str:
    digest = hmac_sha256(secret, b"session\x00" + body.encode())
    return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")


def issue(secret: bytes, now_ms: int) -> str:
    body = f"s1.{secrets.token_urlsafe(12)}.{now_ms}"
    return f"{body}.{_mac(secret, body)}"


def session_id(secret: bytes, token: str | None, now_ms: int, ttl_s: int) -> str | None:
    """The session's id if ``token`` is ours and younger than ``ttl_s``, else None."""
    if not token or len(token) > 100 or not token.isascii():
        return None  # not ours (and bytes not UTF-8 reach here as surrogates, unencodable)
    body, _, mac = token.rpartition(".")
    if not hmac.compare_digest(_mac(secret, body).encode(), mac.encode()):
        return None
    _version, sid, issued = body.split(".")
    if not 0 <= now_ms - int(issued) < ttl_s * 1000:
        return None
    return sid
