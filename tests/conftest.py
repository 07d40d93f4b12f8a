"""Fixtures: real PostgreSQL and Redis (from scripts/devstack.py's env file), each test clean.

The test database is rebuilt from the migrations once per session; before each test every
table is truncated and the test Redis database flushed. Time is an injected clock that moves
only when a test advances it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from engine.app import create_app
from engine.migrate import migrate
from engine.settings import Rate, Settings
from tests.api import ADMIN_TOKEN, Api

DATABASE_URL = os.environ.get(
    "GUICHET_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/guichet_test"
)
REDIS_URL = os.environ.get("GUICHET_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TABLES = "audit_log, bookings, slots, releases, procedures, sites"


class FakeClock:
    """Wall-clock seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def statements_run(pool: asyncpg.Pool, work: Callable[[], Awaitable[object]]) -> int:
    """How many statements the one connection of ``pool`` (size 1) ran during ``work``."""
    async with pool.acquire() as conn:
        raw: asyncpg.Connection = conn._con  # type: ignore[attr-defined]
    before = raw._protocol.queries_count
    await work()
    return int(raw._protocol.queries_count - before)


def make_settings(**overrides: object) -> Settings:
    base: dict[str, object] = {
        "secret": b"test-secret-" + b"x" * 32,
        "database_url": DATABASE_URL,
        "redis_url": REDIS_URL,
        "admin_token": ADMIN_TOKEN,
        "pow_difficulty": 4,
        "pow_puzzles": 2,
        "trusted_proxies": frozenset({ipaddress.ip_network("127.0.0.0/8")}),
        # Generous limits: tests of the limits themselves set their own.
        "limit_address": Rate(100_000, 1),
        "limit_net": Rate(100_000, 1),
        "limit_net48": Rate(100_000, 1),
        "limit_session": Rate(100_000, 1),
        "limit_identity": Rate(100_000, 1),
        "limit_hold": Rate(100_000, 1),
        "max_unspent_challenges": 1000,
        "max_live_holds": 1000,
        "redis_timeout_s": 2.0,
        "pg_timeout_s": 5.0,
    }
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def database() -> str:
    async def reset() -> None:
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
        finally:
            await conn.close()
        await migrate(DATABASE_URL)

    asyncio.run(reset())
    return DATABASE_URL


@pytest.fixture
async def clean(database: str) -> AsyncIterator[None]:
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        await r.flushdb()
    finally:
        await r.aclose()
    yield


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
async def client(settings: Settings, clock: FakeClock, clean: None) -> AsyncIterator[TestClient]:
    app = create_app(settings, clock=clock, bucket_clock=clock, sweep=False)
    async with TestClient(TestServer(app)) as c:
        yield c


@pytest.fixture
def api(client: TestClient, clock: FakeClock) -> Api:
    return Api(client, clock)


@pytest.fixture
async def pg(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database)
    yield conn
    await conn.close()


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(REDIS_URL)
    yield r
    await r.aclose()
