"""Proof-of-work challenges, as API.md defines them.

A challenge is ``v1.<release>.<client>.<difficulty>.<k>.<expires_ms>.<id>.<mac>``: everything
a worker needs to check it is inside, signed with HMAC, so any worker accepts what another
issued. Spending it (once) is the hold script's job, atomically with the capacity decision.
Checks run cheapest first, so a forged challenge costs one HMAC and no store call.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from itertools import count

from engine.errors import ChallengeExpired, PowInvalid
from engine.tokens import hmac_sha256, keyed_hash

ALGORITHM = "sha256-leading-zero-bits"


@dataclass(frozen=True, slots=True)
class Challenge:
    text: str
    release_id: str
    client_tag: str
    difficulty: int
    puzzles: int
    expires_ms: int
    id: str


def client_tag(secret: bytes, client: str) -> str:
    return base64.urlsafe_b64encode(keyed_hash(secret, "client", client)[:9]).decode()


def _mac(secret: bytes, body: str) -> str:
    digest = hmac_sha256(secret, b"pow\x00" + body.encode())
    return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")


def new_challenge_id() -> str:
    return secrets.token_urlsafe(12)


def issue(
    secret: bytes,
    release_id: str,
    client: str,
    difficulty: int,
    puzzles: int,
    expires_ms: int,
    cid: str | None = None,
) -> Challenge:
    tag = client_tag(secret, client)
    cid = cid or new_challenge_id()
    body = f"v1.{release_id}.{tag}.{difficulty}.{puzzles}.{expires_ms}.{cid}"
    return Challenge(
        f"{body}.{_mac(secret, body)}", release_id, tag, difficulty, puzzles, expires_ms, cid
    )


def parse(secret: bytes, text: str) -> Challenge:
    """Check the signature and decode; raise PowInvalid if it is not one of ours."""
    body, _, mac = text.rpartition(".")
    if not hmac.compare_digest(_mac(secret, body).encode(), mac.encode()):
        raise PowInvalid("The challenge was not issued by this service")
    version, release_id, tag, difficulty, puzzles, expires_ms, cid = body.split(".")
    if version != "v1":
        raise PowInvalid("Unknown challenge version")
    return Challenge(text, release_id, tag, int(difficulty), int(puzzles), int(expires_ms), cid)


def leading_zero_bits_ok(digest: bytes, difficulty: int) -> bool:
    return int.from_bytes(digest[:4], "big") >> (32 - difficulty) == 0 if difficulty else True


def verify(
    secret: bytes,
    text: str,
    nonces: list[str],
    *,
    release_id: str,
    client: str,
    now_ms: int,
    check_expiry: bool = True,
) -> Challenge:
    """Return the challenge if ``nonces`` pay for an attempt by ``client`` in ``release_id``.

    Does not know whether it was spent: that is decided with the attempt, in Redis. Without
    ``check_expiry``, an expired challenge is returned too, for Redis to tell a retry of
    the attempt it paid for (answered with that attempt) from a new one (refused).
    """
    challenge = parse(secret, text)
    if challenge.release_id != release_id:
        raise PowInvalid("The challenge was issued for another release")
    if not hmac.compare_digest(challenge.client_tag, client_tag(secret, client)):
        raise PowInvalid("The challenge was issued to another client")
    if check_expiry and now_ms >= challenge.expires_ms:
        raise ChallengeExpired("The challenge's time ran out; ask for a new one")
    if len(nonces) != challenge.puzzles:
        raise PowInvalid(f"Expected {challenge.puzzles} nonces, got {len(nonces)}")
    for i, nonce in enumerate(nonces):
        digest = hashlib.sha256(f"{text}:{i}:{nonce}".encode()).digest()
        if not leading_zero_bits_ok(digest, challenge.difficulty):
            raise PowInvalid(f"Nonce {i} misses the difficulty")
    return challenge


def solve(text: str, difficulty: int, puzzles: int) -> list[str]:
    """A reference solver (tests, the demo client, load tests): k nonces, decimal counters.

    The hash of the fixed prefix is computed once per puzzle and copied for each nonce."""
    nonces = []
    limit = 1 << (256 - difficulty)
    for i in range(puzzles):
        prefix = hashlib.sha256(f"{text}:{i}:".encode())
        for n in count():
            h = prefix.copy()
            h.update(b"%d" % n)
            if int.from_bytes(h.digest(), "big") < limit:
                nonces.append(str(n))
                break
    return nonces
