"""Races on capacity, through HTTP: N concurrent attempts against capacity K, exactly K win,
and PostgreSQL and Redis agree afterwards."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import hiredis
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from engine.app import create_app
from engine.appkeys import RESERVATIONS
from engine.errors import StoreUnavailable
from engine.inventory import Inventory, Reconciled, SlotCounts
from engine.multiplex import Multiplexed
from engine.recovery import Recovery
from tests.api import ADMIN, Api, Reply, applicant, as_applicant, ip
from tests.conftest import REDIS_URL, FakeClock, make_settings
from tests.procs import HOST, TcpProxy, with_port


async def pg_slot(pg: asyncpg.Connection, slot_id: str) -> tuple[int, int, int]:
    """(capacity, booked counter, confirmed bookings actually stored)."""
    row = await pg.fetchrow(
        """SELECT capacity, booked,
                  (SELECT count(*) FROM bookings b
                   WHERE b.slot_id = s.id AND b.status = 'confirmed') AS stored
           FROM slots s WHERE id = $1""",
        slot_id,
    )
    assert row is not None
    return row["capacity"], row["booked"], row["stored"]


async def waiting_for_a_lock(
    pg: asyncpg.Connection, task: asyncio.Task[Any], kind: str = "advisory"
) -> None:
    """Return once a session of this database waits for a lock of ``kind`` (``task``'s, as it
    has not ended: pg_locks is cluster-wide, and other suites may share the server). A wait
    for a row another transaction locked is one for that transaction's id."""
    waiting = """SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                 WHERE l.locktype = $1 AND NOT l.granted
                   AND a.datname = current_database()"""
    while await pg.fetchval(waiting, kind) == 0:
        assert not task.done()
        await asyncio.sleep(0.01)


async def identity_lock(
    pg: asyncpg.Connection, secret: bytes, person: dict[str, str]
) -> asyncpg.transaction.Transaction:
    """Take ``person``'s identity lock (book_hold's first), in a transaction left open, as a
    confirm of theirs elsewhere would: their booking then waits inside PostgreSQL, its hold
    confirming, until the transaction ends."""
    identity = as_applicant(person).identity_hash(secret)
    lock = pg.transaction()
    await lock.start()
    await pg.execute(
        "SELECT pg_advisory_xact_lock(('x' || substr(encode($1::bytea, 'hex'), 1, 15))"
        "::bit(60)::bigint)",
        identity,
    )
    return lock


async def test_200_concurrent_holds_on_capacity_5(api: Api, pg: asyncpg.Connection) -> None:
    await api.site()
    release = await api.publish([5])
    slot = release["slots"][0]["id"]
    paid = [await api.solved(release["id"], ip(i)) for i in range(200)]
    replies = await asyncio.gather(*(api.hold(slot, ip(i), paid=paid[i]) for i in range(200)))
    outcomes = Counter(r.status for r in replies)
    assert outcomes == {201: 5, 409: 195}
    assert {r.body["type"] for r in replies if r.status == 409} == {"/problems/slot-full"}
    assert await api.free(release["id"]) == {slot: 0}

    winners = [(i, r.body) for i, r in enumerate(replies) if r.status == 201]
    confirms = await asyncio.gather(*(api.confirm(h, applicant(), ip(i)) for i, h in winners))
    assert [c.status for c in confirms] == [201] * 5
    assert await pg_slot(pg, slot) == (5, 5, 5)
    assert await api.client.app[RESERVATIONS].recovery.reconcile(release["id"]) == 0


async def test_concurrent_confirms_cancels_and_holds(api: Api, pg: asyncpg.Connection) -> None:
    await api.site()
    release = await api.publish([3])
    slot = release["slots"][0]["id"]
    booked = [await api.book(slot, client_ip=ip(i)) for i in range(2)]
    held = (await api.hold(slot, ip(2))).body

    async def cancel(b: dict[str, str]) -> int:
        r = await api.call(
            "DELETE",
            f"/v1/bookings/{b['booking']['reference']}",  # type: ignore[index]
            headers={"Authorization": f"Bearer {b['cancel_token']}"},
        )
        return r.status

    async def hold_and_confirm(i: int) -> int:
        h = await api.hold(slot, ip(100 + i))
        if h.status != 201:
            return h.status
        return (await api.confirm(h.body, applicant(), ip(100 + i))).status

    paid_confirm = api.confirm(held, applicant(), ip(2))
    results = await asyncio.gather(
        cancel(booked[0]),
        cancel(booked[1]),
        paid_confirm,  # type: ignore[arg-type]
        *(hold_and_confirm(i) for i in range(30)),
    )
    assert results[0] == results[1] == 204
    assert results[2].status == 201  # type: ignore[attr-defined]
    capacity, counter, stored = await pg_slot(pg, slot)
    assert counter == stored <= capacity == 3
    domain = api.client.app[RESERVATIONS]
    assert await domain.recovery.reconcile(release["id"]) == 0
    counts = await domain.inventory.counts(release["id"], domain.now_ms())
    assert counts[slot].booked == stored
    assert counts[slot].booked + counts[slot].held <= 3


async def test_staff_and_online_race_for_the_last_places(api: Api, pg: asyncpg.Connection) -> None:
    await api.site()
    release = await api.publish([2])
    slot = release["slots"][0]["id"]

    async def staff(i: int) -> int:
        r = await api.call(
            "POST", "/v1/admin/bookings", {"slot_id": slot, "applicant": applicant()}, ADMIN
        )
        return r.status

    async def online(i: int) -> int:
        h = await api.hold(slot, ip(i))
        return (
            h.status if h.status != 201 else (await api.confirm(h.body, applicant(), ip(i))).status
        )

    results = await asyncio.gather(*(staff(i) for i in range(10)), *(online(i) for i in range(10)))
    assert Counter(results) == {201: 2, 409: 18}
    assert await pg_slot(pg, slot) == (2, 2, 2)


async def test_same_person_racing_two_slots_gets_one(api: Api, pg: asyncpg.Connection) -> None:
    await api.site()
    release = await api.publish([1] * 8)
    person = applicant()
    holds = [(await api.hold(s["id"], ip(i))).body for i, s in enumerate(release["slots"])]
    confirms = await asyncio.gather(*(api.confirm(h, person, ip(i)) for i, h in enumerate(holds)))
    assert Counter(c.status for c in confirms) == {201: 1, 409: 7}
    assert await pg.fetchval("SELECT count(*) FROM bookings WHERE status = 'confirmed'") == 1


async def test_a_refused_confirm_leaves_a_concurrent_one_confirming(
    api: Api, pg: asyncpg.Connection
) -> None:
    """Two confirms of one hold at once, with two people's details: PostgreSQL refuses the
    later one (its person already booked) while the earlier one is still booking. The
    refusal must not hand the hold back as merely held: its deadline could then reclaim the
    place while the earlier booking commits, and promise it to a third person."""
    await api.site()
    release = await api.publish([1, 1])
    first, second = (s["id"] for s in release["slots"])
    already = applicant()
    await api.book(first, already, ip(1))
    held = await api.hold(second, ip(2))
    assert held.status == 201
    domain = api.client.app[RESERVATIONS]
    person = applicant()
    lock = await identity_lock(pg, domain.settings.secret, person)
    earlier = asyncio.create_task(api.confirm(held.body, person, ip(2)))
    await waiting_for_a_lock(pg, earlier)
    later = await api.confirm(held.body, already, ip(2))
    assert (later.status, later.body["type"]) == (409, "/problems/identity-already-booked")
    record = await domain.inventory.hold_record(release["id"], held.body["hold_id"])
    assert record is not None and record.state == "confirming"
    await lock.commit()
    assert (await earlier).status == 201
    assert await pg_slot(pg, second) == (1, 1, 1)
    counts = await domain.inventory.counts(release["id"], domain.now_ms())
    assert (counts[second].booked, counts[second].held) == (1, 0)


async def test_a_confirm_retried_after_its_slot_started_books_nothing_new(
    api: Api, pg: asyncpg.Connection
) -> None:
    """A confirm whose PostgreSQL call timed out (503) leaves its hold confirming, for the
    sweeper to settle. Retried once the slot had started, it booked the appointment then,
    already begun. A hold ends at its slot's start: the retry gets what the first confirm
    booked, if anything, never a booking made after the start."""
    await api.site()
    release = await api.publish([1], starts_in_days=120 / 86400)
    slot = release["slots"][0]["id"]
    held = await api.hold(slot)
    assert held.status == 201, held.body
    person = applicant()
    app = create_app(make_settings(pg_timeout_s=0.3), clock=api.clock, sweep=False)
    async with TestClient(TestServer(app)) as client:
        impatient = Api(client, api.clock)
        lock = await identity_lock(pg, app[RESERVATIONS].settings.secret, person)
        try:
            first = await impatient.confirm(held.body, person)
        finally:
            await lock.rollback()
        assert first.status == 503, first.body
        api.clock.advance(121)  # the slot has started
        late = await impatient.confirm(held.body, person)
    assert (late.status, late.body.get("type")) == (410, "/problems/hold-expired"), late.body
    assert await pg_slot(pg, slot) == (1, 0, 0)


@pytest.mark.parametrize("spacing_s", [0, 0.003])
async def test_capacity_lowered_while_holds_arrive(
    api: Api, pg: asyncpg.Connection, spacing_s: float
) -> None:
    """Staff lower a slot's capacity from 40 to 10 while 40 holds arrive, all at once (the
    change is refused: more than 10 are held by then) or ``spacing_s`` apart (it lands early,
    and the later holds find the slot full). Either way every hold granted can be confirmed:
    a hold is a promise of a place, and the capacity never goes below what is held."""
    await api.site()
    release = await api.publish([40])
    slot = release["slots"][0]["id"]
    paid = [await api.solved(release["id"], ip(i)) for i in range(40)]
    path = f"/v1/admin/releases/{release['id']}"

    async def hold(i: int) -> Reply:
        await asyncio.sleep(i * spacing_s)
        return await api.hold(slot, ip(i), paid=paid[i])

    patch, *replies = await asyncio.gather(
        api.call("PATCH", path, {"slots": [{"id": slot, "capacity": 10}]}, ADMIN),
        *(hold(i) for i in range(40)),
    )
    granted = [(i, r.body) for i, r in enumerate(replies) if r.status == 201]
    assert {r.status for r in replies} <= {201, 409}
    confirms = await asyncio.gather(*(api.confirm(h, applicant(), ip(i)) for i, h in granted))
    assert [c.body.get("type") for c in confirms if c.status != 201] == []
    capacity, counter, stored = await pg_slot(pg, slot)
    assert counter == stored == len(granted) <= capacity
    if patch.status == 200:
        assert capacity == 10
    else:
        assert patch.status == 400 and capacity == 40, patch.body
    assert await api.client.app[RESERVATIONS].recovery.reconcile(release["id"]) == 0


@pytest.mark.parametrize(("before", "after"), [(5, 2), (2, 5)])
async def test_capacity_change_waits_for_a_snapshot_being_written(
    api: Api, before: int, after: int
) -> None:
    """The sweeper read capacities (5) and is writing them to Redis when staff lower the slot
    to 2: the change waits for that write, so the older capacity cannot land over the newer
    one and leave Redis offering places PostgreSQL no longer has. A raise (2 to 5) waits
    too: the fence moves only for a lowering, so the older capacity would land over the
    raise's own write, hiding the new places until the next reconcile, which would count
    them as a correction."""
    await api.site()
    release = await api.publish([before])
    slot = release["slots"][0]["id"]
    domain = api.client.app[RESERVATIONS]
    read, write = asyncio.Event(), asyncio.Event()

    async def late_write(fence: str, capacities: list[tuple[str, int]], _: object) -> Reconciled:
        read.set()
        await write.wait()
        return await domain.inventory.reconcile(release["id"], fence, capacities, [], [])

    sweeper = asyncio.create_task(domain.recovery.from_snapshot(release["id"], late_write))
    await read.wait()
    path = f"/v1/admin/releases/{release['id']}"
    patch = asyncio.create_task(
        api.call("PATCH", path, {"slots": [{"id": slot, "capacity": after}]}, ADMIN)
    )
    await asyncio.wait([patch], timeout=0.5)  # without the lock, the change lands meanwhile
    write.set()
    assert await sweeper == Reconciled(0, stale=False)
    assert (await patch).status == 200
    counts = await domain.inventory.counts(release["id"], domain.now_ms())
    assert counts[slot].capacity == after
    assert await domain.recovery.reconcile(release["id"]) == 0


async def test_a_snapshot_waits_for_a_capacity_change_in_progress(
    api: Api, pg: asyncpg.Connection
) -> None:
    """A capacity change holds the lock (here, this test's own transaction, as
    ``Store.patch_release`` does) when a reconcile comes to read: the reconcile waits, and
    reads the committed capacity, not the one from before its wait."""
    await api.site()
    release = await api.publish([5])
    slot = release["slots"][0]["id"]
    domain = api.client.app[RESERVATIONS]
    change = pg.transaction()
    await change.start()
    await pg.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('capacity:' || $1, 0))", release["id"]
    )
    await pg.execute("UPDATE slots SET capacity = 2 WHERE id = $1", slot)

    async def read(capacities: list[tuple[str, int]], _: object) -> list[tuple[str, int]]:
        return capacities

    reader = asyncio.create_task(domain.store.with_snapshot(release["id"], read))
    await waiting_for_a_lock(pg, reader)
    await change.commit()
    assert await reader == [(slot, 2)]


async def test_a_conditional_change_sees_a_withdrawal_in_flight(
    api: Api, pg: asyncpg.Connection
) -> None:
    """A withdrawing cancel is under way (here, this test's transaction, as ``Store.cancel``
    does it: the slot's row, then the capacity lock) when staff set that slot's capacity with
    the ETag they read before it. The change waits for the withdrawal, then is refused: it
    cannot put the withdrawn place back. A change of another slot does not wait for a
    withdrawal that has not yet taken the capacity lock, and comes before it."""
    await api.site()
    release = await api.publish([3, 3])
    slot, other = (s["id"] for s in release["slots"])
    path = f"/v1/admin/releases/{release['id']}"
    lock = "SELECT pg_advisory_xact_lock(hashtextextended('capacity:' || $1, 0))"

    def patch(slot_id: str, capacity: int, etag: str) -> asyncio.Task[Reply]:
        body = {"slots": [{"id": slot_id, "capacity": capacity}]}
        return asyncio.create_task(api.call("PATCH", path, body, {**ADMIN, "If-Match": etag}))

    etag = (await api.call("GET", path, headers=ADMIN)).headers["ETag"]
    withdrawal = pg.transaction()
    await withdrawal.start()
    await pg.execute("UPDATE slots SET capacity = capacity - 1 WHERE id = $1", slot)
    await pg.execute(lock, release["id"])
    change = patch(slot, 3, etag)
    await waiting_for_a_lock(pg, change, "transactionid")
    await withdrawal.commit()
    refused = await change
    assert (refused.status, refused.body["type"]) == (412, "/problems/precondition-failed")
    assert await pg.fetchval("SELECT capacity FROM slots WHERE id = $1", slot) == 2

    etag = (await api.call("GET", path, headers=ADMIN)).headers["ETag"]
    withdrawal = pg.transaction()
    await withdrawal.start()
    await pg.execute("UPDATE slots SET capacity = capacity - 1 WHERE id = $1", other)
    assert (await patch(slot, 4, etag)).status == 200
    await pg.execute(lock, release["id"])
    await withdrawal.commit()
    rows = await pg.fetch(
        "SELECT capacity FROM slots WHERE release_id = $1 ORDER BY id", release["id"]
    )
    assert [r["capacity"] for r in rows] == [4, 2]


async def test_a_change_under_way_holds_no_confirm_of_its_release_back(
    api: Api, pg: asyncpg.Connection
) -> None:
    """A capacity change waits for the capacity lock (here, this test's, as a withdrawal
    under way would hold it) with its release's row locked. A confirm of another slot of
    that release goes through meanwhile: its booking's foreign key takes a share of that
    row, which the change's lock must not refuse."""
    await api.site()
    release = await api.publish([3, 3])
    slot, other = (s["id"] for s in release["slots"])
    hold = await api.hold(other, ip(1))
    assert hold.status == 201
    path = f"/v1/admin/releases/{release['id']}"
    lock = pg.transaction()
    await lock.start()
    await pg.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('capacity:' || $1, 0))", release["id"]
    )
    change = asyncio.create_task(
        api.call("PATCH", path, {"slots": [{"id": slot, "capacity": 2}]}, ADMIN)
    )
    await waiting_for_a_lock(pg, change)
    # Bounded, so that a confirm held back fails the test instead of hanging it.
    confirmed = await asyncio.wait_for(api.confirm(hold.body, applicant(), ip(1)), 30)
    assert confirmed.status == 201, confirmed.body
    assert not change.done()
    await lock.commit()
    assert (await change).status == 200


@pytest.mark.parametrize(("before", "after"), [(5, 2), (2, 5)])
async def test_a_capacity_write_that_reaches_redis_late_sets_no_capacity(
    api: Api, redis: aioredis.Redis, before: int, after: int
) -> None:
    """docs/consistency.md, section 8. A reconcile read capacity 5 and sent it to Redis, then
    gave up on the call (its timeout) and so let go of the capacity lock; staff lowered the
    slot to 2; then the call reached Redis (a proxy, a stalled network). It must not set 5
    over 2: Redis would offer places PostgreSQL no longer has, and promise them in holds
    that fail at confirm. Nor 2 over a raise to 5: the new places would be hidden until the
    next reconcile, which would count them as a correction."""
    await api.site()
    release = await api.publish([before])
    slot = release["slots"][0]["id"]
    domain = api.client.app[RESERVATIONS]
    # Another worker, whose Redis connection runs through a proxy that keeps its reconcile.
    url = urlsplit(REDIS_URL)
    proxy = TcpProxy(url.hostname or HOST, url.port or 6379)
    await proxy.start()
    link = Multiplexed.from_url(with_port(REDIS_URL, proxy.port), 0.2)
    other = Inventory(redis, 0.2, 1, pipelining=link)
    recovery = Recovery(domain.settings, domain.store, other, domain.metrics, domain.clock)
    try:
        proxy.hold_back(b"reconcile_")  # its FCALL; the reads before it pass
        with pytest.raises(StoreUnavailable):
            await recovery.reconcile(release["id"])
        assert len(proxy.held) == 1
        path = f"/v1/admin/releases/{release['id']}"
        change = {"slots": [{"id": slot, "capacity": after}]}
        assert (await api.call("PATCH", path, change, ADMIN)).status == 200
        # Now the held call reaches Redis (the test's own connection, the same database).
        parser = hiredis.Reader()
        parser.feed(proxy.held[0])
        call = parser.gets()
        assert isinstance(call, list) and parser.gets() is False  # that call alone
        await redis.execute_command(*call)
    finally:
        await link.aclose()
        await proxy.stop()
    counts = await domain.inventory.counts(release["id"], domain.now_ms())
    assert counts[slot].capacity == after
    assert await domain.recovery.reconcile(release["id"]) == 0


async def test_a_reconcile_between_a_confirms_commit_and_its_report_corrects_nothing(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a rush a worker reports late: the sweeper's reconcile can come between a confirm's
    commit and its confirm_done. The booking is that confirm's to count, and its hold counts
    the place meanwhile: the reconcile leaves it, so the place is counted once, not twice,
    and no correction is counted (GuichetReconcileCorrections would fire at every rush)."""
    await api.site()
    release = await api.publish([2])
    slot = release["slots"][0]["id"]
    domain = api.client.app[RESERVATIONS]
    hold = (await api.hold(slot, ip(1))).body
    confirm_done = domain.inventory.confirm_done
    meanwhile: list[Any] = []

    async def late(*args: Any) -> Any:
        meanwhile.append(await domain.recovery.reconcile(release["id"]))
        meanwhile.append((await domain.inventory.counts(release["id"], domain.now_ms()))[slot])
        return await confirm_done(*args)

    monkeypatch.setattr(domain.inventory, "confirm_done", late)
    assert (await api.confirm(hold)).status == 201
    assert meanwhile == [0, SlotCounts(2, 0, 1)]  # no correction; the hold counts the place
    counts = await domain.inventory.counts(release["id"], domain.now_ms())
    assert counts[slot] == SlotCounts(2, 1, 0)
    assert await domain.recovery.reconcile(release["id"]) == 0


async def test_a_worker_whose_clock_runs_ahead_cannot_unspend_a_challenge(
    api: Api, clock: FakeClock
) -> None:
    """Each worker judges a challenge's expiry by its own clock, and trimmed the release's
    spent challenges by it. A worker two seconds ahead trimmed a spent challenge two
    seconds early, and a worker whose clock was right took it, unexpired and not spent,
    for a second hold. The spent set keeps each challenge a while past its expiry."""
    ahead = FakeClock()
    ahead.now = clock.now + 2
    app = create_app(make_settings(), clock=ahead, bucket_clock=ahead, sweep=False)
    async with TestClient(TestServer(app)) as client:
        other = Api(client, ahead)
        await api.site()
        release = await api.publish([1, 1, 1])
        slots = [s["id"] for s in release["slots"]]
        paid = await api.solved(release["id"], ip(1))
        first = (await api.hold(slots[0], ip(1), paid=paid)).body
        token = {"Authorization": f"Bearer {first['hold_token']}"}
        released = await api.call("DELETE", f"/v1/holds/{first['hold_id']}", headers=token)
        assert released.status == 204
        clock.advance(299)  # a second before the challenge expires, by this worker's clock
        ahead.advance(299)
        assert (await other.hold(slots[1], ip(2))).status == 201  # a hold trims the set
        again = await api.hold(slots[2], ip(1), paid=paid)
        assert again.body["type"] == "/problems/challenge-expired", again.body
