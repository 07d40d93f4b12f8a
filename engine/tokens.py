"""Identifiers, bearer tokens and keyed hashes.

Tokens carry at least 128 random bits (192 here) and are stored only as SHA-256 hashes; a
presented token is compared with ``hmac.compare_digest``. A token that must be handed out again
on an idempotent retry is derived with HMAC from the secret and something only the rightful
client holds, so it is no more guessable than a random one and nothing in clear is stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def new_token() -> str:
    return secrets.token_urlsafe(24)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def matches(token: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(token_hash(token), stored_hash)


def keyed_hash(secret: bytes, purpose: str, value: str) -> bytes:
    """HMAC-SHA256 of ``value``: for identities, emails and clients, never reversible."""
    return hmac.new(secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()


def derived_token(secret: bytes, purpose: str, *parts: str) -> str:
    mac = keyed_hash(secret, purpose, "\x00".join(parts))
    return base64.urlsafe_b64encode(mac[:24]).decode().rstrip("=")


def new_id(prefix: str, length: int = 12) -> str:
    """An opaque identifier: a one-letter kind and ``length`` random base32 characters.

    One read of the system's randomness per id (secrets.choice per character made 40 reads
    per hold: 16 % of a worker's time on the hold path, BENCHMARKS.md)."""
    raw = secrets.token_bytes(length)
    return prefix + "".join(_ID_ALPHABET[b & 31] for b in raw)


REFERENCE = re.compile(r"^[0-9A-Z]{2}-[0-9A-Z]{4}-[0-9A-Z]{4}$")


def new_reference() -> str:
    """A booking reference the counter staff can read aloud: ``GQ-7K2M-9X4P`` (50 bits)."""
    chars = "".join(secrets.choice(_CROCKFORD) for _ in range(10))
    return f"{chars[:2]}-{chars[2:6]}-{chars[6:]}"
