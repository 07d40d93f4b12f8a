"""When Redis or PostgreSQL is unreachable, hangs, restarts or comes back: real processes and
sockets, no mocks. A store that does not answer makes the engine answer 503 ``overloaded``
with a Retry-After header, and the engine serves again by itself once the store is back.

Only statuses, headers and bodies are asserted, never elapsed time: a request that hangs is
caught by the per-test timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from engine import draw
from engine.app import create_app
from engine.appkeys import LOTTERY, RESERVATIONS
from engine.errors import StoreUnavailable
from engine.keys import ReleaseKeys
from engine.sweeper import sweep
from engine.tokens import signed_id
from tests.api import ADMIN, Api, Reply, applicant, ip, other_than
from tests.conftest import DATABASE_URL, REDIS_URL, FakeClock, make_settings
from tests.procs import (
    HOST,
    Blackhole,
    RedisServer,
    TcpProxy,
    dead_port,
    poll,
    running,
    with_port,
)

# A hang shows up as a failure well before the suite's own 120 s limit.
HANG = pytest.mark.timeout(30)


@contextlib.asynccontextmanager
async def engine(clock: FakeClock, **overrides: object) -> AsyncIterator[Api]:
    """A second, real engine (same secret and database as the ``api`` fixture's unless
    overridden), served on a loopback port."""
    app = create_app(make_settings(**overrides), clock=clock, sweep=False)
    async with TestClient(TestServer(app)) as client:
        yield Api(client, clock)


def assert_overloaded(reply: Reply) -> None:
    assert reply.status == 503, reply.body
    assert reply.headers["Content-Type"].split(";")[0] == "application/problem+json"
    assert reply.body["type"] == "/problems/overloaded", reply.body
    assert reply.body["status"] == 503
    retry_after = reply.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1, retry_after
    assert reply.body["retry_after"] == int(retry_after)


async def function_libraries(url: str) -> list[str]:
    r = aioredis.Redis.from_url(url)
    try:
        # Each library comes as a flat [name, value, name, value, ...] list.
        libraries = [dict(zip(lib[::2], lib[1::2], strict=True)) for lib in await r.function_list()]
        return [lib[b"library_name"].decode() for lib in libraries]
    finally:
        await r.aclose()


async def wait_ready(api: Api) -> None:
    """Poll /readyz (bounded) until the engine reports both stores answering."""

    async def ready() -> bool:
        return (await api.call("GET", "/readyz")).status == 200

    await poll(ready, lambda: "the engine never became ready")


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with running(RedisServer(tmp_path)) as server:
        yield server


@pytest.fixture
async def private_redis_1_client(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with running(RedisServer(tmp_path, options={"maxclients": "1"})) as server:
        yield server


# Unreachable: a port held bound but never listened on, so every connect is refused --------


async def test_redis_refused_answers_503(api: Api, clock: FakeClock) -> None:
    await api.site()
    release = await api.publish([2])
    slot = release["slots"][0]["id"]
    paid = await api.solved(release["id"])
    with dead_port() as port:
        async with engine(clock, redis_url=f"redis://{HOST}:{port}/0") as down:
            assert_overloaded(
                await down.call(
                    "POST",
                    "/v1/challenges",
                    {"release": release["id"]},
                    {"X-Forwarded-For": "10.0.0.1"},
                )
            )
            assert_overloaded(await down.hold(slot, paid=paid))
            assert_overloaded(await down.call("GET", f"/v1/releases/{release['id']}/slots"))
            assert_overloaded(await down.call("GET", "/readyz"))
            assert (await down.call("GET", "/healthz")).status == 200
    # A refused attempt does not spend its challenge: the healthy engine still takes it.
    hold = await api.hold(slot, paid=paid)
    assert hold.status == 201, hold.body


async def test_bookings_are_read_while_redis_is_down(api: Api, clock: FakeClock) -> None:
    """Reading a booking needs only PostgreSQL. A lookup that finds nothing takes tokens
    from Redis's buckets (Limiter.lookup_missed); Redis down, it is still a 404 (or a 401),
    not a 503: what the lookup found stands."""
    await api.site()
    done = await api.book((await api.publish([1]))["slots"][0]["id"])
    path = f"/v1/bookings/{done['booking']['reference']}"
    own = {"Authorization": f"Bearer {done['cancel_token']}"}
    with dead_port() as port:
        async with engine(clock, redis_url=f"redis://{HOST}:{port}/0") as down:
            assert (await down.call("GET", path, headers=own)).status == 200
            made_up = await down.call("GET", "/v1/bookings/AB-CDEF-GHJK", headers=own)
            assert made_up.status == 404, made_up.body
            wrong = {"Authorization": f"Bearer {other_than(done['cancel_token'])}"}
            assert (await down.call("GET", path, headers=wrong)).status == 401


async def test_no_postgresql_host_fit_to_write_answers_503(api: Api, clock: FakeClock) -> None:
    """With ``target_session_attrs=read-write`` in the URL (several hosts, for a
    failover), asyncpg refuses every host that cannot write, as all are while a standby is
    promoted. That error was no store error of the engine's: 500 on every request, and on
    /readyz. Here the one host says it cannot write (its sessions read only)."""
    await api.site()
    url = f"{DATABASE_URL}?target_session_attrs=read-write&default_transaction_read_only=on"
    async with engine(clock, database_url=url) as down:
        assert_overloaded(await down.call("GET", "/v1/sites"))
        assert_overloaded(await down.call("GET", "/readyz"))


async def test_postgresql_refused_answers_503(api: Api, clock: FakeClock) -> None:
    await api.site()
    release = await api.publish([2])
    with dead_port() as port:
        dsn = with_port(DATABASE_URL, port)
        async with engine(clock, database_url=dsn) as down:
            assert_overloaded(await down.call("GET", "/v1/sites"))
            assert_overloaded(
                await down.call(
                    "POST",
                    "/v1/challenges",
                    {"release": release["id"]},
                    {"X-Forwarded-For": "10.0.0.1"},
                )
            )
            assert_overloaded(await down.call("GET", "/readyz"))
            assert (await down.call("GET", "/healthz")).status == 200


async def test_postgresql_read_only_answers_503(api: Api, clock: FakeClock) -> None:
    """A standby after a failover answers reads and refuses writes: each refused write is
    503 with Retry-After, not a 500."""
    await api.site()
    release = await api.publish([2])
    slot = release["slots"][0]["id"]
    # asyncpg passes an unknown DSN parameter on as a setting of every connection.
    sep = "&" if "?" in DATABASE_URL else "?"
    read_only = f"{DATABASE_URL}{sep}default_transaction_read_only=on"
    async with engine(clock, database_url=read_only) as standby:
        assert (await standby.call("GET", "/v1/sites")).status == 200
        site = {"name": "Bobigny", "timezone": "Europe/Paris", "procedures": []}
        assert_overloaded(await standby.call("PUT", "/v1/admin/sites/other", site, ADMIN))
        path = f"/v1/admin/releases/{release['id']}"
        patch = {"slots": [{"id": slot, "capacity": 3}]}
        assert_overloaded(await standby.call("PATCH", path, patch, ADMIN))
        # A confirm and a counter booking: certainly not committed, so the hold is held
        # again (not left confirming for the sweeper) and the counter's place is free.
        hold = (await api.hold(slot)).body
        assert_overloaded(await standby.confirm(hold, applicant()))
        staff = {"slot_id": slot, "applicant": applicant()}
        assert_overloaded(await standby.call("POST", "/v1/admin/bookings", staff, ADMIN))
    assert await api.free(release["id"]) == {slot: 1}
    sites = (await api.call("GET", "/v1/sites")).body["sites"]
    assert [s["id"] for s in sites] == ["bobigny"]
    # Past the sweeper's grace for confirms that never reported, the hold is still there.
    clock.advance(200)
    await api.client.app[RESERVATIONS].recovery.settle_stale_confirms(release["id"])
    assert (await api.confirm(hold, applicant())).status == 201


async def test_redis_at_its_client_limit_answers_503(
    clean: None, clock: FakeClock, private_redis_1_client: RedisServer
) -> None:
    """A Redis with no connection left answers "ERR max number of clients reached" and
    closes: 503 with Retry-After, as for any Redis that cannot serve now."""
    _reader, writer = await asyncio.open_connection(HOST, private_redis_1_client.port)
    try:
        async with engine(clock, redis_url=private_redis_1_client.url) as full:
            await full.site()
            release = await full.publish([1])
            challenge = {"release": release["id"]}
            assert_overloaded(await full.call("POST", "/v1/challenges", challenge))
            assert_overloaded(await full.call("GET", f"/v1/releases/{release['id']}/slots"))
    finally:
        writer.close()


async def test_a_redis_refusing_writes_defers_a_new_release_inventory(
    clean: None, clock: FakeClock, tmp_path: Path
) -> None:
    """A Redis out of memory (noeviction) refuses every write, the capacity fence's first
    among them: the release is published in PostgreSQL (201) and its inventory built later,
    as when Redis does not answer; the other requests answer 503."""
    full = RedisServer(tmp_path, options={"maxmemory": "1", "maxmemory-policy": "noeviction"})
    async with running(full), engine(clock, redis_url=full.url) as api:
        await api.site()
        release = await api.publish([1])  # asserts 201
        assert_overloaded(await api.call("GET", f"/v1/releases/{release['id']}/slots"))


async def test_a_redis_short_of_replicas_answers_503_and_draws_still_run(
    clean: None, clock: FakeClock, tmp_path: Path
) -> None:
    """A Redis set to write only with enough replicas (``min-replicas-to-write``, an HA
    setting) refuses every write, our functions' calls among them, with ``NOREPLICAS``
    while a replica is away. That is a Redis that cannot serve now: 503 with Retry-After,
    not 500, and the sweeper still runs the due draws, which need only PostgreSQL."""
    async with running(RedisServer(tmp_path)) as own, engine(clock, redis_url=own.url) as api:
        await api.site(procedures=("renouvellement", "duplicata"))
        release = await api.publish([1], procedure="renouvellement")
        draw_release = await api.publish_draw([1], procedure="duplicata")
        entry = await api.enter(draw_release["id"], applicant(), ip(1))
        assert entry.status == 201, entry.body
        admin = aioredis.Redis.from_url(own.url)
        try:
            await admin.config_set("min-replicas-to-write", 1)  # and there is none
        finally:
            await admin.aclose()
        assert_overloaded(await api.call("POST", "/v1/challenges", {"release": release["id"]}))
        clock.advance(90001)
        app = api.client.app
        report = await sweep(app[RESERVATIONS], reconcile=True, lottery=app[LOTTERY])
        assert isinstance(report.failure, StoreUnavailable), report.failure
        assert (report.swept, report.draws) == (False, 1)


@HANG
async def test_postgresql_that_stops_answering_within_asyncpg_answers_503(
    api: Api, clock: FakeClock
) -> None:
    """Some of asyncpg's own waits have no time limit: the Close of a prepared statement
    its cache lets go of (when full, or after five minutes by default) is one. A
    PostgreSQL that stopped answering just then held the request until TCP gave up, and
    every request waiting on the same refill with it. Here the cache holds one statement,
    and the proxy keeps the Close: the request answers 503 within its deadline."""
    await api.site()
    proxy, url = await TcpProxy.started(DATABASE_URL)
    try:
        async with engine(
            clock, database_url=url, pg_timeout_s=0.5, pg_pool_size=1, pg_statement_cache_size=1
        ) as stalled:
            assert (await stalled.call("GET", "/v1/sites")).status == 200  # one statement kept
            proxy.hold_back(b"C\x00\x00\x00")  # a Close message, and nothing after it
            assert_overloaded(await stalled.call("GET", f"/v1/releases/r{'0' * 12}/slots"))
            assert proxy.held and all(data.startswith(b"C") for data in proxy.held), proxy.held
    finally:
        await proxy.stop()


@HANG
async def test_a_worker_stopping_as_postgresql_stops_answering_closes_redis_too(
    clock: FakeClock, tmp_path: Path
) -> None:
    """asyncpg closes a connection by asking PostgreSQL to end it, and waits for that: a
    PostgreSQL that stopped answering as the worker stopped failed the pool's close, and
    the Redis connections after it were never closed. Each store is closed on its own
    now, each within its time."""
    proxy, url = await TcpProxy.started(DATABASE_URL)
    async with running(RedisServer(tmp_path)) as own:
        watch = aioredis.Redis.from_url(own.url)
        try:
            async with engine(clock, database_url=url, redis_url=own.url, pg_timeout_s=0.5) as api:
                assert (await api.call("GET", "/readyz")).status in (200, 503)
                assert (await api.call("GET", "/v1/sites")).status == 200
                proxy.hold_back(b"X\x00\x00\x00\x04")  # asyncpg's Terminate, never delivered

            async def closed() -> bool:
                clients = await watch.execute_command("CLIENT", "LIST")
                return clients.count(b"\n") <= 1  # this connection alone

            await poll(closed, lambda: "the engine's Redis connections are still open")
            assert proxy.held, "no Terminate was held back"
        finally:
            await watch.aclose()
            await proxy.stop()


async def test_a_redis_that_refuses_a_connections_set_up_answers_503(
    clock: FakeClock, tmp_path: Path
) -> None:
    """Through redis-py's own pipelines (here for a URL with options), an error reply to a
    connection's set-up (SELECT refused by the user's ACL) came out of the batch as it
    was: a 500, where the same reply to a command, or the multiplexed connection, gives
    503 with Retry-After."""
    async with running(RedisServer(tmp_path)) as acl:
        admin = aioredis.Redis.from_url(acl.url)
        try:
            await admin.execute_command("ACL", "SETUSER", "guichet", "on", ">secret", "~*")
            await admin.execute_command("ACL", "SETUSER", "guichet", "+@all", "-select")
        finally:
            await admin.aclose()
        url = f"redis://guichet:secret@{HOST}:{acl.port}/1?health_check_interval=0"
        async with engine(clock, redis_url=url) as api:
            assert_overloaded(await api.call("GET", "/readyz"))


async def test_a_made_up_hold_id_asks_no_store(api: Api, clock: FakeClock) -> None:
    """Bots can send confirms and releases of made-up hold ids as fast as they like: an id
    without this service's signature is refused (404) before either store is asked, so it
    answers even with both down. A signed id needs the stores: 503."""
    settings = make_settings()
    made_up = "r0000000000ab.h" + "0" * 19
    signed = signed_id(settings.secret, "hold-id", "r0000000000ab.h", 15)
    auth = {"Authorization": "Bearer x", "X-Forwarded-For": "10.0.0.1"}
    confirm = {"applicant": applicant()}
    with dead_port() as redis_port, dead_port() as pg_port:
        async with engine(
            clock,
            redis_url=f"redis://{HOST}:{redis_port}/0",
            database_url=with_port(DATABASE_URL, pg_port),
        ) as down:
            for hold_id in (made_up, other_than(signed)):
                r = await down.call("POST", f"/v1/holds/{hold_id}/confirm", confirm, auth)
                assert r.status == 404 and r.body["type"] == "/problems/not-found", r.body
                r = await down.call("DELETE", f"/v1/holds/{hold_id}", headers=auth)
                assert r.status == 404 and r.body["type"] == "/problems/not-found", r.body
            assert_overloaded(await down.call("POST", f"/v1/holds/{signed}/confirm", confirm, auth))
            assert_overloaded(await down.call("DELETE", f"/v1/holds/{signed}", headers=auth))


# Hanging: the store accepts the connection and never replies -------------------------------


@HANG
async def test_redis_that_hangs_answers_503(api: Api, clock: FakeClock) -> None:
    await api.site()
    release = await api.publish([2])
    slot = release["slots"][0]["id"]
    paid = await api.solved(release["id"])
    async with (
        Blackhole() as hole,
        engine(clock, redis_url=f"redis://{HOST}:{hole.port}/0", redis_timeout_s=0.3) as hung,
    ):
        assert_overloaded(await hung.hold(slot, paid=paid))
        assert_overloaded(await hung.call("GET", f"/v1/releases/{release['id']}/slots"))
        assert_overloaded(await hung.call("GET", "/readyz"))
        assert (await hung.call("GET", "/healthz")).status == 200
        assert hole.accepted > 0  # the engine did reach the store, which then said nothing
    hold = await api.hold(slot, paid=paid)
    assert hold.status == 201, hold.body


@HANG
async def test_a_redis_cluster_that_hangs_answers_each_request_in_its_time(
    clock: FakeClock,
) -> None:
    """A cluster client finds its nodes again after an error, asking each under a lock
    that every next batch of commands waits on. That search was outside the batch's
    timeout: with nodes that accept connections and never answer, the k-th request
    waited k searches, and under load the 503s came minutes late. Here sixty requests
    one after another: each is answered 503 within its own time."""
    async with (
        Blackhole() as hole,
        engine(clock, redis_url=f"redis+cluster://{HOST}:{hole.port}", redis_timeout_s=0.5) as hung,
    ):

        async def ready(delay: float) -> Reply:
            await asyncio.sleep(delay)
            return await hung.call("GET", "/readyz")

        replies = await asyncio.gather(*(ready(n * 0.01) for n in range(60)))
        for reply in replies:
            assert_overloaded(reply)
        assert hole.accepted > 0


@HANG
async def test_postgresql_that_hangs_answers_503(api: Api, clock: FakeClock) -> None:
    await api.site()
    release = await api.publish([2])
    slot = release["slots"][0]["id"]
    paid = await api.solved(release["id"])
    async with (
        Blackhole() as hole,
        engine(clock, database_url=with_port(DATABASE_URL, hole.port), pg_timeout_s=0.3) as hung,
    ):
        assert_overloaded(await hung.call("GET", "/v1/sites"))
        assert_overloaded(await hung.hold(slot, paid=paid))
        assert_overloaded(await hung.call("GET", "/readyz"))
        assert (await hung.call("GET", "/healthz")).status == 200
        assert hole.accepted > 0
    hold = await api.hold(slot, paid=paid)
    assert hold.status == 201, hold.body


# Restarts and returns ---------------------------------------------------------------------


async def test_redis_restart_reloads_functions_and_rebuilds_from_postgresql(
    clean: None, clock: FakeClock, private_redis: RedisServer
) -> None:
    async with engine(clock, redis_url=private_redis.url) as api:
        await api.site()
        release = await api.publish([1, 2])
        full, other = (s["id"] for s in release["slots"])
        await api.book(full)
        assert await api.free(release["id"]) == {full: 0, other: 2}
        assert await function_libraries(private_redis.url)

        private_redis.kill()
        private_redis.start()
        await private_redis.wait_ready()
        assert await function_libraries(private_redis.url) == []  # no persistence: all gone
        # See test_first_request_after_redis_restart_succeeds: until then, the engine needs
        # one refused request per stale pooled connection to notice the restart.
        await wait_ready(api)

        hold = await api.hold(other)
        assert hold.status == 201, hold.body
        assert await function_libraries(private_redis.url)
        # The inventory was rebuilt from PostgreSQL: the booked place is still taken.
        refused = await api.hold(full)
        assert refused.status == 409 and refused.body["type"] == "/problems/slot-full"
        assert await api.free(release["id"]) == {full: 0, other: 1}
        done = await api.confirm(hold.body)
        assert done.status == 201, done.body
        assert await api.free(release["id"]) == {full: 0, other: 1}


async def test_first_request_after_redis_restart_succeeds(
    clean: None, clock: FakeClock, private_redis: RedisServer
) -> None:
    async with engine(clock, redis_url=private_redis.url) as api:
        await api.site()
        release = await api.publish([2])
        slot = release["slots"][0]["id"]
        ready = await api.call("GET", "/readyz")  # leaves one connection in the pool
        assert ready.status == 200, ready.body

        private_redis.kill()
        private_redis.start()
        await private_redis.wait_ready()

        # Redis answers again: nothing justifies refusing the next request.
        ready = await api.call("GET", "/readyz")
        assert ready.status == 200, ready.body
        hold = await api.hold(slot)
        assert hold.status == 201, hold.body


async def test_engine_serves_again_when_redis_returns(
    clean: None, clock: FakeClock, private_redis: RedisServer
) -> None:
    async with engine(clock, redis_url=private_redis.url, redis_timeout_s=0.5) as api:
        await api.site()
        release = await api.publish([1])
        slot = release["slots"][0]["id"]
        paid = await api.solved(release["id"])

        private_redis.kill()
        assert_overloaded(await api.hold(slot, paid=paid))
        assert_overloaded(await api.call("GET", "/readyz"))

        private_redis.start()
        await private_redis.wait_ready()
        ready = await api.call("GET", "/readyz")
        assert ready.status == 200, ready.body
        hold = await api.hold(slot, paid=paid)
        assert hold.status == 201, hold.body


async def test_engine_serves_again_when_postgresql_returns(clean: None, clock: FakeClock) -> None:
    upstream = urlsplit(DATABASE_URL)
    assert upstream.hostname is not None, "the test database must be reached over TCP"
    proxy = TcpProxy(upstream.hostname, upstream.port or 5432)
    await proxy.start()
    try:
        dsn = with_port(DATABASE_URL, proxy.port)
        async with engine(clock, database_url=dsn, pg_timeout_s=1.0) as api:
            await api.site()
            release = await api.publish([2])
            slot = release["slots"][0]["id"]

            await proxy.stop()  # every pooled connection is cut, new ones are refused
            assert_overloaded(await api.call("GET", "/v1/sites"))
            assert_overloaded(await api.call("GET", "/readyz"))

            await proxy.start()
            sites = await api.call("GET", "/v1/sites")
            assert sites.status == 200, sites.body
            assert [s["id"] for s in sites.body["sites"]] == ["bobigny"]
            ready = await api.call("GET", "/readyz")
            assert ready.status == 200, ready.body
            booked = await api.book(slot)
            assert booked["booking"]["status"] == "confirmed"
    finally:
        await proxy.stop()


async def test_a_draw_runs_at_its_time_while_redis_is_down(api: Api, clock: FakeClock) -> None:
    """The sweeper's lock is in Redis, but a draw needs only PostgreSQL: a worker whose
    Redis does not answer still runs every due draw (the pass counts as skipped), each
    leaving Redis to learn of its bookings at a later reconcile."""
    await api.site(procedures=("renouvellement", "duplicata"))
    entered = {}
    for n in range(2):
        release = await api.publish_draw([1], procedure=("renouvellement", "duplicata")[n])
        entry = await api.enter(release["id"], applicant(), ip(1 + n))
        assert entry.status == 201, entry.body
        entered[release["id"]] = entry.body["entry_id"]
    clock.advance(90001)
    with dead_port() as port:
        async with engine(clock, redis_url=f"redis://{HOST}:{port}/0") as down:
            app = down.client.app
            report = await sweep(app[RESERVATIONS], reconcile=True, lottery=app[LOTTERY])
    assert isinstance(report.failure, StoreUnavailable)
    # Not gone through: the first pass once Redis is back makes the full reconcile.
    assert (report.swept, report.draws) == (False, 2)
    for release, entry_id in entered.items():
        record = await api.call("GET", f"/v1/releases/{release}/draw")
        assert record.status == 200, record.body
        assert record.body["allocation"] == {draw.entry_digest(entry_id): f"{release}.000"}


@pytest.mark.parametrize("mode", ["one-release", "swamped", "redis-gone", "two-releases"])
async def test_a_release_whose_redis_calls_time_out_holds_back_no_other(
    api: Api, clock: FakeClock, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """One release's Redis calls time out while Redis answers the rest (a script over its
    time limit; in a Redis Cluster serving without full coverage, that release's shard
    down). The sweeper goes on to the releases after it: it ended its walk there, pass
    after pass, and the releases after it were never rebuilt, settled or reconciled. But
    with Redis gone, or two releases in a row timing out (a Redis swamped by a flood still
    answers a ping), it ends the walk there: each release would wait for its timeouts. The
    next pass begins after the release it stopped at: two neighbours that time out for
    good kept every release after them from ever being swept (an audit)."""
    await api.site()
    releases = sorted([await api.publish([1]) for _ in range(3)], key=lambda r: r["id"])
    last = ReleaseKeys.of(releases[-1]["id"]).inv
    proxy, url = await TcpProxy.started(REDIS_URL)
    try:
        async with engine(clock, redis_url=url, redis_timeout_s=0.2) as other:
            domain = other.client.app[RESERVATIONS]
            await redis.delete(last)  # lost: a sweep rebuilds it
            if mode == "redis-gone":
                reclaim = domain.inventory.reclaim

                async def redis_gone(*args: Any) -> Any:
                    await proxy.stop()
                    return await reclaim(*args)

                monkeypatch.setattr(domain.inventory, "reclaim", redis_gone)
            elif mode == "swamped":
                proxy.hold_back(b"reclaim_expired_")  # each release's first call, never pings
            elif mode == "two-releases":
                proxy.hold_back(*(r["id"].encode() for r in releases[:2]))
            else:
                proxy.hold_back(releases[0]["id"].encode())  # its calls never reach Redis
            report = await sweep(domain, reconcile=True)
            if mode == "two-releases":
                assert report.stopped_at == releases[1]["id"], report
                assert not await redis.exists(last)  # not reached
                report = await sweep(domain, reconcile=True, start_after=report.stopped_at)
                assert report.stopped_at == releases[1]["id"], report
    finally:
        await proxy.stop()
    assert isinstance(report.failure, StoreUnavailable), report
    assert (report.releases, report.swept) == (3, mode == "one-release")
    assert bool(await redis.exists(last)) is (mode in ("one-release", "two-releases"))
    if mode == "swamped":
        assert len(proxy.held) == 2, proxy.held  # the third release was not asked for
    elif mode == "one-release":
        assert proxy.held, "the first release's calls were not held back"
