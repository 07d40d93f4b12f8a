"""The application factory: ``create_app(settings)`` builds a real, fully wired app.

Resources are opened in dependency order in ``cleanup_ctx`` (one small async generator each)
and closed in reverse; the sweeper starts after the stores and is cancelled before they close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from engine import sweeper
from engine.appkeys import (
    BODIES,
    CLOCK,
    DRAW_RECORDS,
    LOTTERY,
    METRICS,
    OPENAPI,
    REFILLS,
    RESERVATIONS,
    SETTINGS,
)
from engine.autopipeline import AutoPipeline
from engine.errors import SchemaBehind
from engine.inventory import AnyRedis, Inventory, Pipelining
from engine.logs import log, quiet_unreadable_bodies
from engine.lottery import Lottery
from engine.metrics import Metrics
from engine.multiplex import Multiplexed
from engine.openapi import document, query_parameters
from engine.recovery import Clock
from engine.reservations import Reservations
from engine.routes import ROUTES
from engine.settings import Settings
from engine.singleflight import SingleFlight
from engine.store import IdentityRules, SchemaState, Store, create_pool
from engine.web import (
    UNMATCHED,
    Body,
    answer_unreadable_requests_as_problems,
    guard,
    unmatched,
)


def redis_client(settings: Settings) -> AnyRedis:
    """A client with bounded waits everywhere: connect, read, and waiting for a connection."""
    options = {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
    }
    if settings.redis_url.startswith("redis+cluster://"):
        url = "redis://" + settings.redis_url.removeprefix("redis+cluster://")
        # No retry: redis-py re-sent a whole pipeline when one of its nodes failed, and a
        # call whose reply was lost, so that a Function that had run ran again (a challenge
        # spent before its own entry, a capacity lowered twice, a confirm counted twice).
        # A call that fails is a 503 and the person's retry a request the engine knows;
        # AutoPipeline finds the nodes again. 256 connections a node, as a plain Redis's.
        return RedisCluster.from_url(
            url, retry=Retry(NoBackoff(), 0), max_connections=256, **options
        )
    # Maintenance notifications off: with redis-py's "auto" default, a pooled connection
    # that died with a Redis restart is not detected before use, so each one would fail a
    # request after Redis is back. (A retry instead would re-send non-idempotent calls.)
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=256,
        timeout=settings.redis_timeout_s,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
        **options,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def pipelining(settings: Settings, redis: AnyRedis, metrics: Metrics) -> Pipelining:
    """One multiplexed connection for a plain ``redis://`` URL; redis-py pipelines for the
    others (TLS, Unix socket, cluster, options in a query string)."""
    try:
        return Multiplexed.from_url(
            settings.redis_url, settings.redis_timeout_s, on_write=metrics.redis_write
        )
    except ValueError:
        return AutoPipeline(redis, settings.redis_timeout_s, on_write=metrics.redis_write)


_SCHEMA_RECHECK_S = 2.0
_SCHEMA_WATCH_S = 30.0


async def schema_current(store: Store, *, quiet: bool = False) -> bool:
    """Whether PostgreSQL answers with this engine's schema (``Store.ping``, which keeps
    what it finds in ``store.schema``)."""
    try:
        await store.ping()
    except SchemaBehind as exc:
        if not quiet:
            log.error("schema_behind", missing=exc.missing, functions=exc.functions)
        return False
    except Exception as exc:
        if not quiet:
            log.warning("postgresql_not_ready", error=repr(exc))
        return False
    return True


async def watch_schema(store: Store, current: bool) -> None:
    """Check again every 2 s while the schema is not this engine's (``guichet migrate`` may
    run after the worker started, in a deploy), and every 30 s once it is (a database
    restored from an older backup). Meanwhile the worker is not ready, and refuses the
    requests that need the schema (503 with Retry-After) instead of failing them on a
    column or function it does not find; its sweeper waits. Each change is logged."""
    behind = store.schema.behind is not None
    while True:
        await asyncio.sleep(_SCHEMA_RECHECK_S if not current else _SCHEMA_WATCH_S)
        current = await schema_current(store, quiet=True)
        if (store.schema.behind is not None) != behind:
            behind = not behind
            if behind and store.schema.behind is not None:
                log.error(
                    "schema_behind",
                    missing=store.schema.behind.missing,
                    functions=store.schema.behind.functions,
                )
            else:
                log.info("schema_current")


_RESTART_WAIT_S = 1.0


async def supervised(
    task: str, run: Callable[[], Awaitable[None]], stop: asyncio.Event, metrics: Metrics
) -> None:
    """Run ``run()`` until ``stop`` is set, and start it again if it ends before. A
    background task that ended (a bug, or a cancellation that a library let out of one of
    its timeouts) would leave the worker serving without it, and say nothing: no draw run,
    no stale confirm settled, a schema change unseen. Each restart is logged
    (``background_task_ended``) and counted (``guichet_background_restarts_total``, the
    GuichetBackgroundRestarted alert). A cancellation of this task (the worker stopping)
    ends it."""
    while True:
        try:
            await run()
            if stop.is_set():
                return
            log.error("background_task_ended", task=task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if stop.is_set() or (current is not None and current.cancelling()):
                raise
            log.exception("background_task_ended", task=task)  # not this task's cancel
        except Exception:
            log.exception("background_task_ended", task=task)
        if stop.is_set():
            return
        metrics.background_restarts.labels(task).inc()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _RESTART_WAIT_S)


async def _stopped(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    """Stop a ``supervised`` task and wait for it. The stop event ends it even if a
    cancellation is lost: on Python 3.11, asyncio.wait_for (which redis-py uses for socket
    timeouts) can swallow one."""
    stop.set()
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def close_stores(
    pool: asyncpg.Pool, pipelining: Pipelining, redis: AnyRedis, timeout_s: float
) -> None:
    """Close each store's connections, each within ``timeout_s`` and whatever the others
    do: a PostgreSQL that stopped answering failed the pool's close (asyncpg waits for the
    server to end each connection), and the Redis connections were left open."""
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except Exception as exc:
        log.warning("store_close_failed", store="postgresql", error=repr(exc))
        pool.terminate()
    for name, close in (("redis", pipelining.aclose), ("redis", redis.aclose)):
        try:
            await asyncio.wait_for(close(), timeout_s)
        except Exception as exc:
            log.warning("store_close_failed", store=name, error=repr(exc))


def create_app(
    settings: Settings,
    *,
    clock: Clock = time.time,
    sweep: bool = True,
    bucket_clock: Clock | None = None,
) -> web.Application:
    """A wired app. Tests inject ``clock`` (the engine's time) and ``bucket_clock`` (the
    token buckets', Redis's own clock otherwise), and may leave the sweeper off."""
    metrics = Metrics()
    answer_unreadable_requests_as_problems(metrics)
    app = web.Application(client_max_size=settings.max_body_bytes)
    quiet_unreadable_bodies()
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[CLOCK] = clock
    contract = document(ROUTES)
    app[OPENAPI] = Body.of(json.dumps(contract).encode())
    app[BODIES] = {}
    app[REFILLS] = SingleFlight()
    app[DRAW_RECORDS] = {}
    schema = SchemaState()
    guarded = guard(metrics, settings.max_in_flight, schema)
    for route in ROUTES:
        query = query_parameters(contract, route) if route.checks_query else None
        handler = guarded(route.handler, route.path, route.sheds, route.schema, query)
        app.router.add_route(route.method, route.path, handler)
        if route.method == "GET":  # HTTP: a GET resource answers HEAD (aiohttp drops the body)
            app.router.add_route("HEAD", route.path, handler)
    metrics.expect_routes((route.path, route.method, route.sheds) for route in ROUTES)
    catch_all = unmatched(route.path for route in ROUTES)
    app.router.add_route("*", "/{path:.*}", guarded(catch_all, UNMATCHED, True, False, None))

    async def stores(app: web.Application) -> AsyncIterator[None]:
        redis = redis_client(settings)
        pool = await create_pool(
            settings.database_url,
            settings.pg_timeout_s,
            settings.pg_pool_size,
            settings.pg_statement_cache_size,
        )
        inventory = Inventory(
            redis,
            settings.redis_timeout_s,
            settings.retry_after_s,
            pipelining(settings, redis, metrics),
        )
        store = Store(
            pool,
            settings.pg_timeout_s,
            settings.retry_after_s,
            IdentityRules.of(settings),
            schema,
        )
        app[RESERVATIONS] = Reservations(settings, store, inventory, metrics, clock, bucket_clock)
        app[LOTTERY] = Lottery(app[RESERVATIONS])
        with contextlib.suppress(Exception):
            # Functions are also loaded on first use, so a Redis that is down now is fine.
            await inventory.load()
        # Checked before the first request is served; then watched.
        starts = iter([await schema_current(store)])  # a restart checks again in 2 s
        stop = asyncio.Event()
        watch = asyncio.create_task(
            supervised("schema", lambda: watch_schema(store, next(starts, False)), stop, metrics)
        )
        yield
        await _stopped(watch, stop)
        await close_stores(pool, inventory.pipelining, redis, settings.pg_timeout_s)

    async def background(app: web.Application) -> AsyncIterator[None]:
        if not sweep:
            yield
            return
        stop = asyncio.Event()
        task = asyncio.create_task(
            supervised("sweeper", lambda: sweeper.run(app[LOTTERY], stop), stop, metrics)
        )
        yield
        await _stopped(task, stop)

    app.cleanup_ctx.append(metrics.flushing)
    app.cleanup_ctx.append(stores)
    app.cleanup_ctx.append(background)
    return app
