"""The Lua inventory against a pure-Python model of its rules (hypothesis stateful testing).

The machine drives the real Redis Functions through ``engine.inventory.Inventory`` on the test
Redis with random sequences of the steps ``engine.reservations`` takes (hold, confirm, abort,
release, cancel, capacity change, rebuild, reconcile, settle) and of the failures they must
survive: a process crash between two steps, and Redis losing everything (FLUSHDB). ``Model``
holds what Redis should contain (the keys listed in ``engine/lua/lib.lua``) and PostgreSQL's
truth (bookings by reference, capacity enforced like the ``slot_not_overbooked`` CHECK). No
PostgreSQL server is involved: the model is its stand-in.

Every answer of every function must be the model's. After every step the raw Redis keys must
equal the model's view of them, Redis must never show free a place PostgreSQL has booked, and
Redis must count no cancelled booking but the few the protocol knowingly leaves to the
reconcile. ``converge`` (reconcile, then settle every confirm) must leave Redis counting exactly
PostgreSQL's bookings.

The invariant reads the raw keys rather than calling ``Inventory.counts``, because ``counts``
reclaims expired holds: run after every step, it would reclaim whatever a tick expired before
any rule saw it, and the lazy reclaim in ``hold``, the expired branch of ``confirm_begin`` and
the "gone" answer of ``release_hold`` would never run. ``counts`` is called where the domain
calls it (a listing) and compared with the model's own reclaim, as is ``lower_capacities``
(a capacity change), which reclaims too.

Time is explicit (``now_ms``); nothing sleeps. The machine is synchronous: it owns an event loop
and a Redis client made on it, and closes both in ``teardown``. The test Redis database is
flushed at the start of every example, as every other test does.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from engine.inventory import HoldResult, Inventory, InventoryMissing, Reconciled, SlotCounts
from engine.keys import ReleaseKeys
from tests.conftest import REDIS_URL

T = TypeVar("T")

RELEASE = "rmodel0000001"
KEYS = ReleaseKeys.of(RELEASE)
UNKNOWN_SLOT = f"{RELEASE}.999"  # in no inventory: the "no-slot" answer
START_MS = 1_700_000_000_000
HOLD_TTL_MS = 3_000
CHALLENGE_TTL_MS = 6_000
MAX_LIVE_HOLDS = 2  # per client and release (hold.lua's "client-limit")
GRACE_MS = 2_000  # the sweeper's confirm grace, in model time
TICKS_MS = (500, 1_000, 3_000)  # multiples of 500: deadlines are hit exactly, too
CONFIRM_ENDINGS = (  # hypothesis leans to the first: the ending that leaves the most behind
    "crash-after-commit",  # begin, COMMIT, then the process dies (or Redis never answers)
    "done",  # begin, COMMIT, confirm_done
    "refused",  # begin, PostgreSQL refuses (identity already booked), confirm_abort
    "crash-before-commit",  # begin, then the process dies
    "redis-lost-before-done",  # begin, COMMIT, FLUSHDB, confirm_done finds no inventory
    "overtaken",  # begin, a second confirm begins, PostgreSQL refuses the first, abort, the
    # second commits, confirm_done
)


@dataclass
class ModelHold:
    slot: str
    state: str  # "h" held, "c" confirming (lib.lua's letters)
    deadline: int
    idem: str
    token: str
    client: str
    started: int = 0  # when its latest confirm began; meaningful in state "c"
    others: int = 0  # confirms of it under way besides one (lib.lua's ``confirms`` hash)

    def record(self) -> str:
        return f"{self.slot}|{self.state}|{self.deadline}|{self.idem}|{self.token}|{self.client}"


@dataclass
class PgBooking:
    slot: str
    hold_id: str
    active: bool = True


class Model:
    """The rules of engine/lua/*.lua, and PostgreSQL's truth, in plain Python.

    Redis's ``b`` and ``h`` counters are not stored: they must always equal the number of
    references in ``booked`` and of hold records per slot, and the invariant checks exactly
    that. Each method mirrors one Lua function and returns what ``Inventory`` returns for it.
    """

    def __init__(self, capacities: dict[str, int]) -> None:
        # PostgreSQL
        self.pg_caps = dict(capacities)
        self.pg: dict[str, PgBooking] = {}
        # Redis
        self.present = False
        self.caps: dict[str, int] = {}
        self.holds: dict[str, ModelHold] = {}
        self.idem: dict[str, str] = {}
        self.booked: dict[str, str] = {}
        self.spent: dict[str, int] = {}  # every challenge spent since the last wipe -> expiry
        # Cancelled bookings Redis may go on counting until a reconcile: their cancel_done never
        # ran. Any other cancelled one counted is a bug.
        self.stale_counts: set[str] = set()
        # The capacity fence: None once lost, else the value last set (here, made by the test).
        self.fence: str | None = None

    # PostgreSQL --------------------------------------------------------------------------

    def pg_active(self) -> dict[str, str]:
        return {ref: b.slot for ref, b in self.pg.items() if b.active}

    def pg_count(self, slot: str) -> int:
        return sum(1 for b in self.pg.values() if b.active and b.slot == slot)

    def pg_snapshot(self) -> tuple[list[tuple[str, int]], list[tuple[str, str, str]]]:
        """What ``Store.with_snapshot`` reads: capacities, and (reference, slot, hold)."""
        active = sorted((ref, b.slot, b.hold_id) for ref, b in self.pg.items() if b.active)
        return sorted(self.pg_caps.items()), active

    def pg_book(self, ref: str, slot: str, hold_id: str) -> bool:
        """Insert a confirmed booking; False where the CHECK ``booked <= capacity`` refuses."""
        if self.pg_count(slot) >= self.pg_caps[slot]:
            return False
        self.pg[ref] = PgBooking(slot, hold_id)
        return True

    def pg_booking_of_hold(self, hold_id: str) -> str | None:
        """The booking ``ON CONFLICT (hold_id)`` finds: ``hold_id`` is UNIQUE over all rows."""
        return next((ref for ref, b in self.pg.items() if b.hold_id == hold_id), None)

    def pg_settle_answer(self, hold_id: str) -> str | None:
        """PostgreSQL's answer to the sweeper: the hold's *confirmed* booking, if any.

        A cancelled booking answers None (drop the hold: its place is free), as
        ``Store.bookings_by_holds`` does.
        """
        return next((ref for ref, b in self.pg.items() if b.hold_id == hold_id and b.active), None)

    def pg_cancel(self, ref: str) -> bool:
        booking = self.pg[ref]
        if not booking.active:
            return False
        booking.active = False
        return True

    # Redis -------------------------------------------------------------------------------

    def booked_count(self, slot: str) -> int:
        return sum(1 for s in self.booked.values() if s == slot)

    def held_count(self, slot: str) -> int:
        return sum(1 for h in self.holds.values() if h.slot == slot)

    def wipe(self) -> None:
        self.present = False
        self.caps, self.holds, self.idem, self.booked, self.spent = {}, {}, {}, {}, {}
        self.stale_counts = set()
        self.fence = None

    def rebuild(
        self, fence: str, caps: list[tuple[str, int]], bookings: list[tuple[str, str, str]]
    ) -> str:
        """From a snapshot (the model's PostgreSQL may have moved on since)."""
        if self.present:
            return "present"
        if fence != self.fence:
            return "stale"
        self.present = True
        self.caps = dict(caps)
        self.holds, self.idem = {}, {}
        self.booked = {ref: slot for ref, slot, _ in bookings}
        # A snapshot older than a cancel (a late rebuild) counts that booking: one place fewer
        # offered until the reconcile, as a cancel_done that never ran.
        self.stale_counts = {ref for ref, _, _ in bookings if not self.pg[ref].active}
        return "rebuilt"

    def _drop(self, hold_id: str) -> ModelHold:
        h = self.holds.pop(hold_id)
        if h.idem:
            self.idem.pop(h.idem, None)
        return h

    def _reclaim(self, now: int) -> None:
        expired = sorted(
            (h.deadline, hold_id)
            for hold_id, h in self.holds.items()
            if h.state == "h" and h.deadline <= now
        )
        for _, hold_id in expired:
            self._drop(hold_id)

    def hold(
        self,
        now: int,
        slot: str,
        hold_id: str,
        token: str,
        deadline: int,
        idem: str,
        challenge: str,
        challenge_expiry: int,
        client: str,
    ) -> HoldResult:
        self._reclaim(now)
        if idem and idem in self.idem:
            previous = self.idem[idem]
            if previous in self.holds:
                h = self.holds[previous]
                if challenge_expiry > now:  # the challenge it brings is spent with it
                    self.spent[challenge] = challenge_expiry
                return HoldResult("replayed", previous, h.deadline, h.token)
            del self.idem[idem]
        if challenge_expiry <= now or challenge in self.spent:
            return HoldResult("spent")
        if slot not in self.caps:
            return HoldResult("no-slot")
        if sum(1 for h in self.holds.values() if h.client == client) >= MAX_LIVE_HOLDS:
            return HoldResult("client-limit")
        # The capacity decision spends the challenge, whatever its answer.
        self.spent[challenge] = challenge_expiry
        if self.booked_count(slot) + self.held_count(slot) >= self.caps[slot]:
            return HoldResult("full")
        self.holds[hold_id] = ModelHold(slot, "h", deadline, idem, token, client)
        if idem:
            self.idem[idem] = hold_id
        return HoldResult("granted", hold_id, deadline, token)

    def read_fence(self, new: str) -> str:
        """``Inventory.fence``: a lost fence is set to ``new``."""
        if self.fence is None:
            self.fence = new
        return self.fence

    def lower_capacity(
        self, slot: str, capacity: int, pg_booked: int, now: int, fence: str
    ) -> dict[str, int]:
        assert self.present
        self._reclaim(now)
        floor = max(self.booked_count(slot), pg_booked) + self.held_count(slot)
        if capacity < floor:
            return {slot: floor}
        self.caps[slot] = min(self.caps[slot], capacity)
        self.fence = fence
        return {}

    def counts(self, now: int) -> dict[str, SlotCounts]:
        self._reclaim(now)
        return {
            slot: SlotCounts(cap, self.booked_count(slot), self.held_count(slot))
            for slot, cap in self.caps.items()
        }

    def confirm_begin(self, hold_id: str, now: int) -> str | None:
        h = self.holds.get(hold_id)
        if h is None:
            return None
        if h.state == "h":
            if h.deadline <= now:
                self._drop(hold_id)
                return None
            h.state = "c"
        else:
            h.others += 1
        h.started = now  # a retried confirm restarts the grace period
        return h.slot

    def confirm_done(self, hold_id: str, slot: str, ref: str) -> bool:
        if not self.present:
            return False
        if hold_id in self.holds:
            self._drop(hold_id)
        self.booked[ref] = slot
        return True

    def confirm_abort(self, hold_id: str) -> str:
        h = self.holds.get(hold_id)
        if h is None:
            return "gone"
        if h.others:  # another confirm still under way keeps it confirming
            h.others -= 1
            return "confirming"
        h.state, h.started = "h", 0
        return "held"

    def release_hold(self, hold_id: str, now: int) -> str:
        h = self.holds.get(hold_id)
        if h is None:
            return "gone"
        if h.state == "c":
            return "confirming"
        self._drop(hold_id)
        return "gone" if h.deadline <= now else "released"

    def stale_confirms(self, cutoff: int) -> list[str]:
        return sorted(
            hold_id for hold_id, h in self.holds.items() if h.state == "c" and h.started <= cutoff
        )

    def settle_confirm(self, hold_id: str, ref: str | None, cutoff: int) -> str:
        h = self.holds.get(hold_id)
        if h is None or h.state != "c" or h.started > cutoff:
            return "skipped"
        self._drop(hold_id)
        if ref is None:
            return "dropped"
        self.booked[ref] = h.slot
        return "booked"

    def cancel_done(self, ref: str) -> None:
        self.booked.pop(ref, None)
        self.stale_counts.discard(ref)

    def withdraw(self, slot: str, fence: str) -> str:
        self.fence = fence
        if not self.present:
            return "rebuild"
        self.caps[slot] -= 1
        return "withdrawn"

    def reconcile(
        self,
        fence: str,
        caps: list[tuple[str, int]],
        add: list[tuple[str, str, str]],
        remove: list[str],
    ) -> Reconciled:
        """Corrections as reconcile.lua counts them. ``h`` never needs one here: a drifted
        Redis counter shows up as a correction the model did not expect. A booking whose
        hold is still confirming is that confirm's to count: no correction."""
        corrections = 0
        stale = fence != self.fence
        for slot, cap in caps:
            if not stale and self.caps.get(slot) != cap:
                self.caps[slot] = cap
                corrections += 1
        for ref, slot, hold_id in add:
            hold = self.holds.get(hold_id)
            if hold is not None and hold.state == "c":
                continue
            if ref not in self.booked:
                corrections += 1
            self.booked[ref] = slot
        for ref in remove:
            if self.booked.pop(ref, None) is not None:
                corrections += 1
            self.stale_counts.discard(ref)
        return Reconciled(corrections, stale)

    def inv_hash(self) -> dict[str, str]:
        if not self.present:
            return {}
        fields = {"ready": "1"}
        for slot, cap in self.caps.items():
            fields[f"c:{slot}"] = str(cap)
            fields[f"b:{slot}"] = str(self.booked_count(slot))
            fields[f"h:{slot}"] = str(self.held_count(slot))
        return fields

    def clients_hash(self) -> dict[str, str]:
        """Live holds per client, as the release's ``clients`` hash keeps them."""
        counts = Counter(h.client for h in self.holds.values())
        return {client: str(n) for client, n in counts.items()}


@dataclass(frozen=True)
class RawRedis:
    inv: dict[str, str]
    booked: dict[str, str]
    hold: dict[str, str]
    holds: dict[str, int]
    confirming: dict[str, int]
    confirms: dict[str, str]
    idem: dict[str, str]
    spent: dict[str, int]
    clients: dict[str, str]
    fence: str | None


def newest_first(ids: Iterable[str]) -> list[str]:
    """Ids are numbered in order of creation; hypothesis favours the first of a list."""
    return sorted(ids, reverse=True)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _hash(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _zset(raw: list[tuple[Any, float]]) -> dict[str, int]:
    return {_text(member): int(score) for member, score in raw}


class InventoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis: aioredis.Redis = self.run(self._connect())
        self.inventory = Inventory(self.redis, timeout_s=5.0, retry_after_s=1)
        self.run(self.redis.flushdb())
        self.now = START_MS
        self.serial = 0
        self.slots: list[str] = []
        self.model = Model({})
        self.challenges: dict[str, int] = {}  # every challenge issued -> its expiry
        self.hold_ids: list[str] = []  # every hold ever granted, most long gone
        # A snapshot and the fence read with it, whose write reaches Redis later.
        self.in_flight: tuple[str, list[tuple[str, int]], list[tuple[str, str]]] | None = None

    @staticmethod
    async def _connect() -> aioredis.Redis:
        return aioredis.Redis.from_url(REDIS_URL)

    def teardown(self) -> None:
        try:
            self.run(self.redis.aclose())
        finally:
            self.loop.close()

    def run(self, aw: Awaitable[T]) -> T:
        return self.loop.run_until_complete(aw)

    def fresh(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial:04d}"

    # Domain steps shared by several rules -------------------------------------------------

    def fresh_challenge(self) -> str:
        challenge = self.fresh("c")
        self.challenges[challenge] = self.now + CHALLENGE_TTL_MS
        return challenge

    def take_hold(self, slot: str, idem: str, challenge: str, client: str = "c1") -> HoldResult:
        """``Reservations.hold`` once the proof of work is verified."""
        expiry = self.challenges[challenge]
        hold_id, token = self.fresh(f"{RELEASE}.h"), self.fresh("t")
        now, deadline = self.now, self.now + HOLD_TTL_MS
        result = self.with_inventory(
            lambda: self.inventory.hold(
                RELEASE,
                slot,
                now_ms=now,
                hold_id=hold_id,
                token_hash=token,
                deadline_ms=deadline,
                idem_field=idem,
                challenge_id=challenge,
                challenge_expiry_ms=expiry,
                client_tag=client,
                max_live_holds=MAX_LIVE_HOLDS,
            )
        )
        assert result == self.model.hold(
            now, slot, hold_id, token, deadline, idem, challenge, expiry, client
        )
        event(f"hold: {result.outcome}")
        if result.outcome == "granted":
            self.hold_ids.append(hold_id)
        return result

    def confirm_hold(self, hold_id: str, ending: str) -> None:
        """``Reservations.confirm``, cut short as ``ending`` says (see CONFIRM_ENDINGS)."""
        slot = self.run(self.inventory.confirm_begin(RELEASE, hold_id, self.now))
        assert slot == self.model.confirm_begin(hold_id, self.now)
        event(f"confirm: {ending if slot else 'gone'}")
        if slot is None or ending == "crash-before-commit":
            return
        # The booking transaction. A retry finds the hold's first booking (whatever its
        # status) through ON CONFLICT (hold_id); otherwise the CHECK or the identity index may
        # refuse, and the domain aborts the confirm.
        ref = self.model.pg_booking_of_hold(hold_id)
        if ref is None and ending == "overtaken":
            # A second submission of the hold begins before PostgreSQL refuses this one: the
            # abort must leave the hold to it. It then books, as a "done" confirm.
            again = self.run(self.inventory.confirm_begin(RELEASE, hold_id, self.now))
            assert again == self.model.confirm_begin(hold_id, self.now) == slot
            self.abort(hold_id)
            ending = "done"
        if ref is None:
            ref = self.fresh("B")
            if ending == "refused" or not self.model.pg_book(ref, slot, hold_id):
                event(f"confirm: PostgreSQL refused ({ending})")
                self.abort(hold_id)
                return
        if ending == "crash-after-commit":
            return
        if ending == "redis-lost-before-done":
            self.flush_redis()
        if not self.model.pg[ref].active:
            # A retry after the booking was cancelled: ON CONFLICT returned the cancelled row;
            # the domain settles the hold as not booked instead of counting the booking.
            outcome = self.run(self.inventory.settle_confirm(RELEASE, hold_id, None, self.now))
            assert outcome == self.model.settle_confirm(hold_id, None, self.now)
            return
        counted = self.run(self.inventory.confirm_done(RELEASE, hold_id, slot, ref))
        assert counted == self.model.confirm_done(hold_id, slot, ref)

    def abort(self, hold_id: str) -> None:
        outcome = self.run(self.inventory.confirm_abort(RELEASE, hold_id))
        assert outcome == self.model.confirm_abort(hold_id)

    def flush_redis(self) -> None:
        self.run(self.redis.flushdb())
        self.model.wipe()
        # A write in flight stays in flight: it must find the fence gone, or new, and set
        # nothing (a rebuild from its older snapshot would miss bookings made since).

    def read_fence(self) -> str:
        new = self.fresh("f")
        fence = self.run(self.inventory.fence(RELEASE, new))
        assert fence == self.model.read_fence(new)
        return fence

    def rebuild_from_pg(self) -> None:
        capacities, bookings = self.model.pg_snapshot()
        fence = self.read_fence()
        built = self.run(self.inventory.rebuild(RELEASE, fence, capacities, bookings))
        assert built == self.model.rebuild(fence, capacities, bookings) != "stale"

    def with_inventory(self, op: Callable[[], Awaitable[T]]) -> T:
        """``Recovery.with_inventory``: on a missing inventory, rebuild it and retry."""
        try:
            result = self.run(op())
        except InventoryMissing:
            assert not self.model.present, "Redis lost an inventory the model still has"
            self.rebuild_from_pg()
            return self.run(op())
        assert self.model.present, "Redis answered from an inventory the model lost"
        return result

    def reconcile_like_domain(self) -> None:
        """``Reservations.reconcile``: Redis's counted references first, then PostgreSQL."""
        counted = self.run(self.inventory.booked_refs(RELEASE))
        capacities, active = self.model.pg_snapshot()
        fence = self.read_fence()
        add = [(ref, slot, hold) for ref, slot, hold in active if ref not in counted]
        remove = sorted(counted - {ref for ref, _, _ in active})
        try:
            done = self.run(self.inventory.reconcile(RELEASE, fence, capacities, add, remove))
        except InventoryMissing:
            assert not self.model.present, "Redis lost an inventory the model still has"
            self.rebuild_from_pg()
            return
        assert self.model.present, "Redis reconciled an inventory the model lost"
        assert done == self.model.reconcile(fence, capacities, add, remove)
        assert not done.stale  # the fence read with the snapshot: nothing moved it since
        event(f"reconcile: {'corrected' if done.corrections else 'nothing to correct'}")

    def settle_stale(self, cutoff: int) -> None:
        """``Recovery.settle_stale_confirms`` with the given cutoff."""
        stale = self.run(self.inventory.stale_confirms(RELEASE, cutoff))
        assert sorted(stale) == self.model.stale_confirms(cutoff)
        for hold_id in stale:
            ref = self.model.pg_settle_answer(hold_id)
            outcome = self.run(self.inventory.settle_confirm(RELEASE, hold_id, ref, cutoff))
            assert outcome == self.model.settle_confirm(hold_id, ref, cutoff)
            event(f"settle: {outcome}")

    async def read_raw(self) -> RawRedis:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(KEYS.inv)
            pipe.hgetall(KEYS.booked)
            pipe.hgetall(KEYS.hold)
            pipe.zrange(KEYS.holds, 0, -1, withscores=True)
            pipe.zrange(KEYS.confirming, 0, -1, withscores=True)
            pipe.hgetall(KEYS.confirms)
            pipe.hgetall(KEYS.idem)
            pipe.zrange(KEYS.spent, 0, -1, withscores=True)
            pipe.hgetall(KEYS.clients)
            pipe.get(KEYS.fence)
            replies = await pipe.execute()
        inv, booked, hold, holds, confirming, confirms, idem, spent, clients, fence = replies
        return RawRedis(
            _hash(inv),
            _hash(booked),
            _hash(hold),
            _zset(holds),
            _zset(confirming),
            _hash(confirms),
            _hash(idem),
            _zset(spent),
            _hash(clients),
            None if fence is None else _text(fence),
        )

    # Rules --------------------------------------------------------------------------------

    @initialize(capacities=st.lists(st.integers(0, 3), min_size=2, max_size=3))
    def publish(self, capacities: list[int]) -> None:
        self.slots = [f"{RELEASE}.{i:03d}" for i in range(len(capacities))]
        self.model = Model(dict(zip(self.slots, capacities, strict=True)))
        self.rebuild_from_pg()

    @rule(data=st.data())
    def hold(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from([*self.slots, *self.slots, UNKNOWN_SLOT]), "slot")
        key = data.draw(st.sampled_from(["", "k1"]), "idempotency key")
        # As in Reservations.hold: the idempotency field is per (client, key, slot).
        idem = f"{key}@{slot}" if key else ""
        # pow.verify refuses an expired challenge before Redis is asked: reuse only live ones.
        live = sorted(c for c, expiry in self.challenges.items() if expiry > self.now)
        if live and data.draw(st.booleans(), "reuse a challenge"):
            challenge = data.draw(st.sampled_from(live), "challenge")
        else:
            challenge = self.fresh_challenge()
        client = data.draw(st.sampled_from(["c1", "c2"]), "client")
        self.take_hold(slot, idem, challenge, client)

    @rule()
    def applicant_next_step(self) -> None:
        """The common path, one step at a time: read the listing and hold the first slot it
        shows free while fewer than two holds are held, else confirm the oldest.

        Hypothesis sorts rules by their number of arguments, then by name, and picks the first
        far more often than the others: this one (keep it first). So holds and bookings keep
        coming, and a couple of holds stay live for the other rules to work on."""
        held = sorted(
            (h.deadline, hold_id)
            for hold_id, h in self.model.holds.items()
            if h.state == "h" and h.deadline > self.now
        )
        if len(held) < 2:
            counts = self.with_inventory(lambda: self.inventory.counts(RELEASE, self.now))
            assert counts == self.model.counts(self.now)
            free = [slot for slot in self.slots if counts[slot].free]
            if free:
                person = self.fresh("p")  # each applicant is a client of their own
                result = self.take_hold(free[0], "", self.fresh_challenge(), person)
                assert result.outcome == "granted"
                return
        if held:
            self.confirm_hold(held[0][1], "done")

    @precondition(lambda self: self.model.holds)
    @rule(data=st.data(), ending=st.sampled_from(CONFIRM_ENDINGS))
    def confirm(self, data: st.DataObject, ending: str) -> None:
        """A confirm of a hold Redis has a record of, possibly expired, or a retry of one left
        confirming (those come first: a retry after a crash is where counting twice would
        hide). For a hold without a record the domain asks PostgreSQL only."""
        holds = self.model.holds
        retries = newest_first(i for i, h in holds.items() if h.state == "c")
        firsts = newest_first(i for i, h in holds.items() if h.state == "h")
        hold_id = data.draw(st.sampled_from(retries + firsts), "hold")
        self.confirm_hold(hold_id, ending)

    @precondition(lambda self: self.hold_ids)
    @rule(data=st.data())
    def release_hold(self, data: st.DataObject) -> None:
        hold_id = data.draw(st.sampled_from(newest_first(self.hold_ids)), "hold")
        outcome = self.run(self.inventory.release_hold(RELEASE, hold_id, self.now))
        assert outcome == self.model.release_hold(hold_id, self.now)
        event(f"release_hold: {outcome}")

    @precondition(lambda self: self.model.pg)
    @rule(data=st.data(), crash=st.booleans())
    def cancel(self, data: st.DataObject, crash: bool) -> None:
        ref = data.draw(st.sampled_from(newest_first(self.model.pg)), "booking")
        if not self.model.pg_cancel(ref):
            return  # cancelled already: the domain stops before Redis
        if crash:
            if ref in self.model.booked:
                self.model.stale_counts.add(ref)
            return  # PostgreSQL committed; cancel_done never ran
        self.run(self.inventory.cancel_done(RELEASE, ref))
        self.model.cancel_done(ref)

    @precondition(lambda self: any(b.active for b in self.model.pg.values()))
    @rule(
        data=st.data(),
        crash=st.sampled_from(["none", "before commit", "after commit"]),
        late=st.booleans(),
    )
    def withdraw(self, data: st.DataObject, crash: str, late: bool) -> None:
        """``Reservations.staff_cancel`` with the place withdrawn: Redis lowers the slot's
        capacity by one, PostgreSQL cancels the booking and lowers its capacity, then
        ``cancel_done``. ``late``: a write of capacities read before reaches Redis just
        after Redis's step, and must set none."""
        active = sorted(ref for ref, b in self.model.pg.items() if b.active)
        ref = data.draw(st.sampled_from(active), "booking")
        slot = self.model.pg[ref].slot
        if late:
            self.snapshot_read()
        fence = self.fresh("f")
        outcome = self.run(self.inventory.withdraw(RELEASE, slot, fence))
        assert outcome == self.model.withdraw(slot, fence)
        event(f"withdraw: {outcome}, crash {crash}")
        if late:
            self.land(rebuild=data.draw(st.booleans(), "rebuild"))
        if crash == "before commit":
            return  # Redis offers one place fewer than PostgreSQL has, until a reconcile
        self.model.pg_cancel(ref)
        self.model.pg_caps[slot] -= 1
        if crash == "after commit":
            if ref in self.model.booked:
                self.model.stale_counts.add(ref)
            return  # cancel_done never ran
        self.run(self.inventory.cancel_done(RELEASE, ref))
        self.model.cancel_done(ref)

    @rule(
        data=st.data(),
        capacity=st.integers(0, 3),
        crash=st.sampled_from(["none", "before commit", "after commit"]),
        late=st.booleans(),
    )
    def patch_capacity(self, data: st.DataObject, capacity: int, crash: str, late: bool) -> None:
        """``Reservations.patch_release``: a lower capacity is taken by Redis, with its holds
        counted, before PostgreSQL commits; a higher one after. ``late``: a write of
        capacities read before the change reaches Redis just after Redis took it (the rules
        ``snapshot_read`` and ``late_write`` make it any other step apart)."""
        if late:
            self.snapshot_read()
        slot = data.draw(st.sampled_from(self.slots), "slot")
        pg_booked = self.model.pg_count(slot)
        if capacity < pg_booked:
            return  # PostgreSQL refuses before asking Redis
        if capacity < self.model.pg_caps[slot]:
            change = [(slot, capacity, pg_booked)]
            fence = self.fresh("f")
            try:
                refused = self.run(
                    self.inventory.lower_capacities(RELEASE, self.now, change, fence)
                )
            except InventoryMissing:
                assert not self.model.present, "Redis lost an inventory the model still has"
                self.model.fence = fence
                refused = {}
            else:
                assert refused == self.model.lower_capacity(
                    slot, capacity, pg_booked, self.now, fence
                )
            event(f"lower capacity: {'refused' if refused else 'lowered'}")
            if late:
                self.land(rebuild=data.draw(st.booleans(), "rebuild"))
            if refused:
                return  # ValidationFailed: nothing commits
        if crash == "before commit":
            return  # Redis may keep a lower capacity than PostgreSQL: fewer holds, never more
        self.model.pg_caps[slot] = capacity
        if crash == "after commit":
            return
        capacities, _ = self.model.pg_snapshot()
        fence = self.read_fence()
        try:
            done = self.run(self.inventory.reconcile(RELEASE, fence, capacities, [], []))
        except InventoryMissing:
            assert not self.model.present, "Redis lost an inventory the model still has"
            return  # the rebuild reads the capacities from PostgreSQL
        assert done == self.model.reconcile(fence, capacities, [], [])

    @rule(ms=st.sampled_from(TICKS_MS))
    def tick(self, ms: int) -> None:
        self.now += ms

    @rule()
    def wipe(self) -> None:
        """Redis loses everything (restart without persistence, failover to an empty replica)."""
        self.flush_redis()

    @rule()
    def reconcile(self) -> None:
        self.reconcile_like_domain()

    @rule()
    def snapshot_read(self) -> None:
        """A write of capacities reads its snapshot and fence (``Recovery.from_snapshot``),
        and its Redis call is given up on: it reaches Redis later (``late_write``), after
        whatever rules run in between, a capacity change among them."""
        capacities, bookings = self.model.pg_snapshot()
        self.in_flight = (self.read_fence(), capacities, bookings)

    @precondition(lambda self: self.in_flight is not None)
    @rule(rebuild=st.booleans())
    def late_write(self, rebuild: bool) -> None:
        self.land(rebuild)

    def land(self, rebuild: bool) -> None:
        """The write in flight reaches Redis: a rebuild or a reconcile's capacities. If a
        capacity was lowered since its snapshot, it must set none (the invariant's "Redis
        never offers more places than PostgreSQL has" fails otherwise)."""
        assert self.in_flight is not None
        fence, capacities, bookings = self.in_flight
        self.in_flight = None
        if rebuild:
            built = self.run(self.inventory.rebuild(RELEASE, fence, capacities, bookings))
            assert built == self.model.rebuild(fence, capacities, bookings)
            event(f"late rebuild: {built}")
            return
        try:
            done = self.run(self.inventory.reconcile(RELEASE, fence, capacities, [], []))
        except InventoryMissing:
            assert not self.model.present, "Redis lost an inventory the model still has"
            return
        assert done == self.model.reconcile(fence, capacities, [], [])
        event(f"late reconcile: {'stale' if done.stale else 'applied'}")

    @rule(grace=st.sampled_from([GRACE_MS, 0]))
    def settle(self, grace: int) -> None:
        self.settle_stale(self.now - grace)

    @precondition(lambda self: self.hold_ids)
    @rule(data=st.data(), grace=st.sampled_from([GRACE_MS, 0]))
    def settle_raced(self, data: st.DataObject, grace: int) -> None:
        """The sweeper listed a hold as stale, then its confirm finished or restarted."""
        hold_id = data.draw(st.sampled_from(newest_first(self.hold_ids)), "hold")
        cutoff = self.now - grace
        ref = self.model.pg_settle_answer(hold_id)
        outcome = self.run(self.inventory.settle_confirm(RELEASE, hold_id, ref, cutoff))
        assert outcome == self.model.settle_confirm(hold_id, ref, cutoff)
        event(f"settle raced: {outcome}")

    @rule()
    def converge(self) -> None:
        """A reconcile, then every confirm settled: Redis counts exactly PostgreSQL's bookings.
        The rebuild first is a no-op unless Redis lost the inventory (then it is the sweeper's)."""
        self.rebuild_from_pg()
        self.reconcile_like_domain()
        self.settle_stale(self.now)  # every confirm began at or before now
        raw = self.run(self.read_raw())
        assert raw.booked == self.model.pg_active()
        assert not raw.confirming
        for slot in self.slots:
            assert int(raw.inv[f"c:{slot}"]) == self.model.pg_caps[slot]
            assert int(raw.inv[f"b:{slot}"]) == self.model.pg_count(slot)

    # Invariants ---------------------------------------------------------------------------

    @invariant()
    def redis_agrees(self) -> None:
        """One raw read per step (steps are cheap, so reads dominate), then both checks."""
        raw = self.run(self.read_raw())
        self.check_redis_is_the_model(raw)
        self.check_against_postgres(raw)

    def check_redis_is_the_model(self, raw: RawRedis) -> None:
        model = self.model
        assert raw.inv == model.inv_hash()
        assert raw.clients == model.clients_hash()
        assert raw.fence == model.fence
        assert raw.booked == model.booked
        assert raw.hold == {hold_id: h.record() for hold_id, h in model.holds.items()}
        assert raw.holds == {i: h.deadline for i, h in model.holds.items() if h.state == "h"}
        assert raw.confirming == {i: h.started for i, h in model.holds.items() if h.state == "c"}
        assert raw.confirms == {i: str(h.others) for i, h in model.holds.items() if h.others}
        assert raw.idem == model.idem
        # Spent challenges may be pruned once expired, never before.
        assert raw.spent.items() <= model.spent.items()
        live = {c: e for c, e in model.spent.items() if e > self.now}
        assert live.items() <= raw.spent.items()

    def check_against_postgres(self, raw: RawRedis) -> None:
        """What Redis really holds, against PostgreSQL's truth."""
        active = self.model.pg_active()
        for slot in self.slots:
            assert self.model.pg_count(slot) <= self.model.pg_caps[slot]
        if not raw.inv:
            return  # missing: nothing is answered from Redis until it is rebuilt
        # Safety: Redis never shows free a place PostgreSQL has booked...
        for slot in self.slots:
            taken = int(raw.inv[f"b:{slot}"]) + int(raw.inv[f"h:{slot}"])
            assert taken >= self.model.pg_count(slot), f"{slot} shows a booked place free"
        # ... booking by booking: each is counted, or still held by the confirm that made it.
        for ref, booking in self.model.pg.items():
            if booking.active:
                assert ref in raw.booked or booking.hold_id in raw.confirming, f"{ref} uncounted"
        # And Redis counts no cancelled booking but the known stale ones.
        assert raw.booked.keys() - active.keys() <= self.model.stale_counts
        # Liveness of a hold: Redis never offers more places than PostgreSQL has, so every
        # live hold can still be confirmed (a lower capacity reaches Redis first). Expired
        # holds not yet reclaimed count as pending: stricter than needed, and it holds.
        confirmed_holds = {b.hold_id for b in self.model.pg.values()}
        for slot in self.slots:
            assert int(raw.inv[f"c:{slot}"]) <= self.model.pg_caps[slot]
            pending = sum(
                1
                for hold_id, rec in raw.hold.items()
                if rec.split("|")[0] == slot and hold_id not in confirmed_holds
            )
            assert self.model.pg_count(slot) + pending <= self.model.pg_caps[slot], (
                f"{slot}: a live hold could not be confirmed"
            )


InventoryMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    # The explain phase re-runs failing cases under a line tracer: 10x slower here, enough to
    # turn a one-step counterexample into a 120 s timeout. Shrinking alone takes seconds.
    phases=[phase for phase in Phase if phase is not Phase.explain],
    report_multiple_bugs=False,  # shrink one counterexample, not one per distinct failure
    suppress_health_check=[HealthCheck.too_slow],
)
TestInventoryModel = InventoryMachine.TestCase
