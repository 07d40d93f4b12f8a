"""The reservation protocol: the only module that combines Redis and PostgreSQL.

    hold     Redis only: one function spends the challenge and takes a place.
    confirm  Redis marks the hold confirming; one PostgreSQL transaction books it (its
             constraints refuse an overbooking or a second active booking); the reply is
             sent only after COMMIT; then Redis counts the booking.
    cancel   PostgreSQL first, then Redis gives the place back.
A crash between two steps leaves Redis counting a place as taken that is free, never the
reverse; the sweeper converges it, and a release whose inventory is gone from Redis is
rebuilt from PostgreSQL (``engine.recovery``).
docs/consistency.md walks through every crash window.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, TypeVar

from engine import draw, pow, sessions
from engine.errors import (
    CancelledOtherwise,
    ChallengeExpired,
    ChallengeSpent,
    HoldConfirmed,
    HoldConfirming,
    HoldExpired,
    NotCommitted,
    NotFound,
    NotOpen,
    Overloaded,
    RateLimited,
    SlotFull,
    StoreUnavailable,
    Unauthorized,
    ValidationFailed,
)
from engine.identity import Applicant, document_hash
from engine.inventory import HoldRecord, Inventory, InventoryMissing, SlotCounts, Take
from engine.keys import unspent_challenges
from engine.limits import Client, FoundSpent, Limiter
from engine.logs import log
from engine.metrics import Metrics
from engine.models import Booking, CancelledBy, Mode, Release, Site, Slot
from engine.recovery import Clock, Recovery
from engine.render import local
from engine.settings import Settings
from engine.singleflight import SingleFlight
from engine.store import Store, below_floor
from engine.tokens import (
    canonical_reference,
    derived_id,
    derived_token,
    is_signed,
    matches,
    new_id,
    new_reference,
    signed_id,
    token_fits,
    token_hash,
)

_T = TypeVar("_T")
_RELEASE_ID = re.compile(r"^r[0-9a-z]{12}$")
_TOKEN_BOUND = re.compile(r"^r[0-9a-z]{12}\.k")  # hold ids that carry their token's tag
# A hold challenge Redis answered "spent" this many times for one slot is refused
# in-process after. A retry of a hold it paid for is never answered "spent", whatever slots
# were tried in between (a person whose first answer was lost, changing slots).
_SPENT_ANSWERS = 3
# An id not among the known releases reads their list again if it is older than this: a
# release another worker published is found within it, not within ``release_cache_s``.
_MISS_REFRESH_S = 0.25
_CHILD_ID = re.compile(r"^(r[0-9a-z]{12})\.[0-9a-z]{1,20}$")
# Hold outcomes refused before the capacity decision: the challenge stays unspent.
_UNSPENT = frozenset({"no-slot", "client-limit", "reclaiming"})


def _reclaiming() -> Overloaded:
    """The slot looked full, or the client at its live-hold limit, while expired holds,
    maybe the ones in question, were still being given back (hold.lua): in a second they
    are."""
    return Overloaded(
        1, "Places of expired holds are being given back; try again in a second", "reclaiming"
    )


def with_seed(release: Release) -> tuple[Release, str | None]:
    """A draw release gets its secret seed when published; the world sees only its
    commitment until the draw."""
    if release.mode != "draw":
        return release, None
    seed = secrets.token_hex(32)
    return dataclasses.replace(release, seed_commitment=draw.seed_commitment(seed)), seed


def release_of(identifier: str) -> str:
    """The release a slot or hold id belongs to (ids are ``<release>.<suffix>``)."""
    m = _CHILD_ID.match(identifier)
    if m is None:
        raise NotFound(f"No such resource: {identifier!r}")
    return m.group(1)


@dataclass(frozen=True, slots=True)
class SlotSpec:
    starts_at: datetime
    duration_minutes: int
    capacity: int


def new_release(
    site_id: str,
    procedure_id: str,
    mode: Mode,
    slots: list[SlotSpec],
    *,
    opens_at: datetime | None = None,
    registration_opens_at: datetime | None = None,
    registration_closes_at: datetime | None = None,
    draw_at: datetime | None = None,
    release_id: str | None = None,
    beacon_source: str | None = None,
) -> Release:
    """A new release with fresh ids (or ``release_id``); its slots are numbered in time
    order (slot ids are ``<release>.<nnn>``, so any slot or hold id names its release)."""
    release_id = release_id or new_id("r")
    ordered = sorted(slots, key=lambda s: s.starts_at)
    return Release(
        release_id,
        site_id,
        procedure_id,
        mode,
        opens_at,
        registration_opens_at,
        registration_closes_at,
        draw_at,
        "UTC",
        tuple(
            Slot(f"{release_id}.{i:03d}", s.starts_at, s.duration_minutes, s.capacity, 0)
            for i, s in enumerate(ordered)
        ),
        beacon_source=beacon_source,
    )


@dataclass(frozen=True, slots=True)
class Hold:
    id: str
    token: str
    expires_at: datetime
    slot: Slot
    timezone: str


@dataclass(frozen=True, slots=True)
class Confirmation:
    booking: Booking
    cancel_token: str


class Reservations:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        inventory: Inventory,
        metrics: Metrics,
        clock: Clock = time.time,
        bucket_clock: Clock | None = None,
    ) -> None:
        """``bucket_clock`` None: token buckets run on Redis's clock (tests inject one)."""
        self.settings = settings
        self._challenge_lead = timedelta(seconds=settings.challenge_lead_s)
        self.store = store
        self.inventory = inventory
        self.metrics = metrics
        self.clock = clock
        self.recovery = Recovery(settings, store, inventory, metrics, clock)
        self.limiter = Limiter(settings, inventory, metrics, bucket_clock)
        self._releases: dict[str, tuple[float, Release | None]] = {}
        self._release_reads: SingleFlight[tuple[float, Release | None]] = SingleFlight()
        self._forgotten = 0  # counts forget() calls: a refill that spans one is not kept
        self._known: frozenset[str] = frozenset()
        self._known_at = float("-inf")
        self._known_read: SingleFlight[frozenset[str]] = SingleFlight()
        self._listed: tuple[float, list[Release]] = (float("-inf"), [])
        self._listed_read: SingleFlight[tuple[float, list[Release]]] = SingleFlight()
        self._spent = FoundSpent()  # (challenge id, slot id)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def paid(
        self, challenge: str, nonces: list[str], release_id: str, client: str, now_ms: int
    ) -> pow.Challenge:
        """The challenge this request solved, for this release and client. Its expiry is
        left to the caller: a retry after it may still get what the challenge paid for (a
        hold, an entry), so each caller bounds it on its own terms."""
        return pow.verify(
            self.settings.secret,
            challenge,
            nonces,
            release_id=release_id,
            client=client,
            now_ms=now_ms,
            check_expiry=False,
        )

    # Releases ----------------------------------------------------------------------------

    async def release(self, release_id: str) -> Release:
        """A release from a short in-process cache. An id that is not one of the known
        releases is refused from memory: random ids cost no PostgreSQL query (the list of
        ids is read again at most every ``release_cache_s``)."""
        if not _RELEASE_ID.match(release_id):
            raise NotFound(f"No release {release_id!r}")
        now = self.clock()
        cached = self._releases.get(release_id)
        if cached is None or cached[0] <= now:
            # Single flight: when the entry expires, one request reads PostgreSQL and the
            # others in flight wait for it, instead of all of them queueing on the pool.
            cached = await self._release_reads.run(
                release_id, lambda: self._load_release(release_id, now)
            )
        if cached[1] is None:
            raise NotFound(f"No release {release_id!r}")
        return cached[1]

    async def _load_release(self, release_id: str, now: float) -> tuple[float, Release | None]:
        forgotten = self._forgotten
        known = await self._release_ids(now, self.settings.release_cache_s)
        if release_id not in known:
            # Perhaps published by another worker since the list was read: read it again, if
            # it is older than _MISS_REFRESH_S. Random ids then cost one query per that time.
            known = await self._release_ids(now, _MISS_REFRESH_S)
        if release_id not in known:
            return (now, None)  # not cached: a release published meanwhile is found next time
        cached = (now + self.settings.release_cache_s, await self.store.release(release_id))
        if self._forgotten == forgotten:
            self._releases[release_id] = cached
        return cached

    async def _release_ids(self, now: float, max_age_s: float) -> frozenset[str]:
        """The ids of every release, read again if older than ``max_age_s`` (one read at a
        time: requests in flight meanwhile share it)."""
        if self._known_at + max_age_s > now:
            return self._known
        return await self._known_read.run(None, lambda: self._read_release_ids(now))

    async def _read_release_ids(self, now: float) -> frozenset[str]:
        # Releases are never deleted: what this worker knew stays known, a release it
        # published while the read was under way included.
        ids = frozenset(await self.store.release_ids())
        self._known = self._known | ids  # read after the await: nothing added meanwhile lost
        self._known_at = now
        return self._known

    async def sites(self) -> list[Site]:
        """All sites (the HTTP layer keeps the rendered listing for ``listing_cache_s``)."""
        return await self.store.sites()

    async def releases(self, site_id: str | None, procedure_id: str | None) -> list[Release]:
        """Releases with slots to come, of a site and a procedure if given: every one read
        at most once per ``listing_cache_s`` (one read at a time), then filtered here, so
        that filters of made-up values cost PostgreSQL nothing. (The HTTP layer keeps the
        rendered listings.)"""
        now = self.clock()
        listed = self._listed
        if listed[0] <= now:
            listed = await self._listed_read.run(None, lambda: self._read_listed(now))
        return [
            r
            for r in listed[1]
            if site_id in (None, r.site_id) and procedure_id in (None, r.procedure_id)
        ]

    async def _read_listed(self, now: float) -> tuple[float, list[Release]]:
        forgotten = self._forgotten
        releases = await self.store.releases(None, None, self.now())
        listed = (now + self.settings.listing_cache_s, releases)
        if self._forgotten == forgotten:
            self._listed = listed
        return listed

    async def upsert_site(self, site: Site) -> Site:
        return await self.store.upsert_site(site)

    def forget(self, release_id: str) -> None:
        """Drop what this worker cached of a release (others see changes within
        ``release_cache_s``). A refill already under way is dropped too: it may have read
        the release before the change."""
        self._releases.pop(release_id, None)
        self._release_reads.forget(release_id)
        self._listed = (float("-inf"), [])
        self._listed_read.forget(None)
        self._forgotten += 1

    async def slot_counts(self, release_id: str) -> dict[str, SlotCounts]:
        """Per-slot counts for the slot listing, expired holds reclaimed first."""
        return await self.recovery.with_inventory(
            release_id, lambda: self.inventory.counts(release_id, self.now_ms())
        )

    async def publish(self, release: Release) -> None:
        """Store a new release, then build its inventory in Redis (not counted as a rebuild).
        If Redis does not answer, the first request that needs the inventory builds it.
        A release of that id published before (the retry of a request with its
        Idempotency-Key) is left as it is."""
        release, seed = with_seed(release)
        created = await self.store.create_release(release, seed, now=self.now())
        self._known = self._known | {release.id}  # known here at once, made now or before
        self.forget(release.id)  # the list of releases is read again, not kept from before
        if not created:
            return
        try:
            # From a snapshot, like any write of capacities to Redis: a capacity change
            # committed meanwhile must not be written over (docs/consistency.md, section 8).
            outcome = await self.recovery.from_snapshot(
                release.id,
                lambda fence, caps, books: self.inventory.rebuild(release.id, fence, caps, books),
            )
        except StoreUnavailable:
            log.warning("inventory_build_deferred", release=release.id)
            return
        if outcome != "stale":
            # Built: a build after this one is a rebuild, Redis having lost it. Unrecorded
            # (PostgreSQL gone meanwhile), the first build after a loss passes for the first.
            with contextlib.suppress(StoreUnavailable):
                await self.store.built(release.id, 0)

    async def current_release(self, release_id: str) -> Release:
        """A release as PostgreSQL has it now, not from the cache: what staff read before
        they change it (its ``etag`` goes with ``If-Match``)."""
        if not _RELEASE_ID.match(release_id):
            raise NotFound(f"No release {release_id!r}")
        release = await self.store.release(release_id)
        if release is None:
            raise NotFound(f"No release {release_id!r}")
        return release

    async def patch_release(
        self,
        release_id: str,
        windows: dict[str, datetime],
        capacities: dict[str, int],
        if_match: frozenset[str] | None = None,
    ) -> None:
        """Staff change windows not yet started, and capacities (never below what is booked
        or held). A lower capacity is taken by Redis, atomically with its holds, while
        PostgreSQL holds the slots' rows and before it commits; a higher one once committed.
        With ``if_match``, only if the release's ETag is still one of those."""

        async def lower(booked: dict[str, int]) -> None:
            changes = [(slot_id, capacities[slot_id], booked[slot_id]) for slot_id in booked]
            try:
                refused = await self.inventory.lower_capacities(release_id, self.now_ms(), changes)
            except InventoryMissing:
                return  # no hold lives; the rebuild reads the capacities PostgreSQL commits
            if refused:
                raise ValidationFailed(
                    [below_floor(s, floor, "booked and held") for s, floor in refused.items()]
                )

        async def raised() -> None:
            # The fence moves for a raise too: a snapshot's write given up on before it, and
            # reaching Redis later, carries the older capacity and must set none. Redis down:
            # a raise needs no Redis (the reconcile passes it on), and such a late write, if
            # one comes, is set right by the next reconcile.
            with contextlib.suppress(StoreUnavailable):
                await self.inventory.move_fence(release_id)

        await self.store.patch_release(
            release_id,
            windows,
            capacities,
            self.now(),
            lower,
            if_match,
            raised,
            # Other workers keep the release for up to release_cache_s: a window moved
            # nearer than that would open (or close) on some of them at its old time.
            settle_s=2 * self.settings.release_cache_s,
        )
        self.forget(release_id)
        try:
            await self.recovery.from_snapshot(
                release_id,
                lambda fence, caps, _: self.inventory.reconcile(release_id, fence, caps, [], []),
            )
        except InventoryMissing:
            pass  # the rebuild reads the capacities from PostgreSQL
        except StoreUnavailable:
            # The change is committed; the sweeper's reconcile gives Redis the capacities.
            log.warning("capacity_sync_deferred", release=release_id)

    # Challenges --------------------------------------------------------------------------

    async def challenge(
        self, release_id: str, client: str, session: str | None
    ) -> tuple[pow.Challenge, str]:
        """A challenge for one attempt in ``release_id``, and the client's session token
        (``session`` if it is valid, else a new one). Its difficulty adapts to the client."""
        s = self.settings
        self.limiter.refuse_address(client)
        release = await self.release(release_id)
        now = self.now()
        if all(slot.starts_at <= now for slot in release.slots):
            raise NotOpen("Every slot of this release has started")
        if release.mode == "draw":
            # A challenge outside registration paid for an entry refused all the same,
            # once solved (an audit). Registration lasts days: no lead before it opens.
            assert release.registration_opens_at and release.registration_closes_at
            if not release.registration_opens_at <= now < release.registration_closes_at:
                raise outside_registration(release, now)
        elif release.opens_at is not None and now < release.opens_at - self._challenge_lead:
            # Issued earlier, a challenge would be stockpiled by a farm for the opening, or
            # expire before it was of use (docs/abuse.md).
            raise NotOpen.until(
                release.opens_at - self._challenge_lead,
                now,
                f"This release opens at {local(release.opens_at, release.timezone)}: its "
                f"challenges are issued from {s.challenge_lead_s} s before",
            )
        now_ms = self.now_ms()
        sid = sessions.session_id(s.secret, session, now_ms, s.session_ttl_s)
        if sid is None:
            session = sessions.issue(s.secret, now_ms)
            sid = sessions.session_id(s.secret, session, now_ms, s.session_ttl_s)
        assert session is not None
        challenge_id = pow.new_challenge_id()
        expires_ms = now_ms + s.challenge_ttl_s * 1000
        difficulty = await self.limiter.challenge(Client.of(client, sid), challenge_id, expires_ms)
        self.metrics.observe(self.metrics.pow_difficulty, difficulty)
        issued = pow.issue(
            s.secret, release_id, client, difficulty, s.pow_puzzles, expires_ms, challenge_id
        )
        return issued, session

    # Holds -------------------------------------------------------------------------------

    async def hold(
        self, slot_id: str, challenge: str, nonces: list[str], client: str, idem_key: str | None
    ) -> Hold:
        release_id = release_of(slot_id)
        # A forged or wrong challenge costs no store call. A client over a limit is not
        # refused here: its challenge was paid for before (engine/limits.py).
        # An expired challenge goes on to Redis: a retry of the hold it paid for (its answer
        # lost, the phone off the network for minutes) gets that hold while it lives, as
        # within the challenge's time, instead of 410 and then 429 for a hold it never saw.
        now_ms = self.now_ms()
        paid = self.paid(challenge, nonces, release_id, client, now_ms)
        usable_until_ms = paid.expires_ms + self.settings.hold_ttl_s * 1000
        if now_ms >= usable_until_ms:
            # No hold it paid for can be alive: refused here, without a Redis call.
            raise ChallengeExpired("The challenge's time ran out; ask for a new one")
        if self._spent.times((paid.id, slot_id), now_ms) >= _SPENT_ANSWERS:
            # A retry of the hold it paid for is answered with that hold, never "spent":
            # what keeps being told so for this slot is a replay (with Idempotency-Key
            # after key, each a new request for Redis), refused here from now on.
            raise ChallengeSpent()
        release = await self.release(release_id)
        slot = self._open_slot(release, slot_id)
        if idem_key is None:
            # Without an Idempotency-Key the challenge serves as one: a retry of the same
            # request (after a 503 whose hold was granted but never answered) gets that hold
            # back instead of 410 for the spent challenge, then 429 for a hold it never saw.
            # The challenge is single-use and bound to this client, and the token needs the
            # secret, so only that retry can get the hold.
            token = derived_token(self.settings.secret, "hold-challenge", client, paid.id, slot_id)
            idem_field = token_hash(f"challenge\x00{client}\x00{paid.id}\x00{slot_id}").hex()
        else:
            token = derived_token(self.settings.secret, "hold", client, idem_key, slot_id)
            idem_field = token_hash(f"{client}\x00{idem_key}\x00{slot_id}").hex()
        # ".k": the id carries a tag of its token (``_hold_for``); ".h", before, did not.
        # 7 random characters, not 15: the tag takes the other 8, so that the id keeps the
        # length every worker's release_of accepts (a rolling deploy serves both). Ids of
        # different tokens differ by the tag as well: 75 bits, as before.
        hold_id = signed_id(self.settings.secret, "hold-id", f"{release_id}.k", 7, token)
        now_ms = self.now_ms()
        # A hold ends when its slot starts: confirmed later, it was a booking for an
        # appointment already begun (or over), which could not be cancelled and kept the
        # person from booking the procedure again until it ended.
        deadline_ms = min(now_ms + self.settings.hold_ttl_s * 1000, _to_ms(slot.starts_at))
        if deadline_ms <= now_ms:  # started since _open_slot looked, within the millisecond
            raise NotOpen("This slot has already started")
        result = await self.recovery.with_inventory(
            release_id,
            lambda: self.inventory.hold(
                release_id,
                slot_id,
                now_ms=now_ms,
                hold_id=hold_id,
                token_hash=token_hash(token).hex(),
                deadline_ms=deadline_ms,
                idem_field=idem_field,
                challenge_id=paid.id,
                challenge_expiry_ms=paid.expires_ms,
                client_tag=paid.client_tag,
                max_live_holds=self.settings.max_live_holds,
                forget=(unspent_challenges(client), paid.id),
            ),
        )
        self.metrics.count(self.metrics.holds, result.outcome)
        if result.outcome == "full":
            raise SlotFull("No free place left on this slot; the challenge is spent")
        if result.outcome == "spent":
            self._spent.add((paid.id, slot_id), usable_until_ms, now_ms)
            if now_ms >= paid.expires_ms:
                raise ChallengeExpired("The challenge's time ran out; ask for a new one")
            raise ChallengeSpent()
        if result.outcome in _UNSPENT and now_ms < paid.expires_ms:
            # Refused before the capacity decision: the challenge stays unspent, and counts
            # among the address's unspent ones again (the hold's round trip took it off).
            with contextlib.suppress(StoreUnavailable):
                await self.inventory.restore_unspent(
                    unspent_challenges(client), paid.id, paid.expires_ms
                )
        if result.outcome == "no-slot":
            raise NotFound(f"No slot {slot_id!r}")
        if result.outcome == "reclaiming":
            raise _reclaiming()
        if result.outcome == "client-limit":
            raise RateLimited(
                self.settings.hold_ttl_s,
                # Not "you": behind a carrier's NAT (or an IPv6 /64) the hold may be another
                # person's, whom "you already hold a place" sent looking for a hold of theirs.
                "A place in this release is already held from your address: confirm or "
                "release it first (on a shared network, another person's hold counts)",
                level="holds",
            )
        # Debug level: a line per hold costs 6 % of the hold path (BENCHMARKS.md).
        log.debug("hold_granted", hold=result.hold_id, slot=slot_id, outcome=result.outcome)
        return Hold(result.hold_id, token, _from_ms(result.deadline_ms), slot, release.timezone)

    def _open_slot(self, release: Release, slot_id: str) -> Slot:
        slot = release.slot(slot_id)
        if slot is None:
            raise NotFound(f"No slot {slot_id!r}")
        if release.mode != "fcfs":
            raise NotOpen("This release is allocated by draw: register an entry instead")
        now = self.now()
        assert release.opens_at is not None
        if now < release.opens_at:
            raise NotOpen.until(
                release.opens_at,
                now,
                f"This release opens at {local(release.opens_at, release.timezone)}",
            )
        if slot.starts_at <= now:
            raise NotOpen("This slot has already started")
        return slot

    async def _hold_for(self, hold_id: str, token: str) -> tuple[Release, HoldRecord | None]:
        """The hold's release and record (None once Redis no longer has it). An id this
        service never issued (its signature does not verify) is refused before any store is
        asked: bots can send made-up ids as fast as they like. So is a token the id was not
        made with: it would otherwise cost a Redis read, or, once the hold is booked, a
        PostgreSQL one and a token of the hold's own bucket, which its owner's retries
        need."""
        secret = self.settings.secret
        if not is_signed(secret, "hold-id", hold_id):
            raise NotFound(f"No hold {hold_id!r}")
        if _TOKEN_BOUND.match(hold_id) and not token_fits(secret, "hold-id", hold_id, token):
            raise Unauthorized("Wrong hold token")
        release = await self.release(release_of(hold_id))
        record = await self.inventory.hold_record(release.id, hold_id)
        if record is not None and not matches(token, bytes.fromhex(record.token_hash)):
            raise Unauthorized("Wrong hold token")
        return release, record

    async def release_hold(self, hold_id: str, token: str, client: str) -> None:
        release, record = await self._hold_for(hold_id, token)
        if record is not None:
            outcome = await self.inventory.release_hold(release.id, hold_id, self.now_ms())
            if outcome == "confirming":
                raise HoldConfirming("This hold is being confirmed and cannot be released now")
            if outcome != "gone":
                log.info("hold_released", hold=hold_id)
                return
        # Gone from Redis: expired, released, or booked. A site that gives the hold back
        # after a confirm whose answer was lost told the person it had expired, and they
        # had a booking they could not see (an audit). A PostgreSQL lookup, which any hold
        # id once issued can ask for again: the buckets of a confirm's replay.
        spent = await self.limiter.replay(Client.of(client), hold_id)
        try:
            booking = await self.store.booking_by_hold(hold_id)
        except StoreUnavailable:
            # The hold's own token back, as a confirm's: retried on Retry-After through a
            # slow PostgreSQL, these left the confirm that answers the booking refused.
            await self.limiter.give_back(self.limiter.own(spent))
            raise
        if booking is not None:
            if booking.hold_token_hash is None or not matches(token, booking.hold_token_hash):
                raise Unauthorized("Wrong hold token")
            raise HoldConfirmed(
                f"This hold was confirmed (booking {booking.reference}): send its confirm "
                "again to get the booking and its cancel token"
            )
        raise HoldExpired("This hold expired or was released")

    # Confirm -----------------------------------------------------------------------------

    async def confirm(
        self, hold_id: str, token: str, applicant: Applicant, client: str
    ) -> Confirmation:
        """Book the hold's place for ``applicant``; the same hold always gives the same booking."""
        try:
            release, record = await self._hold_for(hold_id, token)
        except NotFound:
            self.metrics.count(self.metrics.confirms, "not-found")
            raise
        who = Client.of(client)
        identity = applicant.identity_hash(self.settings.secret).hex()
        slot_id = None
        spent: dict[str, Take] = {}
        try:
            if record is not None and not self._started(release, record.slot_id):
                spent = await self.limiter.confirm(identity, hold_id=hold_id)
                slot_id = await self.inventory.confirm_begin(release.id, hold_id, self.now_ms())
                if slot_id is None:
                    # Gone meanwhile (expired, or confirmed by a request just before): a
                    # replay after all, which takes the hold's token (taken) and neither
                    # the person's nor the global one.
                    await self.limiter.give_back([spent.pop("identity"), spent.pop("global")])
            else:
                # Gone from Redis: confirmed already (a retry), or expired, released, or
                # lost. A PostgreSQL lookup, and any hold id once issued can be replayed.
                # Or its slot has started: a hold ends then, and the retry of a confirm
                # whose store failed before (the hold still confirming) gets what that
                # confirm booked, if anything, never a booking made after the start.
                spent = await self.limiter.replay(who, hold_id)
            if slot_id is None:
                return await self._confirmed_before(hold_id, token)
            confirmation = await self._book(
                release, slot_id, hold_id, token, applicant, client_net=who.net
            )
        except StoreUnavailable:
            # Nothing decided, or nothing the person can be told: the retry that Retry-After
            # asks for must not use up their tokens, or a PostgreSQL slow for a minute left
            # them refused (429) until their hold, still confirming, was given away.
            await self.limiter.give_back(self.limiter.own(spent))
            raise
        except (RateLimited, SlotFull) as exc:
            if "identity" in spent and (isinstance(exc, SlotFull) or exc.extra["level"] == "email"):
                # Refused for the email address or the place, not for the person: their
                # token goes back. Anyone who knows a document number could otherwise lock
                # its person out of confirming, with an email at its cap and one hold, each
                # refusal handing the hold back for the next (an audit did).
                await self.limiter.give_back([spent["identity"]])
            raise
        self.metrics.count(self.metrics.confirms, "confirmed")
        return confirmation

    def _started(self, release: Release, slot_id: str) -> bool:
        slot = release.slot(slot_id)
        return slot is not None and slot.starts_at <= self.now()

    async def _confirmed_before(self, hold_id: str, token: str) -> Confirmation:
        booking = await self.store.booking_by_hold(hold_id)
        if booking is None:
            self.metrics.count(self.metrics.confirms, "hold-expired")
            raise HoldExpired("This hold expired or was released")
        if booking.hold_token_hash is None or not matches(token, booking.hold_token_hash):
            raise Unauthorized("Wrong hold token")
        self.metrics.count(self.metrics.confirms, "replayed")
        return Confirmation(booking, self._cancel_token_of(booking, token, hold_id))

    async def _book(
        self,
        release: Release,
        slot_id: str,
        hold_id: str,
        token: str,
        applicant: Applicant,
        channel: Literal["online", "staff"] = "online",
        client_net: str | None = None,
    ) -> Confirmation:
        """The PostgreSQL step and the Redis step that follows it, for a confirming hold."""
        secret = self.settings.secret
        cancel_token = self._cancel_token(token, hold_id)
        try:
            booking = await self.store.book(
                reference=new_reference(),
                release=release,
                slot_id=slot_id,
                channel=channel,
                hold_id=hold_id,
                hold_token_hash=token_hash(token),
                identity_hash=applicant.identity_hash(secret),
                email_hash=applicant.email_hash(secret),
                family_name=applicant.family_name,
                given_names=applicant.given_names,
                birth_date=applicant.birth_date,
                cancel_token_hash=token_hash(cancel_token),
                client_net=client_net,
            )
        except NotCommitted:
            # Rolled back for certain: the hold is held again, for a retry (a 503 all the same).
            await self.inventory.confirm_abort(release.id, hold_id)
            raise
        except StoreUnavailable:
            # Committed or not, we cannot tell: the hold stays "confirming" and the sweeper
            # settles it from PostgreSQL once no transaction can still be running.
            raise
        except Exception as exc:
            # PostgreSQL refused (identity already booked, slot full): nothing was booked.
            await self.inventory.confirm_abort(release.id, hold_id)
            self.metrics.count(self.metrics.confirms, getattr(exc, "name", "error"))
            raise
        try:
            if booking.status == "confirmed":
                await self.inventory.confirm_done(release.id, hold_id, slot_id, booking.reference)
            else:
                # A retry of a confirm whose booking was cancelled since: the hold is done
                # with, and its place is free (the sweeper would decide the same).
                await self.inventory.settle_confirm(release.id, hold_id, None, self.now_ms())
        except StoreUnavailable:
            # The booking is committed and is the truth; the sweeper will count it in Redis.
            log.warning("confirm_done_deferred", hold=hold_id, booking=booking.reference)
        log.info("booking_confirmed", booking=booking.reference, slot=slot_id, hold=hold_id)
        return Confirmation(booking, cancel_token)

    def _cancel_token(self, hold_token: str, hold_id: str) -> str:
        """A booking's cancel token: of its hold's token and its hold's id. A hold's token
        is not one hold's: an Idempotency-Key sent again from an address once its hold has
        ended is granted a new hold with the same token, and the two bookings shared one
        cancel token (an audit booked two people so)."""
        return derived_token(self.settings.secret, "cancel", hold_token, hold_id)

    def _cancel_token_of(self, booking: Booking, hold_token: str, hold_id: str) -> str:
        """The cancel token ``booking`` was made with, for a confirm's replay: of its hold's
        token alone for a booking made before the hold's id was part of it."""
        token = self._cancel_token(hold_token, hold_id)
        if matches(token, booking.cancel_token_hash):
            return token
        return derived_token(self.settings.secret, "cancel", hold_token)

    # Staff bookings ----------------------------------------------------------------------

    async def staff_book(
        self, slot_id: str, applicant: Applicant, idem_key: str | None = None
    ) -> Confirmation:
        """Book at the counter: the same protocol as online (a hold, then a confirm), minus
        the proof of work, so staff never take a place an online applicant is holding.
        With ``idem_key``, the same request again (its answer lost) gets the same booking
        and cancel token back, as a confirm's retry does; without, it is refused as the
        person's second booking, and the person's cancel token is lost with the answer."""
        release = await self.release(release_of(slot_id))
        slot = release.slot(slot_id)
        if slot is None:
            raise NotFound(f"No slot {slot_id!r}")
        if release.mode != "fcfs":
            # Its places go by the draw, to people at the counter as to those online: a
            # booking here would take one outside it (and, from a cancelled winner's place,
            # reopen the cancel-and-rebook trade the draw closes).
            raise NotOpen(
                "This release is allocated by draw: register the person's entry instead "
                f"(POST /v1/admin/releases/{release.id}/entries)"
            )
        secret = self.settings.secret
        if idem_key is None:
            hold_id = f"{release.id}.{new_id('s', 16)}"
        else:
            # The hold's id comes from the key and the whole request: a retry books the
            # same hold, which PostgreSQL books once (its hold id is unique). Two desks
            # that reuse a key for two people book two places, not a false "already
            # booked"; a name corrected is another request, not the first one's replay.
            keyed = derived_id(
                secret, "staff-hold", "s", 16, slot_id, idem_key, *applicant.fields()
            )
            hold_id = f"{release.id}.{keyed}"
        token = derived_token(secret, "staff", hold_id)
        if idem_key is not None and (booked := await self._staff_booked(hold_id, token)):
            return booked  # even once the slot started: nothing else passes then
        assert release.opens_at is not None
        if (now := self.now()) < release.opens_at:
            # Not before the public: a place taken at the counter before the opening is
            # one the people online never had a chance at (and what an insider would sell).
            raise NotOpen.until(
                release.opens_at,
                now,
                f"This release opens at {local(release.opens_at, release.timezone)}",
            )
        if slot.starts_at <= now:
            raise NotOpen("This slot has already started")
        try:
            return await self._staff_hold_and_book(release, slot_id, hold_id, token, applicant)
        except (SlotFull, HoldExpired):
            # A concurrent retry with the key booked the place (and let go of its hold)
            # since this one looked: the place it took is this request's.
            if idem_key is not None and (booked := await self._staff_booked(hold_id, token)):
                return booked
            raise

    async def _staff_booked(self, hold_id: str, token: str) -> Confirmation | None:
        """The booking a staff request with this hold id made before, if any."""
        booking = await self.store.booking_by_hold(hold_id)
        if booking is None:
            return None
        log.info("booking_replayed", booking=booking.reference, hold=hold_id, channel="staff")
        return Confirmation(booking, self._cancel_token_of(booking, token, hold_id))

    async def _staff_hold_and_book(
        self, release: Release, slot_id: str, hold_id: str, token: str, applicant: Applicant
    ) -> Confirmation:
        now_ms = self.now_ms()
        result = await self.recovery.with_inventory(
            release.id,
            lambda: self.inventory.hold(
                release.id,
                slot_id,
                now_ms=now_ms,
                hold_id=hold_id,
                token_hash=token_hash(token).hex(),
                deadline_ms=now_ms + 60_000,
                # The hold id: a retry finds the hold its first try left (a timeout between
                # the hold and the booking), and books that one.
                idem_field=hold_id,
                challenge_id=new_id("s", 16),  # none: each attempt's own, never spent before
                challenge_expiry_ms=now_ms + 60_000,
                client_tag=hold_id,  # its own: counter holds are never limited per client
                max_live_holds=1,
            ),
        )
        if result.outcome == "full":
            raise SlotFull("No free place left on this slot")
        if result.outcome == "reclaiming":
            raise _reclaiming()
        if result.outcome not in ("granted", "replayed"):
            raise NotFound(f"No slot {slot_id!r}")
        if await self.inventory.confirm_begin(release.id, hold_id, self.now_ms()) is None:
            raise HoldExpired("The counter's hold expired before it was confirmed")
        try:
            return await self._book(release, slot_id, hold_id, token, applicant, "staff")
        except NotCommitted:
            # Nothing booked, and _book handed the hold back: it must not keep the place.
            await self.inventory.release_hold(release.id, hold_id, self.now_ms())
            raise
        except StoreUnavailable:
            raise  # committed or not: the sweeper settles the hold from PostgreSQL
        except Exception:
            # Refused: the counter's hold must not keep the place.
            await self.inventory.release_hold(release.id, hold_id, self.now_ms())
            raise

    # Bookings ----------------------------------------------------------------------------

    async def booking(self, reference: str, cancel_token: str, client: str) -> Booking:
        return await self.looked_up(client, lambda: self._booking_of(reference, cancel_token))

    async def _booking_of(self, reference: str, cancel_token: str) -> Booking:
        booking = await self._booking(reference)
        if not matches(cancel_token, booking.cancel_token_hash):
            raise Unauthorized("Wrong cancel token")
        return booking

    async def looked_up(self, client: str, find: Callable[[], Awaitable[_T]]) -> _T:
        """``find()``, a lookup by reference (a booking, an entry) that ``client`` asked
        for. Anyone can make up references, and each lookup is a PostgreSQL query: one that
        finds nothing, or takes a wrong token, takes tokens from the client's lookup
        buckets, and a client that empties one is refused from memory (429) until it
        refills. Redis down, the miss is still a 404 (or 401)."""
        who = Client.of(client)
        self.limiter.refuse_lookups(who)
        try:
            return await find()
        except (NotFound, Unauthorized):
            with contextlib.suppress(StoreUnavailable):
                await self.limiter.lookup_missed(who)
            raise

    async def _booking(self, typed: str) -> Booking:
        if (reference := canonical_reference(typed)) is None:
            raise NotFound(f"No booking {typed!r}")
        booking = await self.store.booking(reference)
        if booking is None:
            raise NotFound(f"No booking {reference!r}")
        return booking

    async def cancel(self, reference: str, cancel_token: str, client: str) -> None:
        """Cancel (idempotent); the place returns at once: online for a first-come
        release, to the next draw's places for a draw's (and to its listing, at once)."""
        await self._cancel(await self.booking(reference, cancel_token, client), "online")

    async def check_identity(self, reference: str, id_number: str) -> bool:
        """Whether the booking was made under the number of the document a person shows at
        the counter (normalised as at booking). The number is kept by nobody, only its
        keyed hash: a booking made under a made-up number for someone else's name is found
        out here."""
        if (canonical := canonical_reference(reference)) is None:
            raise NotFound(f"No booking {reference!r}")
        matches = await self.store.check_identity(
            canonical, document_hash(self.settings.secret, id_number)
        )
        if matches is None:
            raise NotFound(f"No booking {reference!r}")
        return matches

    async def staff_cancel(
        self, reference: str, by: CancelledBy = "person", withdraw: bool = False
    ) -> None:
        """Cancel for a person at the counter or on the phone (the admin token stands for
        the cancel token), as ``cancel`` does; or, ``by`` the prefecture, a cancellation
        that counts toward none of the person's caps. ``withdraw``: the place does not go
        back, online or to a draw: the slot's capacity goes one lower with the cancel."""
        booking = await self._booking(reference)
        if booking.status == "cancelled" or not await self._cancel(booking, "staff", by, withdraw):
            # Cancelled before, or by a concurrent request: as asked, or say it was not.
            done = booking if booking.status == "cancelled" else await self._booking(reference)
            if (done.cancelled_by or "person", done.place_withdrawn) != (by, withdraw):
                how = "its place withdrawn" if done.place_withdrawn else "its place returned"
                raise CancelledOtherwise(
                    f"Already cancelled by the {done.cancelled_by or 'person'}, {how}"
                )

    async def _cancel(
        self,
        booking: Booking,
        actor: Literal["online", "staff"],
        by: CancelledBy = "person",
        withdraw: bool = False,
    ) -> bool:
        """False if the booking was already cancelled (by this request's retry, another
        request, or before)."""
        reference = booking.reference
        if booking.status == "cancelled":
            return False
        if booking.starts_at <= self.now():
            raise NotOpen("This appointment has already started")

        async def take_off(slot_id: str) -> None:
            # Before PostgreSQL commits, as a lower capacity: Redis never offers the place.
            try:
                await self.inventory.withdraw(booking.release_id, slot_id)
            except StoreUnavailable:
                if booking.mode == "fcfs":
                    raise
                # A draw's places are never offered by Redis, whose counts are only its
                # listing: with Redis down, the reconcile sets them right later.
                log.warning("withdraw_deferred", booking=reference)

        if not await self.store.cancel(reference, actor, by, take_off if withdraw else None):
            return False
        self.metrics.cancellations.labels(actor).inc()
        # A draw's bookings are in Redis's counts too (the draw's reconcile): its listing
        # shows the place free for the next draw at once, not at the next reconcile, which
        # would count a correction.
        try:
            await self.inventory.cancel_done(booking.release_id, reference)
        except StoreUnavailable:
            log.warning("cancel_done_deferred", booking=reference)
        log.info("booking_cancelled", booking=reference, by=by, withdrawn=withdraw)
        return True


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _to_ms(moment: datetime) -> int:
    return (moment - _EPOCH) // _MS


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)  # made once: timedelta(milliseconds=1) costs 1.4 µs a call


def outside_registration(release: Release, now: datetime) -> NotOpen:
    """An entry (or its challenge) outside a draw's registration: before it opens, come
    back then."""
    assert release.registration_opens_at and release.registration_closes_at
    detail = (
        f"Registration is open from {local(release.registration_opens_at, release.timezone)} "
        f"to {local(release.registration_closes_at, release.timezone)}"
    )
    if now < release.registration_opens_at:
        return NotOpen.until(release.registration_opens_at, now, detail)
    return NotOpen(detail)
