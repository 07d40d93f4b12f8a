"""Every Redis key the engine uses, built in one place.

All keys one Lua function touches share a Redis Cluster hash tag: ``{r:<release>}`` for a
release's inventory, holds and spent challenges; each rate-limit bucket has its own tag.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

PREFIX = "g:"
SWEEPER_LOCK = PREFIX + "{sweeper}:lock"


@dataclass(frozen=True, slots=True)
class ReleaseKeys:
    inv: str
    holds: str
    confirming: str
    confirms: str
    hold: str
    idem: str
    booked: str
    spent: str
    clients: str
    rebuild_lock: str
    fence: str

    @classmethod
    @functools.lru_cache(maxsize=1024)  # per hold: ten strings and a frozen dataclass
    def of(cls, release_id: str) -> ReleaseKeys:
        tag = f"{PREFIX}{{r:{release_id}}}:"
        return cls(
            inv=tag + "inv",
            holds=tag + "holds",
            confirming=tag + "confirming",
            confirms=tag + "confirms",
            hold=tag + "hold",
            idem=tag + "idem",
            booked=tag + "booked",
            spent=tag + "spent",
            clients=tag + "clients",
            rebuild_lock=tag + "rebuild",
            fence=tag + "fence",
        )


def bucket(kind: str, subject: str) -> str:
    """A token bucket: ``kind`` names the limit, ``subject`` whom it limits. An address's
    bucket shares its hash tag with the address's unspent challenges."""
    if kind == "address":
        return f"{PREFIX}{{c:{subject}}}:bucket"
    return f"{PREFIX}{{b:{kind}:{subject}}}"


def unspent_challenges(address: str) -> str:
    """The challenges issued to an address and not yet spent (zset: id -> expiry in ms)."""
    return f"{PREFIX}{{c:{address}}}:unspent"
