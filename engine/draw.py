"""The draw: a deterministic allocation that anyone can recompute from the published record.

Nothing here touches a store: the engine runs it, and ``guichet verify-draw`` runs it again
on a record. docs/draw.md states the same algorithm for anyone writing their own checker.

    entry digest     SHA-256("guichet-entry-v1:" + entry_id), hex. A person finds theirs
                     from the entry id only they hold; nobody learns who took part.
    entries digest   SHA-256 of the sorted entry digests joined by "\\n", hex. Frozen when
                     registration closes.
    key              SHA-256("guichet-draw-v1\\n" + seed + "\\n" + entries digest + "\\n"
                     + beacon + "\\n"), hex; seed in hex, beacon "" when there is none.
    order            entries sorted by SHA-256(key + ":" + entry digest), hex, ascending.
    places           one per free place: slots sorted by (starts_at, slot id), each slot
                     repeated as many times as it has places.
    allocation       the i-th entry in order gets the i-th place, while places last;
                     an excluded entry is skipped: its person booked this procedure
                     otherwise before the draw, or is at a booking cap, or withdrew it
                     after registration closed (docs/draw.md, step 8).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

VERSION = "guichet-draw-v1"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def entry_digest(entry_id: str) -> str:
    return _sha(f"guichet-entry-v1:{entry_id}")


def seed_commitment(seed_hex: str) -> str:
    return _sha(seed_hex)


def entries_digest(digests: Sequence[str]) -> str:
    return _sha("\n".join(sorted(digests)))


def key(seed_hex: str, entries_digest_hex: str, beacon: str) -> str:
    return _sha(f"{VERSION}\n{seed_hex}\n{entries_digest_hex}\n{beacon}\n")


def order(digests: Sequence[str], key_hex: str) -> list[str]:
    """The entries in draw order: by the hash of the key and the entry, then the entry."""
    return sorted(digests, key=lambda d: (_sha(f"{key_hex}:{d}"), d))


def ranking(seed_hex: str, digests: Sequence[str], beacon: str) -> list[str]:
    """The entries in the order the draw gives places."""
    return order(digests, key(seed_hex, entries_digest(digests), beacon))


@dataclass(frozen=True, slots=True)
class Places:
    """Free places of one slot in the draw."""

    slot: str
    starts_at: str  # RFC 3339 in UTC, fixed width: 2026-12-01T08:00:00.000000Z
    count: int


def place_list(places: Sequence[Places]) -> list[str]:
    """One slot id per place, earliest slot first."""
    ordered = sorted(places, key=lambda p: (p.starts_at, p.slot))
    return [p.slot for p in ordered for _ in range(p.count)]


def allocate(
    seed_hex: str,
    digests: Sequence[str],
    beacon: str,
    places: Sequence[Places],
    excluded: Sequence[str] = (),
    ranked: Sequence[str] | None = None,
) -> dict[str, str]:
    """entry digest -> slot id, for the winners. ``excluded`` entries keep their rank but
    get no place (their person booked this procedure otherwise before the draw, or is over
    a booking cap). ``ranked``: ``ranking``'s result, if the caller has it already."""
    out = set(excluded)
    if ranked is None:
        ranked = ranking(seed_hex, digests, beacon)
    return dict(zip([d for d in ranked if d not in out], place_list(places), strict=False))


def record(
    *,
    release: str,
    seed_hex: str,
    beacon: str,
    digests: Sequence[str],
    places: Sequence[Places],
    excluded: Sequence[str],
    drawn_at: str,
    ranked: Sequence[str] | None = None,
    beacon_source: str | None = None,
) -> dict[str, Any]:
    """The public record of a draw: everything needed to recompute it, and no identity.
    ``ranked`` as for ``allocate``; ``beacon_source``, where the beacon was to come from,
    as the release said when it was published (not part of the computation)."""
    rec = {
        "version": VERSION,
        "release": release,
        "seed_commitment": seed_commitment(seed_hex),
        "seed": seed_hex,
        "beacon": beacon,
        "entries": sorted(digests),
        "entries_digest": entries_digest(digests),
        "places": [
            {"slot": p.slot, "starts_at": p.starts_at, "count": p.count}
            for p in sorted(places, key=lambda p: (p.starts_at, p.slot))
        ],
        "excluded": sorted(excluded),
        "allocation": allocate(seed_hex, digests, beacon, places, excluded, ranked),
        "drawn_at": drawn_at,
    }
    if beacon_source is not None:
        rec["beacon_source"] = beacon_source
    return rec


def malformed(rec: dict[str, Any]) -> str | None:
    """What is not of a record's shape, if anything: a record is recomputed as it is
    written, never coerced (entries given as an object's keys, a count of 2.9 read as 2)."""

    def strings(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    for name in ("version", "release", "seed", "seed_commitment", "entries_digest"):
        if not isinstance(rec.get(name), str):
            return f"{name} is not a string"
    if not isinstance(rec.get("beacon", ""), str | None):
        return "beacon is not a string"
    if not strings(rec.get("entries")):
        return "entries is not a list of strings"
    if not strings(rec.get("excluded", [])):
        return "excluded is not a list of strings"
    places = rec.get("places")
    if not isinstance(places, list) or not all(
        isinstance(p, dict)
        and isinstance(p.get("slot"), str)
        and isinstance(p.get("starts_at"), str)
        and type(p.get("count")) is int
        and p["count"] >= 0
        for p in places
    ):
        return "places is not a list of {slot, starts_at, count} with a whole count"
    allocation = rec.get("allocation")
    if not isinstance(allocation, dict) or not all(isinstance(v, str) for v in allocation.values()):
        return "allocation is not an object of slots"
    return None


def verify(rec: dict[str, Any]) -> list[str]:
    """Recompute a record; return what does not match (empty when it all does)."""
    if (why := malformed(rec)) is not None:
        return [f"the record is malformed: {why}"]
    problems = []
    try:
        seed, beacon = rec["seed"], rec.get("beacon") or ""
        digests = rec["entries"]
        places = [Places(p["slot"], p["starts_at"], p["count"]) for p in rec["places"]]
        published = rec["allocation"]
        excluded = rec.get("excluded", [])
        if not set(excluded) <= set(digests):
            problems.append("an excluded entry is not in the entry list")
        if rec.get("version") != VERSION:
            problems.append(f"unknown version {rec.get('version')!r}, expected {VERSION!r}")
        if seed_commitment(seed) != rec["seed_commitment"]:
            problems.append(
                "the seed does not match the seed commitment published when registration opened"
            )
        if entries_digest(digests) != rec["entries_digest"]:
            problems.append(
                "the entry list does not match the entries digest frozen when "
                "registration closed (an entry was added, removed or changed)"
            )
        if len(set(digests)) != len(digests):
            problems.append("an entry appears twice")
        expected = allocate(seed, digests, beacon, places, excluded)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return [f"the record is malformed: {exc!r}"]
    for digest in sorted(set(expected) | set(published)):
        if expected.get(digest) != published.get(digest):
            problems.append(
                f"entry {digest[:16]}...: recomputed {expected.get(digest)}, "
                f"published {published.get(digest)}"
            )
    return problems


def load(text: str) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("a draw record is a JSON object")
    return data
