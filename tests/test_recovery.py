"""Crash windows and lost Redis state converge toward PostgreSQL, and never overbook."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from redis.exceptions import ResponseError

from engine import app as app_module
from engine import sweeper
from engine.app import create_app
from engine.appkeys import LOTTERY, METRICS, RESERVATIONS
from engine.errors import StoreUnavailable
from engine.inventory import Inventory
from engine.keys import SWEEPER_LOCK, ReleaseKeys
from engine.reservations import Reservations
from engine.settings import Settings
from engine.sweeper import sweep_once
from engine.tokens import new_reference, token_hash
from tests.api import Api, applicant, as_applicant, ip
from tests.conftest import FakeClock, make_settings
from tests.procs import poll


def domain_of(api: Api) -> Reservations:
    return api.client.app[RESERVATIONS]


async def test_redis_flushed_while_bookings_exist(
    api: Api, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    await api.site()
    release = await api.publish([3])
    slot = release["slots"][0]["id"]
    await api.book(slot, client_ip=ip(1))
    await api.book(slot, client_ip=ip(2))
    await pg.execute(  # built a minute ago, not just now (below)
        "UPDATE releases SET inventory_built_at = inventory_built_at - interval '1 minute'"
        " WHERE id = $1",
        release["id"],
    )
    await redis.flushdb()
    assert await api.free(release["id"]) == {slot: 1}
    assert (await api.hold(slot, ip(3))).status == 201
    assert (await api.hold(slot, ip(4))).status == 409
    assert domain_of(api).metrics.rebuilds._value.get() == 1


async def test_a_just_published_inventory_built_by_another_is_no_rebuild(
    api: Api, redis: aioredis.Redis, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between PostgreSQL's commit of a new release and its inventory's write to Redis, a
    poller (bots poll hard) or the sweeper finds it and builds the inventory: not lost
    data, which GuichetInventoryRebuilt is about. Nor when the publish put it off, however
    long before (an audit: published while Redis was away over 30 s, its first build was
    counted and alerted as a loss)."""
    await api.site()
    domain = domain_of(api)
    real = Inventory.rebuild

    async def redis_down(*args: Any, **kwargs: Any) -> str:
        raise StoreUnavailable(1, "Redis did not answer")

    monkeypatch.setattr(Inventory, "rebuild", redis_down)
    release = await api.publish([2])  # its build put off
    monkeypatch.setattr(Inventory, "rebuild", real)
    await pg.execute(  # published a minute ago, by PostgreSQL's clock, never built
        "UPDATE releases SET created_at = created_at - interval '1 minute' WHERE id = $1",
        release["id"],
    )
    slot = release["slots"][0]["id"]
    assert await api.free(release["id"]) == {slot: 2}  # built here, for the first time
    assert (await api.hold(slot, ip(1))).status == 201
    assert domain.metrics.rebuilds._value.get() == 0
    await redis.flushdb()  # lost seconds after the first build: taken for a race with it
    assert await api.free(release["id"]) == {slot: 2}
    assert domain.metrics.rebuilds._value.get() == 0
    await pg.execute(  # first built a minute ago, by PostgreSQL's clock
        "UPDATE releases SET inventory_built_at = inventory_built_at - interval '1 minute'"
        " WHERE id = $1",
        release["id"],
    )
    await redis.flushdb()  # lost now: that is a rebuild
    assert await api.free(release["id"]) == {slot: 2}
    assert domain.metrics.rebuilds._value.get() == 1


async def test_a_published_inventory_lost_is_a_rebuild(
    api: Api, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    """A publish that built the inventory records it: lost later, it is rebuilt and
    counted, as any other. So is a release an engine of before the record published
    (during a rolling deploy), which never records a build: it has the column's default."""
    await api.site()
    release = await api.publish([2])
    built = "SELECT inventory_built_at FROM releases WHERE id = $1"
    assert await pg.fetchval(built, release["id"]) is not None
    await pg.execute(
        "UPDATE releases SET inventory_built_at = inventory_built_at - interval '1 minute'"
        " WHERE id = $1",
        release["id"],
    )
    await redis.flushdb()
    assert await api.free(release["id"]) == {release["slots"][0]["id"]: 2}
    assert domain_of(api).metrics.rebuilds._value.get() == 1
    older = await api.publish([2])
    await pg.execute("UPDATE releases SET inventory_built_at = DEFAULT WHERE id = $1", older["id"])
    await redis.flushdb()
    assert await api.free(older["id"]) == {older["slots"][0]["id"]: 2}
    assert domain_of(api).metrics.rebuilds._value.get() == 2


async def test_two_first_builds_at_once_are_one_first_build(
    api: Api, pg: asyncpg.Connection
) -> None:
    """A first build that waits for another one committing (a publish's and a poller's,
    queued behind a change that held the release's row) read the row from before it, found
    no build recorded, and was counted as a loss (a review)."""
    await api.site()
    release = (await api.publish([1]))["id"]
    await pg.execute("UPDATE releases SET inventory_built_at = NULL WHERE id = $1", release)
    store = domain_of(api).store
    async with pg.transaction():
        await pg.execute("UPDATE releases SET inventory_built_at = now() WHERE id = $1", release)
        racing = asyncio.create_task(store.built(release, 30))
        waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
        for _ in range(500):
            if await pg.fetchval(waiting):
                break
            await asyncio.sleep(0.01)
        assert await pg.fetchval(waiting), "the second build never waited for the first"
    assert await racing is True


async def test_redis_flushed_then_hold_rebuilds_first(api: Api, redis: aioredis.Redis) -> None:
    await api.site()
    release = await api.publish([1])
    slot = release["slots"][0]["id"]
    await api.book(slot)
    await redis.flushdb()
    r = await api.hold(slot, ip(5))
    assert r.status == 409 and r.body["type"] == "/problems/slot-full"


async def _crash_after_commit(api: Api, slot: str, person: dict[str, str]) -> dict[str, str]:
    """Hold by HTTP, then run the confirm's first two steps and 'crash' before confirm_done."""
    domain = domain_of(api)
    hold = (await api.hold(slot, ip(7))).body
    release = await domain.release(slot.split(".")[0])
    assert await domain.inventory.confirm_begin(release.id, hold["hold_id"], domain.now_ms())
    a = as_applicant(person)
    await domain.store.book(
        reference=new_reference(),
        release=release,
        slot_id=slot,
        channel="online",
        hold_id=hold["hold_id"],
        hold_token_hash=token_hash(hold["hold_token"]),
        identity_hash=a.identity_hash(domain.settings.secret),
        email_hash=a.email_hash(domain.settings.secret),
        family_name=a.family_name,
        given_names=a.given_names,
        birth_date=a.birth_date,
        cancel_token_hash=token_hash(domain._cancel_token(hold["hold_token"], hold["hold_id"])),
    )
    return hold  # type: ignore[no-any-return]


async def test_confirm_committed_but_never_told_redis(api: Api, clock: FakeClock) -> None:
    await api.site()
    release = await api.publish([2])
    slot = release["slots"][0]["id"]
    await _crash_after_commit(api, slot, applicant())
    domain = domain_of(api)
    counts = await domain.inventory.counts(release["id"], domain.now_ms())
    assert (counts[slot].booked, counts[slot].held) == (0, 1)  # taken, never shown free
    assert (await sweep_once(domain, reconcile=False)).settled == 0  # too young to settle
    clock.advance(domain.settings.confirm_grace_s + 1)
    assert (await sweep_once(domain, reconcile=False)).settled == 1
    counts = await domain.inventory.counts(release["id"], domain.now_ms())
    assert (counts[slot].booked, counts[slot].held) == (1, 0)
    assert await domain.recovery.reconcile(release["id"]) == 0


async def test_confirm_retried_after_a_crash_returns_the_booking(api: Api) -> None:
    await api.site()
    release = await api.publish([2])
    slot = release["slots"][0]["id"]
    person = applicant()
    hold = await _crash_after_commit(api, slot, person)
    again = await api.confirm(hold, person, ip(7))
    assert again.status == 201
    domain = domain_of(api)
    counts = await domain.inventory.counts(release["id"], domain.now_ms())
    assert (counts[slot].booked, counts[slot].held) == (1, 0)
    third = await api.confirm(hold, person, ip(7))
    assert third.status == 201 and third.body == again.body


async def test_confirm_begun_but_never_committed_frees_the_place(
    api: Api, clock: FakeClock
) -> None:
    await api.site()
    release = await api.publish([1])
    slot = release["slots"][0]["id"]
    hold = (await api.hold(slot)).body
    domain = domain_of(api)
    await domain.inventory.confirm_begin(release["id"], hold["hold_id"], domain.now_ms())
    clock.advance(domain.settings.confirm_grace_s + 1)
    assert (await sweep_once(domain, reconcile=False)).settled == 1
    assert await api.free(release["id"]) == {slot: 1}


async def test_cancel_never_told_redis_is_reconciled(api: Api, pg: asyncpg.Connection) -> None:
    await api.site()
    release = await api.publish([1])
    slot = release["slots"][0]["id"]
    booked = await api.book(slot)
    domain = domain_of(api)
    assert await domain.store.cancel(booked["booking"]["reference"], "test")  # crash after PG
    assert await api.free(release["id"]) == {slot: 0}
    assert (await sweep_once(domain, reconcile=True)).corrections == 1
    assert domain.metrics.reconcile_corrections._value.get() == 1
    assert await api.free(release["id"]) == {slot: 1}
    assert (await sweep_once(domain, reconcile=True)).corrections == 0


async def test_steady_state_reconcile_makes_no_correction(api: Api) -> None:
    await api.site()
    release = await api.publish([2, 2])
    for i, s in enumerate(release["slots"]):
        await api.book(s["id"], client_ip=ip(i))
    await api.hold(release["slots"][0]["id"], ip(9))
    assert (await sweep_once(domain_of(api), reconcile=True)).corrections == 0


async def test_expired_holds_are_reclaimed_by_the_sweeper(api: Api, clock: FakeClock) -> None:
    await api.site()
    release = await api.publish([1])
    slot = release["slots"][0]["id"]
    await api.hold(slot)
    domain = domain_of(api)
    clock.advance(domain.settings.hold_ttl_s + 1)
    await sweep_once(domain, reconcile=False)
    raw = await domain.inventory._redis.hget(f"g:{{r:{release['id']}}}:inv", f"h:{slot}")
    assert raw == b"0"


async def test_a_flood_of_expired_holds_is_reclaimed_in_one_pass(
    api: Api, clock: FakeClock
) -> None:
    """Bots hold every place of a release and never confirm. When their holds expire
    together, the hold and listing calls reclaim 100 each, and the sweeper reclaimed 100 a
    pass: places stayed taken for minutes after a large release's holds expired, and a
    person asking for one was told the slot was full. One pass now gives back all."""
    await api.site()
    release = await api.publish([300])
    slot = release["slots"][0]["id"]
    for n in range(250):
        assert (await api.hold(slot, ip(n))).status == 201
    domain = domain_of(api)
    clock.advance(domain.settings.hold_ttl_s + 1)
    await sweep_once(domain, reconcile=False)
    counts = await domain.inventory._redis.hgetall(ReleaseKeys.of(release["id"]).inv)
    assert counts[f"h:{slot}".encode()] == b"0"
    assert await domain.inventory._redis.zcard(ReleaseKeys.of(release["id"]).holds) == 0


async def test_booking_cancelled_before_its_confirm_settled(api: Api, clock: FakeClock) -> None:
    """Confirm committed, Redis never told, then the applicant cancelled: the hold is settled
    as not booked (by the sweeper, or by a retried confirm) and the place is free."""
    await api.site()
    release = await api.publish([1, 1])
    domain = domain_of(api)
    for slot, settle_by in (
        (release["slots"][0]["id"], "sweeper"),
        (release["slots"][1]["id"], "retry"),
    ):
        person = applicant()
        hold = await _crash_after_commit(api, slot, person)
        booking = await domain.store.booking_by_hold(hold["hold_id"])
        assert booking is not None
        cancel_token = domain._cancel_token(hold["hold_token"], hold["hold_id"])
        r = await api.call(
            "DELETE",
            f"/v1/bookings/{booking.reference}",
            headers={"Authorization": f"Bearer {cancel_token}"},
        )
        assert r.status == 204
        if settle_by == "sweeper":
            clock.advance(domain.settings.confirm_grace_s + 1)
            assert (await sweep_once(domain, reconcile=False)).settled == 1
        else:
            again = await api.confirm(hold, person, ip(7))
            assert again.status == 201 and again.body["booking"]["status"] == "cancelled"
        counts = await domain.inventory.counts(release["id"], domain.now_ms())
        assert (counts[slot].booked, counts[slot].held) == (0, 0), settle_by
    assert await domain.recovery.reconcile(release["id"]) == 0


async def test_live_hold_counters_are_recounted_only_outside_a_rush(
    api: Api, redis: aioredis.Redis
) -> None:
    """The reconcile's recount walks every hold record: it is skipped while more than
    ``recount_limit`` holds live, and catches up once they are fewer."""
    await api.site()
    release = await api.publish([10])
    slot = release["slots"][0]["id"]
    for n in range(3):
        assert (await api.hold(slot, ip(40 + n))).status == 201
    await redis.hset(ReleaseKeys.of(release["id"]).inv, f"h:{slot}", 7)  # drifted
    domain = domain_of(api)
    capacities = [(slot, 10)]

    async def reconcile(limit: int) -> int:
        fence = await domain.inventory.fence(release["id"])
        done = await domain.inventory.reconcile(
            release["id"], fence, capacities, [], [], recount_limit=limit
        )
        return done.corrections

    assert await reconcile(2) == 0  # 3 live holds: a rush, as far as this limit goes
    assert await api.free(release["id"]) == {slot: 3}  # 10 - 7, the drifted count
    assert await reconcile(3) == 1
    api.clock.advance(1)
    assert await api.free(release["id"]) == {slot: 7}


def test_the_default_timeouts_keep_the_order_the_recovery_relies_on() -> None:
    """docs/consistency.md: the sweeper settles a confirm only once no transaction of it can
    still run (section 2), and a capacity change keeps its transaction, and with it the
    capacity lock, while it waits on Redis up to four times (section 8). Changing a timeout
    in engine/settings.py must keep both true."""
    s = Settings(secret=b"x" * 32)
    statements = 12  # a booking transaction: the advisory locks and the trigger included
    assert s.confirm_grace_s > statements * s.pg_timeout_s
    assert 4 * s.redis_timeout_s < s.pg_timeout_s


async def test_a_lock_is_released_only_by_its_owner(redis: aioredis.Redis, clean: None) -> None:
    """The sweeper's and the rebuild's locks expire: a worker that outlived its lock must
    not release the one another worker has taken since."""
    inventory = Inventory(redis, timeout_s=1.0, retry_after_s=1)
    first = await inventory.try_lock("test:lock", 50)
    assert first is not None
    assert await inventory.try_lock("test:lock", 50) is None
    await asyncio.sleep(0.1)  # expired: another worker takes it
    second = await inventory.try_lock("test:lock", 10_000)
    assert second is not None
    await inventory.unlock("test:lock", first)  # the first worker, late
    assert await inventory.try_lock("test:lock", 10_000) is None
    await inventory.unlock("test:lock", second)
    assert await inventory.try_lock("test:lock", 10_000) is not None


async def test_sweeper_passes_are_counted_by_outcome(api: Api, redis: aioredis.Redis) -> None:
    """A worker whose sweeper waits for the lock counts its passes as ``standby``, not
    ``done``: with many workers, the standby passes would otherwise hide the failing passes
    of the one holding the lock from the GuichetSweeperFailing alert."""
    app = api.client.app
    metrics = app[RESERVATIONS].metrics

    def passes(outcome: str) -> float:
        value = metrics.registry.get_sample_value("guichet_sweeps_total", {"outcome": outcome})
        assert value is not None  # created at start, for the alerts
        return value

    assert (passes("done"), passes("standby")) == (0, 0)
    await redis.set(SWEEPER_LOCK, "another worker", px=60_000)
    stop = asyncio.Event()
    task = asyncio.create_task(sweeper.run(app[LOTTERY], stop))

    def counted(outcome: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return passes(outcome) > 0

        return check

    try:
        await poll(counted("standby"), lambda: "no standby pass")
        assert passes("done") == 0
        await redis.delete(SWEEPER_LOCK)
        await poll(counted("done"), lambda: "no pass done")
    finally:
        stop.set()
        await task
    assert (passes("skipped"), passes("failed")) == (0, 0)


async def test_a_release_that_cannot_be_swept_holds_back_no_other_work(
    api: Api, clock: FakeClock, redis: aioredis.Redis
) -> None:
    """One release whose sweep fails (here its inventory key holds a value of another type:
    Redis answers WRONGTYPE, as for data a bug left) must not keep the other releases'
    confirms unsettled, nor the due draws from running. The pass still fails, at its end,
    for the alert."""
    await api.site()
    # The sweeper goes through releases in id order: the broken one comes first.
    broken, stale = sorted([await api.publish([2]), await api.publish([2])], key=lambda r: r["id"])
    slot = stale["slots"][0]["id"]
    await _crash_after_commit(api, slot, applicant())
    drawn = (await api.publish_draw([1]))["id"]
    assert (await api.enter(drawn, applicant(), ip(9))).status == 201
    await redis.delete(ReleaseKeys.of(broken["id"]).inv)
    await redis.set(ReleaseKeys.of(broken["id"]).inv, "not a hash")
    domain = domain_of(api)
    clock.advance(90001)  # the confirm is past its grace, and the draw is due
    report = await sweeper.sweep(domain, reconcile=True, lottery=api.client.app[LOTTERY])
    assert isinstance(report.failure, ResponseError) and "WRONGTYPE" in str(report.failure)
    # Every release was gone through: the full reconcile was done, and waits its interval.
    assert (report.swept, report.releases, report.settled, report.draws) == (True, 3, 1, 1)
    counts = await domain.inventory.counts(stale["id"], domain.now_ms())
    assert (counts[slot].booked, counts[slot].held) == (1, 0)  # settled
    assert (await api.call("GET", f"/v1/releases/{drawn}/draw")).status == 200


async def test_a_rebuild_by_another_worker_that_does_not_finish_is_a_503_of_the_store(
    api: Api, redis: aioredis.Redis
) -> None:
    """Another worker holds the rebuild's lock and never finishes (it died): a request
    waits a bounded time, then answers 503 with Retry-After, ``level: store`` (Redis cannot
    serve this release now; ``engine`` is for a worker with too many requests)."""
    await api.site()
    release = await api.publish([1])
    keys = ReleaseKeys.of(release["id"])
    await redis.delete(keys.inv)
    await redis.set(keys.rebuild_lock, "a worker that died", px=60_000)
    reply = await api.call("GET", f"/v1/releases/{release['id']}/slots")
    assert (reply.status, reply.body["level"]) == (503, "store"), reply.body
    assert int(reply.headers["Retry-After"]) >= 1
    await redis.delete(keys.rebuild_lock)
    assert (await api.call("GET", f"/v1/releases/{release['id']}/slots")).status == 200


async def test_the_sweeper_counts_a_pass_that_failed_on_one_release_as_failed(
    api: Api, redis: aioredis.Redis
) -> None:
    """The running sweeper (not one pass by hand): a release whose sweep fails makes each
    pass count as ``failed`` (GuichetSweeperFailing reads it), and the others are swept."""
    app = api.client.app
    metrics = app[RESERVATIONS].metrics
    await api.site()
    broken = await api.publish([1])
    await redis.delete(ReleaseKeys.of(broken["id"]).inv)
    await redis.set(ReleaseKeys.of(broken["id"]).inv, "not a hash")
    stop = asyncio.Event()
    task = asyncio.create_task(sweeper.run(app[LOTTERY], stop))

    async def failed() -> bool:
        value = metrics.registry.get_sample_value("guichet_sweeps_total", {"outcome": "failed"})
        return bool(value)

    try:
        await poll(failed, lambda: "no failed pass counted")
    finally:
        stop.set()
        await task
    done = metrics.registry.get_sample_value("guichet_sweeps_total", {"outcome": "done"})
    assert done == 0


async def test_a_background_task_that_ends_is_started_again(
    clean: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation that a library lets out of one of its timeouts (or any bug) ended the
    sweeper's task, and the worker served on without one: no draw run, no stale confirm
    settled, and nothing said. So did the schema's watch. Each is now started again, and
    each restart counted for the alert; the worker's stop still ends them."""
    real_sweep, real_check = sweeper.sweep, app_module.schema_current
    calls = {"sweep": 0, "schema": 0}

    async def sweep_once_leaking(*args: Any, **kwargs: Any) -> sweeper.SweepReport:
        calls["sweep"] += 1
        if calls["sweep"] == 1:
            raise asyncio.CancelledError()  # not the task's: nobody cancelled it
        return await real_sweep(*args, **kwargs)

    async def check_leaking(*args: Any, **kwargs: Any) -> bool:
        calls["schema"] += 1
        if calls["schema"] == 2:  # the first is the check before serving
            raise asyncio.CancelledError()
        return await real_check(*args, **kwargs)

    monkeypatch.setattr(sweeper, "sweep", sweep_once_leaking)
    monkeypatch.setattr(app_module, "schema_current", check_leaking)
    monkeypatch.setattr(app_module, "_SCHEMA_WATCH_S", 0.01)
    monkeypatch.setattr(app_module, "_SCHEMA_RECHECK_S", 0.01)
    monkeypatch.setattr(app_module, "_RESTART_WAIT_S", 0.01)
    app = create_app(make_settings(sweep_interval_s=0.01), sweep=True)
    metrics = app[METRICS]

    def sample(name: str, labels: dict[str, str]) -> float:
        value = metrics.registry.get_sample_value(name, labels)
        assert value is not None
        return value

    async def both_going() -> bool:
        done = sample("guichet_sweeps_total", {"outcome": "done"})
        return done > 0 and calls["schema"] > 3

    async with TestClient(TestServer(app)):
        await poll(both_going, lambda: f"calls {calls}")
    for task in ("sweeper", "schema"):
        assert sample("guichet_background_restarts_total", {"task": task}) == 1, task


async def test_a_rebuild_is_counted_when_postgresql_cannot_say_when_it_was_first_built(
    api: Api, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether a release's inventory was built before is asked of PostgreSQL after the
    rebuild. Unanswered, the rebuild is counted (a loss, alerted), and the request that
    rebuilt it is served."""
    await api.site()
    release = await api.publish([2])
    domain = domain_of(api)

    async def unanswered(*args: Any) -> bool:
        raise StoreUnavailable(1, "PostgreSQL did not answer")

    monkeypatch.setattr(domain.store, "built", unanswered)
    await redis.flushdb()
    assert await api.free(release["id"]) == {release["slots"][0]["id"]: 2}
    assert domain.metrics.rebuilds._value.get() == 1
