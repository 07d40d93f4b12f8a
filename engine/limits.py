"""Who may try, how often, and how much work each try costs.

Token buckets live in Redis (cluster-wide, on Redis's own clock, each expiring once it
would be full again). Levels:

    address    one client address                      challenges
    net        its IPv4 /24 or IPv6 /64                challenges
    net48      its IPv6 /48                            challenges
    session    the engine's signed session token       challenges
    lookup     one client address                      lookups that found nothing
    lookup-net its /24 or /64 (lookup-net48: its /48)  lookups that found nothing
    identity   the applicant's document number         confirms
    hold       one hold id                             confirms of that hold, replays too
    global     the whole engine, per endpoint          challenges, confirms (503 overloaded)

Challenges are the gate of every attempt (a hold or a draw entry spends one), so limiting
their issuance limits attempts. A client whose bucket is empty is remembered in-process
until its Retry-After passes: its next requests for what the bucket rations (challenges,
replays) are refused without a Redis round trip. An attempt already paid for (a hold or an
entry with its challenge, a hold's confirm) is not: it was counted when its challenge was
issued, and the address may be shared with whoever emptied the bucket since.

Proof of work adapts: as a client's address or network bucket empties, its challenges get
harder, up to ``pow_max_extra_bits`` more; an empty bucket answers 429. Global pressure adds
``pow_global_extra_bits`` only for clients already escalated, so a newcomer elsewhere keeps
the base difficulty during a flood.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import itertools
import math
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from engine.addresses import networks
from engine.errors import Overloaded, RateLimited, StoreUnavailable
from engine.inventory import Inventory, Take, Taken
from engine.keys import bucket, unspent_challenges
from engine.metrics import Metrics
from engine.settings import Rate, Settings

_MAX_BLOCKED = 100_000
# Escalation starts once a quarter of a bucket is used: a person's few tries stay cheap.
_FREE_SHARE = 0.25


@dataclass(frozen=True, slots=True)
class Client:
    """A client as the limits see it: its address, its networks, its session if any."""

    address: str
    net: str
    net48: str | None
    session: str | None

    @classmethod
    def of(cls, address: str, session: str | None = None) -> Client:
        return cls(address, *_networks(address), session)


@functools.lru_cache(maxsize=16384)
def _networks(address: str) -> tuple[str, str | None]:
    """``addresses.networks``, cached as a tuple of strings, which the garbage collector
    stops tracking (a cache of Client objects made its full collections scan every cached
    client)."""
    return networks(address)


@functools.lru_cache(maxsize=16384)
def _address_keys(address: str) -> tuple[str, ...]:
    """The bucket keys of an address and of its networks (strings, as in ``_networks``)."""
    net, net48 = _networks(address)
    keys = (bucket("address", address), bucket("net", net))
    return (*keys, bucket("net48", net48)) if net48 else keys


_LOOKUP_LEVELS = ("lookup", "lookup-net", "lookup-net48")


def _lookup_keys(client: Client) -> tuple[str, ...]:
    subjects = (client.address, client.net, client.net48)
    return tuple(bucket(lv, s) for lv, s in zip(_LOOKUP_LEVELS, subjects, strict=True) if s)


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Expiring(Generic[K, V]):
    """A map whose entries each lapse at a time of their own, holding at most ``cap`` of
    them. What lapsed is dropped as entries are put, by a heap of the ends: O(log n) a
    put. Past the cap, the entry nearest its end makes room. (These memories of refusals
    were dicts swept whole at each put once full, and kept full under a flood: a core's
    worth of sweeping; or cleared, losing every refusal they remembered.)"""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._items: dict[K, tuple[V, float]] = {}
        self._ends: list[tuple[float, int, K]] = []  # (end, order, key): keys need no order
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K, now: float) -> tuple[V, float] | None:
        """The value and its end, unless it has lapsed by ``now``."""
        item = self._items.get(key)
        return item if item is not None and item[1] > now else None

    def put(self, key: K, value: V, until: float, now: float) -> None:
        items, ends = self._items, self._ends
        while ends and (ends[0][0] <= now or (len(items) >= self.cap and key not in items)):
            end, _, old = heapq.heappop(ends)
            item = items.get(old)
            if item is not None and item[1] == end:  # not put again since, with a new end
                del items[old]
        items[key] = (value, until)
        heapq.heappush(ends, (until, next(self._order), key))
        if len(ends) > 2 * self.cap:  # ends left behind by entries put again
            self._ends = [(end, next(self._order), k) for k, (_, end) in items.items()]
            heapq.heapify(self._ends)

    def pop(self, key: K) -> None:
        self._items.pop(key, None)


class FoundSpent:
    """Challenges Redis answered "spent", as this worker saw them: a replay of one can be
    refused, or sent the way of a replay, without asking Redis to spend it again. Keyed as
    each caller needs (a hold's: the challenge and the slot), each key forgotten once the
    challenge can pay for nothing more (``until_ms``)."""

    _KEPT = 100_000

    def __init__(self) -> None:
        self._found: Expiring[Hashable, int] = Expiring(self._KEPT)

    def times(self, key: Hashable, now_ms: int) -> int:
        """How many times Redis said so, for a challenge still of use."""
        found = self._found.get(key, now_ms)
        return found[0] if found is not None else 0

    def add(self, key: Hashable, until_ms: int, now_ms: int) -> None:
        self._found.put(key, self.times(key, now_ms) + 1, until_ms, now_ms)

    def forget(self, key: Hashable) -> None:
        """Redis was told to give the challenge back (an attempt that failed after it):
        what it answered "spent" before no longer holds."""
        self._found.pop(key)


class Limiter:
    def __init__(
        self,
        settings: Settings,
        inventory: Inventory,
        metrics: Metrics,
        bucket_clock: Callable[[], float] | None = None,
    ) -> None:
        """``bucket_clock`` None: buckets run on Redis's clock and in-process blocks on this
        process's monotonic clock. Tests inject one clock for both."""
        self.settings = settings
        self.inventory = inventory
        self.metrics = metrics
        self._bucket_clock = bucket_clock
        self._monotonic = bucket_clock or time.monotonic
        # Past the cap a block is forgotten early: only its shortcut is lost, Redis refuses.
        self._blocked: Expiring[str, str] = Expiring(_MAX_BLOCKED)

    # In-process refusals ------------------------------------------------------------------

    def refuse_known(self, client: Client) -> None:
        """Refuse, without any store call, a client whose bucket was found empty."""
        keys = _address_keys(client.address)
        if client.session:
            keys += (bucket("session", client.session),)
        self._refuse_blocked(keys)

    def refuse_address(self, address: str) -> None:
        """``refuse_known`` for a client known by its address alone, as the handlers check
        it before reading a body: the cheapest refusal there is."""
        self._refuse_blocked(_address_keys(address))

    def _refuse_blocked(self, keys: Iterable[str]) -> None:
        now = self._monotonic()
        for key in keys:
            entry = self._blocked.get(key, now)
            if entry is not None:
                level, until = entry
                _refuse(level, max(1, math.ceil(until - now)))

    def _block(self, key: str, wait_ms: int, level: str) -> None:
        now = self._monotonic()
        self._blocked.put(key, level, now + wait_ms / 1000, now)

    # Buckets ------------------------------------------------------------------------------

    async def challenge(self, client: Client, challenge_id: str, expiry_ms: int) -> int:
        """Take the tokens one challenge costs; return the difficulty it gets (bits)."""
        s = self.settings
        self.refuse_known(client)
        self._refuse_blocked([bucket("global", "challenge"), unspent_challenges(client.address)])
        takes = {
            "address": _take(
                bucket("address", client.address),
                s.limit_address,
                unspent=(
                    unspent_challenges(client.address),
                    challenge_id,
                    expiry_ms,
                    s.max_unspent_challenges,
                ),
            ),
            "net": _take(bucket("net", client.net), s.limit_net),
            "global": _take(bucket("global", "challenge"), s.limit_global_challenge),
        }
        if client.net48:
            takes["net48"] = _take(bucket("net48", client.net48), s.limit_net48)
        if client.session:
            takes["session"] = _take(bucket("session", client.session), s.limit_session)
        taken = await self._take_all(takes)
        try:
            self._enforce(taken)
        except (RateLimited, Overloaded):
            if taken["address"].outcome == "ok":
                # Another bucket refused: the challenge recorded as unspent was never given.
                await self.inventory.forget_unspent(
                    unspent_challenges(client.address), challenge_id
                )
            raise
        return self.difficulty(taken)

    async def confirm(
        self, identity: str, endpoint: str = "confirm", hold_id: str | None = None
    ) -> dict[str, Take]:
        """Take the tokens a confirm (or a draw entry) costs: the applicant's identity, the
        endpoint's global one, and the hold's own (``hold_id``: a hold PostgreSQL refuses is
        handed back, and could be confirmed again in name after name). Not the address's or
        its networks': a confirm comes with a hold, an entry with a challenge, each paid for
        when its challenge was issued. A person behind a carrier's NAT must not lose the
        place they hold because others on that network emptied its bucket since.

        Returns the takes by level, for ``give_back`` if the attempt turns out to be a
        replay, or fails for want of a store (``own``). A refusal gives back what the
        other buckets took itself: the identity's ten tokens an hour are for attempts
        PostgreSQL decides, and a person told to retry through a flood (the global
        bucket's 503) must not be locked out of the place they hold once it passes."""
        s = self.settings
        self._refuse_blocked([bucket("global", endpoint)])
        takes = self._hold_take(hold_id)
        takes |= {
            "identity": _take(bucket("identity", identity), s.limit_identity),
            "global": _take(bucket("global", endpoint), s.limit_global_confirm),
        }
        return await self._take_or_give_back(takes)

    async def _take_or_give_back(self, takes: dict[str, Take]) -> dict[str, Take]:
        """Take every bucket of ``takes``; if one refuses, give back what the others took
        and refuse: the attempt decided nothing. The refusal is remembered from the take,
        whatever the give-back's round trip costs."""
        taken = await self._take_all(takes)
        try:
            self._enforce(taken)
        except (RateLimited, Overloaded):
            await self.give_back(t.take for t in taken.values() if t.outcome == "ok")
            raise
        return {level: t.take for level, t in taken.items()}

    @staticmethod
    def own(spent: dict[str, Take]) -> list[Take]:
        """The person's takes of ``spent`` (their identity's, their hold's): what an
        attempt that fails for want of a store gives back. The global bucket's stays
        taken: the attempt loaded the stores all the same."""
        return [take for level, take in spent.items() if level != "global"]

    async def give_back(self, takes: Iterable[Take]) -> None:
        """Put back the tokens ``takes`` took, each bucket at most full: an attempt that
        was refused, or failed for want of a store, decided nothing. Best effort: Redis
        may be what failed."""
        refunds = [dataclasses.replace(t, cost=-t.cost) for t in takes]
        if refunds:
            with contextlib.suppress(StoreUnavailable):
                await self._take_all({str(n): t for n, t in enumerate(refunds)})

    def _hold_take(self, hold_id: str | None) -> dict[str, Take]:
        """The bucket of one hold's confirms, refused in-process once found empty."""
        if hold_id is None:
            return {}
        own = bucket("hold", hold_id)
        self._refuse_blocked([own])
        return {"hold": _take(own, self.settings.limit_hold)}

    async def replay(self, client: Client, hold_id: str | None = None) -> dict[str, Take]:
        """Take the tokens a confirm of a hold Redis no longer has costs (booked, expired,
        released or lost): the retry of a booked hold, or a replay of an old hold id, each
        a PostgreSQL lookup; a draw entry's retry too (``hold_id`` None). The address's
        and its networks' as for a challenge; not the global confirm bucket: a hold id once
        issued costs nothing to replay, and replays must not shed people's confirms. And
        the hold's own (``hold_id``): a hold id is not bound to an address (a phone moves
        from Wi-Fi to its carrier between hold and confirm), so a botnet replaying one
        booked hold from many networks, each time in another name, passes every other
        bucket.

        Not the identity's: a replay's applicant is not checked against anything before
        the lookup, and one old challenge or booked hold replayed in a person's name,
        from the replayer's own address, emptied that person's bucket. They were then
        refused (429) at the confirm of the place they held, at no cost to the replayer.

        Returns the hold's take, for ``give_back`` if the lookup fails for want of a
        store: the person whose confirm's answer was lost retries through a slow
        PostgreSQL for the one reply that gives them their cancel token. A refusal gives
        back what the other buckets took itself, as ``confirm``'s does."""
        s = self.settings
        self.refuse_known(client)
        takes = self._hold_take(hold_id)
        takes |= {
            "address": _take(bucket("address", client.address), s.limit_address),
            "net": _take(bucket("net", client.net), s.limit_net),
        }
        if client.net48:
            takes["net48"] = _take(bucket("net48", client.net48), s.limit_net48)
        taken = await self._take_or_give_back(takes)
        return {"hold": taken["hold"]} if "hold" in taken else {}

    # Lookups -----------------------------------------------------------------------------

    def refuse_lookups(self, client: Client) -> None:
        """Refuse, without any store call, a lookup (of a booking, an entry) from a client
        whose lookups that found nothing emptied its bucket."""
        self._refuse_blocked(_lookup_keys(client))

    async def lookup_missed(self, client: Client) -> None:
        """Take the tokens of a lookup that found nothing: a reference or an entry id that
        does not exist, or a wrong token. Anyone can make up references, and each lookup
        is a PostgreSQL query; a person mistypes a few. A lookup that finds what it asks
        for takes nothing: a person behind a shared address can always read their booking,
        unless that address is found guessing."""
        s = self.settings
        rates = (s.limit_lookup, s.limit_lookup_net, s.limit_lookup_net)
        keys = _lookup_keys(client)  # no /48 for an IPv4 client
        takes = {lv: _take(k, r) for lv, k, r in zip(_LOOKUP_LEVELS, keys, rates, strict=False)}
        self._enforce(await self._take_all(takes))

    async def _take_all(self, takes: dict[str, Take]) -> dict[str, Taken]:
        """Take every bucket of ``takes`` in one round trip; each result under its level."""
        now_us = None if self._bucket_clock is None else int(self._bucket_clock() * 1_000_000)
        taken = await self.inventory.take_tokens(list(takes.values()), now_us)
        return dict(zip(takes, taken, strict=True))

    def _enforce(self, taken: dict[str, Taken]) -> None:
        """Raise for the first empty bucket, remembering it so the next request is refused
        in-process. A global bucket sheds load (503); the others are the client's (429)."""
        for level, result in taken.items():
            if result.outcome == "ok":
                continue
            if result.outcome == "stockpile" and result.take.unspent is not None:
                # Remembered for a second only: an address that keeps asking then costs
                # Redis (and its network's and the global buckets, taken in the same trip)
                # once a second per worker, and a person who spends one of their challenges
                # waits a second at most for the next.
                self._block(result.take.unspent[0], _STOCKPILE_BLOCK_MS, "unspent")
                raise RateLimited(
                    max(1, math.ceil(result.wait_ms / 1000)), _DETAILS["unspent"], level="unspent"
                )
            self._block(result.take.key, result.wait_ms, level)
            _refuse(level, max(1, math.ceil(result.wait_ms / 1000)))

    def difficulty(self, taken: dict[str, Taken]) -> int:
        """Base difficulty, plus bits as the client's own buckets empty, plus bits under
        global pressure for a client that is already escalated."""
        s = self.settings
        own = max(taken[k].used for k in ("address", "net", "net48") if k in taken)
        extra = 0
        if own > _FREE_SHARE:
            extra = math.ceil((own - _FREE_SHARE) / (1 - _FREE_SHARE) * s.pow_max_extra_bits)
            pressure = taken["global"].used
            if pressure > 0.5:
                extra += math.ceil((pressure - 0.5) / 0.5 * s.pow_global_extra_bits)
        return min(32, s.pow_difficulty + extra)


def _take(key: str, rate: Rate, unspent: tuple[str, str, int, int] | None = None) -> Take:
    return Take(key, rate.per_s, rate.burst, 1, unspent)


def _refuse(level: str, seconds: int) -> None:
    """A global bucket sheds load (503); the others are the client's own (429)."""
    if level == "global":
        raise Overloaded(seconds, "Too many attempts right now; try again shortly", level=level)
    raise RateLimited(seconds, _detail(level), level=level)


_STOCKPILE_BLOCK_MS = 1000

_DETAILS = {
    # Not "you": behind a carrier's NAT (or an IPv6 /64) the challenges may be others'.
    "unspent": "Too many challenges not yet used from this address (on a shared network, "
    "other people's count): try again once one is used or has expired",
    "address": "Too many attempts from this address",
    "net": "Too many attempts from this network",
    "net48": "Too many attempts from this network",
    "session": "Too many attempts in this session",
    "identity": "Too many attempts for this person",
    "hold": "Too many attempts to confirm this hold",
    "lookup": "Too many lookups of bookings or entries that do not exist from this address",
    "lookup-net": "Too many lookups of bookings or entries that do not exist from this network",
    "lookup-net48": "Too many lookups of bookings or entries that do not exist from this network",
}


def _detail(level: str) -> str:
    return _DETAILS.get(level, "Too many attempts")
