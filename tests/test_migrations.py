"""Migrations apply on an empty database, again with no effect, and upgrade a database that
already holds data (a draw release published before draws had seeds)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from engine import draw
from engine.migrate import SQL_DIR, migrate, migrations
from tests.conftest import DATABASE_URL

SCRATCH = "guichet_migrations_test"


@pytest.fixture
async def scratch() -> AsyncIterator[str]:
    admin = await asyncpg.connect(DATABASE_URL)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {SCRATCH}")
        await admin.execute(f"CREATE DATABASE {SCRATCH}")
        yield DATABASE_URL.rsplit("/", 1)[0] + f"/{SCRATCH}"
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {SCRATCH} WITH (FORCE)")
        await admin.close()


async def test_fresh_then_idempotent(scratch: str) -> None:
    applied = await migrate(scratch)
    assert applied == [v for v, _ in migrations()]
    assert await migrate(scratch) == []


async def test_upgrade_keeps_and_seeds_existing_draw_releases(scratch: str, tmp_path: Path) -> None:
    for _, path in migrations()[:2]:
        shutil.copy(path, tmp_path / path.name)
    assert await migrate(scratch, sql_dir=tmp_path) == [1, 2]
    conn = await asyncpg.connect(scratch)
    try:
        await conn.execute(
            """INSERT INTO sites VALUES ('s', 'S', 'UTC');
               INSERT INTO procedures VALUES ('s', 'p', 'P');
               INSERT INTO releases (id, site_id, procedure_id, mode, registration_opens_at,
                   registration_closes_at, draw_at)
               VALUES ('rold00000000d', 's', 'p', 'draw', now(), now() + interval '1 day',
                   now() + interval '2 days')"""
        )
        assert await migrate(scratch, sql_dir=SQL_DIR) == [v for v, _ in migrations()][2:]
        seed, commitment = await conn.fetchrow(
            "SELECT seed, seed_commitment FROM releases WHERE id = 'rold00000000d'"
        )
        assert len(seed) == 64 and draw.seed_commitment(seed) == commitment
    finally:
        await conn.close()


async def test_book_hold_plans_each_call(scratch: str) -> None:
    """A plan cached while `bookings` was empty scanned every confirmed booking at every
    confirm once the table filled (sql/005_book_custom_plans.sql)."""
    await migrate(scratch)
    conn = await asyncpg.connect(scratch)
    try:
        config = await conn.fetchval("SELECT proconfig FROM pg_proc WHERE proname = 'book_hold'")
    finally:
        await conn.close()
    assert config == ["plan_cache_mode=force_custom_plan"]
