"""Release by draw: entries during the registration window, then one draw at ``draw_at``.

The draw itself is ``engine.draw`` (pure) run inside ``Store.run_draw`` (one transaction,
once). This module checks windows, tokens and challenges, runs due draws from the sweeper,
and brings Redis's counts in line afterwards. docs/draw.md has the algorithm and timeline.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from engine import draw, pow
from engine.errors import (
    ChallengeExpired,
    ChallengeSpent,
    IdentityAlreadyBooked,
    NotCommitted,
    NotFound,
    NotOpen,
    StoreUnavailable,
    Unauthorized,
)
from engine.identity import Applicant
from engine.keys import unspent_challenges
from engine.limits import Client, FoundSpent
from engine.logs import log
from engine.models import Booking, DrawOutcome, Entry, Release
from engine.render import local
from engine.reservations import Reservations, outside_registration
from engine.store import DrawRaced
from engine.tokens import (
    derived_id,
    derived_token,
    matches,
    new_reference,
    new_token,
    token_hash,
)

_ENTRY_ID_LENGTH = 20
_OVERDUE = timedelta(minutes=1)  # a draw takes seconds, and the sweeper comes every second
# What ``enter`` makes: anything else is no entry, and is not sent to PostgreSQL (a NUL byte
# there is an error, not a miss).
ENTRY_ID = re.compile(r"^e[0-9a-z]{20}$")


@dataclass(frozen=True, slots=True)
class NewEntry:
    id: str
    token: str
    status: str  # "registered", or where a retry finds its entry later: after the draw


@dataclass(frozen=True, slots=True)
class EntryView:
    status: str
    booking: Booking | None
    cancel_token: str | None
    excluded: bool = False


class Lottery:
    def __init__(self, domain: Reservations) -> None:
        self.domain = domain
        self.settings = domain.settings
        self.store = domain.store
        self._spent = FoundSpent()  # entry challenges, by id

    def _now(self) -> datetime:
        return self.domain.now()

    async def _draw_release(self, release_id: str) -> Release:
        release = await self.domain.release(release_id)
        if release.mode != "draw":
            raise NotFound(f"Release {release_id!r} is first come, first served: no draw")
        return release

    def _cancel_token(self, entry_id: str) -> str:
        return derived_token(self.settings.secret, "draw-cancel", entry_id)

    # Entries ------------------------------------------------------------------------------

    async def enter(
        self, release_id: str, challenge: str, nonces: list[str], applicant: Applicant, client: str
    ) -> NewEntry:
        """Register a person for a draw, paid with a challenge (spent by this attempt)."""
        s = self.settings
        who = Client.of(client)
        now_ms = self.domain.now_ms()
        # The release first (from the worker's memory, unknown ids too): a challenge can
        # only be for a release that exists, so one for an unknown release was a 403 for
        # the challenge, where the release is what is missing.
        release = await self.domain.release(release_id)
        paid = self.domain.paid(challenge, nonces, release_id, client, now_ms)
        if release.mode != "draw":
            raise NotOpen("This release is first come, first served: hold a place instead")
        assert release.registration_opens_at and release.registration_closes_at
        identity = applicant.identity_hash(s.secret)
        # The entry's id and token come from the challenge (single-use, and bound to this
        # client): a retry of this request whose entry was registered but whose answer was
        # lost (a phone off the network, a 503 after the commit) gets that entry back, as a
        # hold's retry gets its hold, instead of 410 and then 409 for ever. Even once the
        # challenge's time, or registration, is over: then nothing else passes.
        entry_id = derived_id(s.secret, "entry-id", "e", _ENTRY_ID_LENGTH, client, paid.id)
        token = derived_token(s.secret, "entry", client, paid.id)
        expired = now_ms >= paid.expires_ms
        now = self._now()
        if expired or not release.registration_opens_at <= now < release.registration_closes_at:
            # A PostgreSQL lookup that any challenge once issued can ask for again and again:
            # the buckets of a confirm's replay bound it (address, networks).
            await self.domain.limiter.replay(who)
            if replayed := await self._replayed(release, entry_id, token, identity):
                return replayed
            if expired:
                raise ChallengeExpired("The challenge's time ran out; ask for a new one")
            raise outside_registration(release, now)
        if self._spent.times(paid.id, now_ms):
            # Spent, as Redis told this worker: this request's retry, or a replay, each a
            # PostgreSQL lookup. The buckets of a confirm's replay bound it, not the global
            # entry bucket, which a replayed challenge would otherwise drain for everyone.
            await self.domain.limiter.replay(who)
            if replayed := await self._replayed(release, entry_id, token, identity):
                return replayed
            # No entry: the attempt that spent it may have failed since and given it back,
            # on another worker, which cannot clear this one's memory. Redis says.
            if not await self._spend(release_id, paid, client, now_ms):
                raise ChallengeSpent()
            self._spent.forget(paid.id)
            try:
                # A new attempt after all: it takes what an entry takes (the global entry
                # bucket sheds load), or gives the challenge back.
                spent = await self.domain.limiter.confirm(identity.hex(), endpoint="entry")
            except Exception:
                await self._give_back(release_id, paid.id)
                raise
        else:
            spent = await self.domain.limiter.confirm(identity.hex(), endpoint="entry")
            try:
                fresh = await self._spend(release_id, paid, client, now_ms)
            except StoreUnavailable:
                await self.domain.limiter.give_back(self.domain.limiter.own(spent))
                raise
            if not fresh:
                # Spent before: a retry or a replay after all, and its PostgreSQL lookup,
                # which takes a replay's buckets, not the person's token it names nor the
                # global one.
                self._spent.add(paid.id, paid.expires_ms, now_ms)
                await self.domain.limiter.give_back(spent.values())
                await self.domain.limiter.replay(who)
                return await self._replayed_or_spent(release, entry_id, token, identity)
        try:
            await self._add_entry(release, entry_id, token, applicant, identity, who.net)
        except IdentityAlreadyBooked:
            # Registered by this request's first try, whose answer was a 503 (the commit went
            # through, its acknowledgement did not): the challenge was given back, and spent
            # again by this retry.
            if replayed := await self._replayed(release, entry_id, token, identity):
                return replayed
            raise
        except StoreUnavailable:
            # Nothing was registered: the attempt must not cost the challenge, nor the
            # person's tokens (Limiter.confirm).
            await self._give_back(release_id, paid.id)
            await self.domain.limiter.give_back(self.domain.limiter.own(spent))
            raise
        self.domain.metrics.entries.inc()
        log.info("entry_registered", release=release_id, entry=entry_id)
        return NewEntry(entry_id, token, "registered")

    async def _spend(self, release_id: str, paid: pow.Challenge, client: str, now_ms: int) -> bool:
        """Spend an entry's challenge. Redis may have spent it and its answer been lost (a
        timeout): nothing is registered then, so it is given back before the 503, or every
        retry would be told "spent". Giving back one a concurrent retry spent is harmless:
        the entry's id comes from the challenge, and cannot be registered twice."""
        try:
            return await self.domain.inventory.spend_challenge(
                release_id, paid.id, paid.expires_ms, now_ms, (unspent_challenges(client), paid.id)
            )
        except StoreUnavailable:
            await self._give_back(release_id, paid.id)
            raise

    async def _give_back(self, release_id: str, challenge_id: str) -> None:
        """Give an entry's challenge back (best effort: Redis may be what failed), its
        attempt having registered nothing. A retry told "spent" meanwhile left this
        worker remembering so: no longer."""
        with contextlib.suppress(StoreUnavailable):
            await self.domain.inventory.unspend(release_id, challenge_id)
        self._spent.forget(challenge_id)

    async def staff_enter(
        self, release_id: str, applicant: Applicant, idem_key: str | None
    ) -> NewEntry:
        """Register a person in a draw at the counter or on the phone (the non-digital
        channel): the same rules as online, minus the proof of work. With ``idem_key``, the
        same request again (its answer lost) gets the same entry back, as a hold's
        Idempotency-Key does; without, it is refused as this person's second entry."""
        s = self.settings
        release = await self.domain.release(release_id)
        if release.mode != "draw":  # as online
            raise NotOpen("This release is first come, first served: book a place instead")
        assert release.registration_opens_at and release.registration_closes_at
        identity = applicant.identity_hash(s.secret)
        key = idem_key if idem_key is not None else new_token()
        # The person, as sent, is part of the key's scope: two desks that reuse a key for
        # two people register two entries, not a false "already entered"; a name corrected
        # is another request, not the first one's replay.
        entry_id = derived_id(
            s.secret, "staff-entry-id", "e", _ENTRY_ID_LENGTH, release.id, key, *applicant.fields()
        )
        token = derived_token(s.secret, "staff-entry", entry_id)
        if idem_key is not None and (
            replayed := await self._replayed(release, entry_id, token, identity)
        ):
            return replayed
        now = self._now()
        if not release.registration_opens_at <= now < release.registration_closes_at:
            raise outside_registration(release, now)
        try:
            await self._add_entry(release, entry_id, token, applicant, identity, None)
        except IdentityAlreadyBooked:
            # The key's first request registered it, and its answer was lost.
            if idem_key is not None and (
                replayed := await self._replayed(release, entry_id, token, identity)
            ):
                return replayed
            raise
        self.domain.metrics.entries.inc()
        log.info("entry_registered", release=release.id, entry=entry_id, channel="staff")
        return NewEntry(entry_id, token, "registered")

    async def _replayed(
        self, release: Release, entry_id: str, token: str, identity: bytes
    ) -> NewEntry | None:
        """The entry a retry of the request that registered it gets back, if there is one."""
        status = await self.store.entry_status(entry_id, release.id, identity)
        if status is None:
            return None
        log.info("entry_replayed", release=release.id, entry=entry_id)
        return NewEntry(entry_id, token, status)

    async def _replayed_or_spent(
        self, release: Release, entry_id: str, token: str, identity: bytes
    ) -> NewEntry:
        """The entry a retry registered with its challenge, or 410 for a spent challenge."""
        if replayed := await self._replayed(release, entry_id, token, identity):
            return replayed
        raise ChallengeSpent()

    async def _add_entry(
        self,
        release: Release,
        entry_id: str,
        token: str,
        applicant: Applicant,
        identity: bytes,
        client_net: str | None,
    ) -> None:
        s = self.settings
        await self.store.add_entry(
            entry_id=entry_id,
            digest=draw.entry_digest(entry_id),
            release=release,
            token_hash=token_hash(token),
            identity_hash=identity,
            email_hash=applicant.email_hash(s.secret),
            family_name=applicant.family_name,
            given_names=applicant.given_names,
            birth_date=applicant.birth_date,
            client_net=client_net,
        )

    async def _entry(self, release_id: str, entry_id: str, token: str) -> tuple[Release, Entry]:
        release = await self._draw_release(release_id)
        entry = await self.store.entry(entry_id) if ENTRY_ID.match(entry_id) else None
        if entry is None or entry.release_id != release.id:
            raise NotFound(f"No entry {entry_id!r} in this release")
        if not matches(token, entry.token_hash):
            raise Unauthorized("Wrong entry token")
        return release, entry

    async def view(self, release_id: str, entry_id: str, token: str, client: str) -> EntryView:
        _, entry = await self.domain.looked_up(
            client, lambda: self._entry(release_id, entry_id, token)
        )
        if entry.status != "won" or entry.booking_reference is None:
            return EntryView(entry.status, None, None, entry.excluded)
        booking = await self.store.booking(entry.booking_reference)
        return EntryView(entry.status, booking, self._cancel_token(entry.id))

    async def withdraw(self, release_id: str, entry_id: str, token: str, client: str) -> None:
        """Withdraw before the draw (API.md), registration closed or not: after the close
        the entry stays in the frozen list, and the draw passes it over."""
        release, entry = await self.domain.looked_up(
            client, lambda: self._entry(release_id, entry_id, token)
        )
        if entry.status == "registered" and await self.store.withdraw_entry(release.id, entry.id):
            log.info("entry_withdrawn", release=release_id, entry=entry_id)
            return
        if entry.status == "registered":  # changed meanwhile: by the draw, or a withdrawal
            _, entry = await self._entry(release_id, entry_id, token)
        if entry.status != "withdrawn" or entry.excluded:
            raise NotOpen("The draw has run: the entry can no longer be withdrawn")

    # Draws --------------------------------------------------------------------------------

    async def record(self, release_id: str) -> dict[str, Any]:
        release = await self._draw_release(release_id)
        rec = await self.store.draw_record(release.id)
        if rec is None:
            assert release.draw_at is not None
            raise NotOpen(f"The draw takes place at {local(release.draw_at, release.timezone)}")
        return rec

    async def set_beacon(self, release_id: str, beacon: str) -> None:
        release = await self._draw_release(release_id)
        await self.store.set_beacon(release.id, beacon, self._now())
        self.domain.forget(release.id)

    async def run_due(self) -> list[DrawOutcome]:
        """Freeze closed registrations, then run every due draw (each exactly once). One
        release that cannot be frozen or drawn does not hold back the others, but for the
        later draws of its procedure at its site (``Store.run_draw``)."""
        now = self._now()
        for release_id in await self.store.closed_unfrozen(now):
            try:
                await self.store.freeze_entries(release_id, now)
            except Exception as exc:
                # Its draw computes the digest itself, if it comes to run before a freeze.
                await self._failed("freeze", release_id, exc)
        outcomes = []
        for release_id in await self.store.draws_due(now):
            try:
                outcome = await self.run(release_id)
            except DrawRaced as exc:
                # Not a failure: the next sweep counts the booking that raced it.
                log.warning("draw_raced", release=release_id, detail=str(exc))
                self.domain.metrics.draws_raced.inc()
                continue
            except Exception as exc:
                await self._failed("draw", release_id, exc)
                continue
            if outcome is not None:
                outcomes.append(outcome)
        # A draw that does not run says nothing when it is passed by (another session holds
        # its release or its procedure's lock: a worker drawing it, or a transaction left
        # open by hand), nor when it fails in a way that is not counted: count what is late.
        overdue = await self.store.draws_due(now - _OVERDUE)
        self.domain.metrics.draws_overdue.set(len(overdue))
        return outcomes

    async def _failed(self, step: str, release_id: str, exc: Exception) -> None:
        """One draw (or its freeze) that cannot run must not hold back the others: log it
        and count it, for the alert, and try again at the next sweep. But with PostgreSQL
        down (the ping raises), every next one would wait for its timeouts: the pass ends.
        A store error of this draw alone (a lock it waited for too long, a limit its size
        goes over) is a failing draw."""
        if isinstance(exc, NotCommitted):
            # Rolled back for certain (a deadlock with a confirm, a serialisation failure):
            # given way, as to a confirm that raced it, not failed.
            log.warning("draw_raced", release=release_id, detail=exc.detail)
            self.domain.metrics.draws_raced.inc()
            return
        event = f"{step}_failed"
        if isinstance(exc, StoreUnavailable):
            await self.store.ping()
            log.warning(event, release=release_id, detail=exc.detail, cause=repr(exc.__cause__))
        else:
            log.exception(event, exc=exc, release=release_id)
        self.domain.metrics.draw_failures.labels(step).inc()

    async def run(self, release_id: str) -> DrawOutcome | None:
        outcome = await self.store.run_draw(
            release_id,
            self._now(),
            lambda entry_id: token_hash(self._cancel_token(entry_id)),
            new_reference,
        )
        if outcome is None:
            return None
        m = self.domain.metrics
        m.draws.inc()
        m.places_allocated.inc(outcome.allocated)
        m.places_carried.inc(outcome.carried)
        log.info(
            "draw_run",
            release=release_id,
            entries=outcome.entries,
            places=outcome.places,
            allocated=outcome.allocated,
            carried=outcome.carried,
        )
        for touched in outcome.releases_touched:
            self.domain.forget(touched)
            # Redis learns the draw's bookings now: expected changes, not corrections.
            try:
                await self.domain.recovery.reconcile(touched, correction=False)
            except StoreUnavailable:
                # The draw has committed; Redis (down) learns it at the sweeper's reconcile,
                # and the next due draws must not wait for Redis.
                log.warning("draw_reconcile_deferred", release=touched)
        return outcome
