"""Identifiers, bearer tokens and keyed hashes.

Tokens carry at least 128 random bits (192 here) and are stored only as SHA-256 hashes; a
presented token is compared with ``hmac.compare_digest``. A token that must be handed out again
on an idempotent retry is derived with HMAC from the secret and something only the rightful
client holds, so it is no more guessable than a random one and nothing in clear is stored.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def _by_low_bits(alphabet: str) -> bytes:
    """A ``bytes.translate`` table: each byte to one of 32 characters by its low 5 bits, so
    random bytes give uniform characters, 5 bits each."""
    return bytes(ord(alphabet[b & 31]) for b in range(256))


_ID_TABLE = _by_low_bits(_ID_ALPHABET)
_REFERENCE_TABLE = _by_low_bits(_CROCKFORD)


def new_token() -> str:
    return secrets.token_urlsafe(24)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def matches(token: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(token_hash(token), stored_hash)


@functools.lru_cache(maxsize=8)
def _keyed(secret: bytes) -> hmac.HMAC:
    return hmac.new(secret, digestmod=hashlib.sha256)


def hmac_sha256(secret: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 of ``message``. The keyed state is made once per secret and copied: a
    hold computes three, and keying took a third of each (BENCHMARKS.md)."""
    h = _keyed(secret).copy()
    h.update(message)
    return h.digest()


def keyed_hash(secret: bytes, purpose: str, value: str) -> bytes:
    """HMAC-SHA256 of ``value``: for identities, emails and clients, never reversible."""
    return hmac_sha256(secret, f"{purpose}\x00{value}".encode())


def derived_token(secret: bytes, purpose: str, *parts: str) -> str:
    mac = keyed_hash(secret, purpose, "\x00".join(parts))
    return base64.urlsafe_b64encode(mac[:24]).decode().rstrip("=")


def new_id(prefix: str, length: int = 12) -> str:
    """An opaque identifier: a one-letter kind and ``length`` random base32 characters.

    One read of the system's randomness per id (secrets.choice per character made 40 reads
    per hold: 16 % of a worker's time on the hold path, BENCHMARKS.md)."""
    return prefix + secrets.token_bytes(length).translate(_ID_TABLE).decode()


def derived_id(secret: bytes, purpose: str, prefix: str, length: int, *parts: str) -> str:
    """An identifier like ``new_id``'s, made from ``parts`` with the secret: the same parts
    give the same id, and nobody without the secret can tell which parts."""
    mac = keyed_hash(secret, purpose, "\x00".join(parts))
    assert length <= len(mac)
    return prefix + mac[:length].translate(_ID_TABLE).decode()


_SIGNATURE = 4  # characters of a signed id's MAC: 20 bits


def signed_id(
    secret: bytes, purpose: str, prefix: str, length: int, token: str | None = None
) -> str:
    """``prefix``, ``length`` random characters, and 4 characters of a MAC of both: the
    service can tell an id it issued from any other without keeping it (a wrong one passes
    once in a million guesses). ``purpose``: 10 bytes at most.

    With ``token``, 8 characters of a MAC of the token (40 bits: too many to search for
    one that fits by asking) come before the signature, which covers them:
    ``token_fits`` then tells a wrong token from the id alone, and the stored hash of the
    token still decides."""
    body = new_id(prefix, length)
    if token is not None:
        body += _token_tag(secret, purpose, body, token)
    return body + _signature(secret, purpose, body)


def token_fits(secret: bytes, purpose: str, identifier: str, token: str) -> bool:
    """Whether ``token`` is the one ``identifier`` was made with (``signed_id``'s
    ``token``); the identifier's own signature is ``is_signed``'s to check."""
    body = identifier[:-_SIGNATURE]
    base, tag = body[:-_TOKEN_TAG], body[-_TOKEN_TAG:]
    return hmac.compare_digest(tag.encode(), _token_tag(secret, purpose, base, token).encode())


_TOKEN_TAG = 8  # characters of a token's MAC in an id: 40 bits


def _token_tag(secret: bytes, purpose: str, base: str, token: str) -> str:
    return _signature(secret, purpose + ":token", f"{base}\x00{token}", _TOKEN_TAG)


def is_signed(secret: bytes, purpose: str, identifier: str) -> bool:
    body, signature = identifier[:-_SIGNATURE], identifier[-_SIGNATURE:]
    return len(identifier) > _SIGNATURE and hmac.compare_digest(
        signature.encode(), _signature(secret, purpose, body).encode()
    )


def _signature(secret: bytes, purpose: str, body: str, size: int = _SIGNATURE) -> str:
    # Keyed BLAKE2b is a MAC in one call: about half an HMAC's time, on every hold.
    mac = hashlib.blake2b(
        body.encode(), digest_size=size, key=_id_key(secret), person=purpose.encode()
    )
    return mac.digest().translate(_ID_TABLE).decode()


@functools.lru_cache(maxsize=8)
def _id_key(secret: bytes) -> bytes:
    """BLAKE2b takes keys of 64 bytes at most: one derived from the secret."""
    return hmac_sha256(secret, b"signed-id")


# What a reference may be typed as: any case, with or without its dashes or spaces, and O
# for 0, I or L for 1 (Crockford's base32, which references are in, reads them so).
_TYPED = str.maketrans("OIL", "011", " -")


def canonical_reference(typed: str) -> str | None:
    """A booking reference as the engine writes it (``GQ-7K2M-9X4P``), from one as a person
    or an agent types it (``gq 7k2m 9x4p``, ``GQ7K2M9X4P``), or None if it cannot be one."""
    chars = typed.upper().translate(_TYPED)
    if len(chars) != 10 or not typed.isascii() or any(c not in _CROCKFORD for c in chars):
        return None
    return f"{chars[:2]}-{chars[2:6]}-{chars[6:]}"


def new_reference() -> str:
    """A booking reference the counter staff can read aloud: ``GQ-7K2M-9X4P`` (50 bits).

    One read of the system's randomness (``secrets.choice`` per character made ten: 2 % of
    a confirm, BENCHMARKS.md)."""
    chars = secrets.token_bytes(10).translate(_REFERENCE_TABLE).decode()
    return f"{chars[:2]}-{chars[2:6]}-{chars[6:]}"
