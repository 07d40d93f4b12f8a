"""Keyed hashes are stored (identity and email hashes in PostgreSQL) and tokens derived from
them are handed out again on retries: the faster HMAC must give exactly the same bytes."""

from __future__ import annotations

import hashlib
import hmac
import re

from hypothesis import given
from hypothesis import strategies as st

from engine.tokens import (
    canonical_reference,
    hmac_sha256,
    is_signed,
    keyed_hash,
    new_id,
    new_reference,
    signed_id,
    token_fits,
)


@given(st.binary(min_size=1, max_size=80), st.binary(max_size=200), st.binary(max_size=200))
def test_hmac_is_hmac_sha256(secret: bytes, first: bytes, second: bytes) -> None:
    # Twice per secret: the keyed state is cached, and a copy must not carry the last message.
    for message in (first, second):
        assert hmac_sha256(secret, message) == hmac.new(secret, message, hashlib.sha256).digest()


@given(st.binary(min_size=1, max_size=80), st.text(max_size=10), st.text(max_size=50))
def test_keyed_hash_is_unchanged(secret: bytes, purpose: str, value: str) -> None:
    expected = hmac.new(secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()
    assert keyed_hash(secret, purpose, value) == expected


def test_ids_use_the_alphabet_and_the_length() -> None:
    ids = {new_id("h", 16) for _ in range(2000)}
    assert len(ids) == 2000
    assert all(re.fullmatch(r"h[0-9a-hjkmnp-tv-z]{16}", i) for i in ids)
    # Every character of the alphabet shows up: the mapping is not stuck on a few.
    assert set("".join(i[1:] for i in ids)) == set("0123456789abcdefghjkmnpqrstvwxyz")


def test_references_use_crockford_base32() -> None:
    refs = {new_reference() for _ in range(2000)}
    assert len(refs) == 2000
    assert all(re.fullmatch(r"[0-9A-Z]{2}-[0-9A-Z]{4}-[0-9A-Z]{4}", r) for r in refs)
    assert set("".join(r.replace("-", "") for r in refs)) == set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
    assert all(canonical_reference(r) == r for r in refs)


def test_a_reference_is_found_as_people_type_it() -> None:
    """Read aloud at the counter, typed on a phone: any case, dashes or spaces or none, and
    O for 0, I or L for 1, as Crockford's base32 reads them. It was found only exactly."""
    for typed in ("gq-7k2m-9x4p", "GQ7K2M9X4P", "gq 7k2m 9x4p", " GQ-7K2M-9X4P "):
        assert canonical_reference(typed) == "GQ-7K2M-9X4P", typed
    assert canonical_reference("1O-ILLI-OOOO") == "10-1111-0000"
    for wrong in ("GQ-7K2M-9X4", "GQ-7K2M-9X4PP", "GQ-7K2M-9X4U", "GQ-7K2M-9X4É", "ßßßßß", ""):
        assert canonical_reference(wrong) is None, wrong


def test_a_token_bound_id_tells_a_wrong_token() -> None:
    secret = b"s" * 32
    ids = {
        f"token-{n}": signed_id(secret, "hold-id", "r0000000000ab.k", 7, f"token-{n}")
        for n in range(200)
    }
    # The hold's layout: 20 characters after the release, as every worker's release_of takes.
    assert all(re.fullmatch(r"r0000000000ab\.k[0-9a-hjkmnp-tv-z]{19}", i) for i in ids.values())
    assert all(is_signed(secret, "hold-id", i) for i in ids.values())
    assert all(token_fits(secret, "hold-id", i, token) for token, i in ids.items())
    assert not any(
        token_fits(secret, "hold-id", i, other)
        for i in ids.values()
        for other in ("token-x", "token-y")
    )  # 400 tries of a 40-bit tag
    assert not token_fits(b"j" * 32, "hold-id", ids["token-0"], "token-0")
    # The signature covers the tag: an id with another tag is no id of this service.
    i = ids["token-0"]
    tag_char = i[-5]
    assert not is_signed(secret, "hold-id", i[:-5] + ("0" if tag_char != "0" else "1") + i[-4:])


def test_signed_ids_are_told_from_others() -> None:
    secret = b"k" * 32
    ids = [signed_id(secret, "hold-id", "r0000000000ab.h", 15) for _ in range(200)]
    assert all(re.fullmatch(r"r0000000000ab\.h[0-9a-hjkmnp-tv-z]{19}", i) for i in ids)
    assert all(is_signed(secret, "hold-id", i) for i in ids)
    # A changed signature always fails; another secret or purpose fails but once in 2**20.
    for i in ids:
        last = "0" if i[-1] != "0" else "1"
        assert not is_signed(secret, "hold-id", i[:-1] + last)
    assert not any(is_signed(b"j" * 32, "hold-id", i) for i in ids[:20])
    assert not any(is_signed(secret, "entry-id", i) for i in ids[:20])
    assert not is_signed(secret, "hold-id", "abcd")
