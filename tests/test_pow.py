"""Proof of work as API.md defines it."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import pow
from engine.errors import ChallengeExpired, PowInvalid

SECRET = b"s" * 32


def issue(difficulty: int = 6, puzzles: int = 3, expires_ms: int = 10_000) -> pow.Challenge:
    return pow.issue(SECRET, "rabc", "10.0.0.1", difficulty, puzzles, expires_ms)


def test_solution_is_accepted_and_checks_the_definition() -> None:
    c = issue()
    nonces = pow.solve(c.text, c.difficulty, c.puzzles)
    assert pow.verify(SECRET, c.text, nonces, release_id="rabc", client="10.0.0.1", now_ms=0) == c
    for i, nonce in enumerate(nonces):
        digest = hashlib.sha256(f"{c.text}:{i}:{nonce}".encode()).digest()
        assert int.from_bytes(digest, "big") >> (256 - c.difficulty) == 0
        assert 1 <= len(nonce) <= 32 and nonce.isalnum() and nonce.isascii()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"release_id": "rother"}, PowInvalid),
        ({"client": "10.0.0.2"}, PowInvalid),
        ({"now_ms": 10_000}, ChallengeExpired),
    ],
)
def test_scope_and_expiry(change: dict[str, object], error: type[Exception]) -> None:
    c = issue()
    nonces = pow.solve(c.text, c.difficulty, c.puzzles)
    args: dict[str, object] = {"release_id": "rabc", "client": "10.0.0.1", "now_ms": 0, **change}
    with pytest.raises(error):
        pow.verify(SECRET, c.text, nonces, **args)  # type: ignore[arg-type]


def test_forged_or_other_secret_is_refused() -> None:
    c = issue()
    nonces = pow.solve(c.text, c.difficulty, c.puzzles)
    forged = c.text.replace(".6.3.", ".0.3.")
    for text in (forged, "", "....", "v1.a.b.c.d.e.f.g"):
        with pytest.raises(PowInvalid):
            pow.verify(SECRET, text, nonces, release_id="rabc", client="10.0.0.1", now_ms=0)
    with pytest.raises(PowInvalid):
        pow.verify(b"t" * 32, c.text, nonces, release_id="rabc", client="10.0.0.1", now_ms=0)


@given(st.binary(min_size=32, max_size=32), st.integers(min_value=0, max_value=32))
def test_leading_zero_bits_matches_the_definition(digest: bytes, bits: int) -> None:
    expected = int.from_bytes(digest, "big") >> (256 - bits) == 0 if bits else True
    assert pow.leading_zero_bits_ok(digest, bits) == expected
