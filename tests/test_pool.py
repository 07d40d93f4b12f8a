"""The PostgreSQL pool skips asyncpg's reset query on release (engine/store.py): check that a
connection still comes back clean after a transaction that failed, or that was left open."""

from __future__ import annotations

import asyncpg
import pytest

from engine.errors import StoreUnavailable
from engine.store import Store, create_pool
from tests.conftest import statements_run


async def test_a_connection_comes_back_without_locks_or_transaction(database: str) -> None:
    pool = await create_pool(database, timeout_s=5.0, size=1)
    try:
        with pytest.raises(RuntimeError):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(4242)")
                await conn.execute("SET LOCAL statement_timeout = '123s'")
                raise RuntimeError("the request failed mid-transaction")
        # A connection released with its transaction still open (a cancelled request).
        conn = await pool.acquire()
        await conn.execute("BEGIN")
        await conn.execute("SELECT pg_advisory_xact_lock(4243)")
        await pool.release(conn)

        async with pool.acquire() as conn:  # size 1: the same connection each time
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SHOW statement_timeout") == "5s"
            # Prepared statements are planned afresh at each run: a generic plan made on an
            # empty bookings table scans every confirmed booking once it is full.
            assert await conn.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND objid IN (4242, 4243)"
            )
            assert held == 0
    finally:
        await pool.close()


async def test_the_reset_query_is_really_skipped(database: str) -> None:
    """Guards the measured saving: a release must not cost a round trip."""
    pool = await create_pool(database, timeout_s=5.0, size=1)
    try:

        async def select() -> None:
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")

        await select()
        assert await statements_run(pool, select) == 1
    finally:
        await pool.close()


async def test_a_server_out_of_resources_is_unavailable_not_a_bug(database: str) -> None:
    """Class 53 (disk full, out of memory, a configured limit: here temp_file_limit, which
    a real sort can go over) is PostgreSQL unable to serve now: 503, as a timeout is."""
    pool = await create_pool(database, timeout_s=5.0, size=1)
    store = Store(pool, timeout_s=5.0, retry_after_s=2)
    try:
        with pytest.raises(StoreUnavailable) as raised:
            async with store._transaction() as conn:
                await conn.execute("SET LOCAL work_mem = '64kB'; SET LOCAL temp_file_limit = 64")
                await conn.fetch("SELECT g FROM generate_series(1, 100000) g ORDER BY g DESC")
        assert isinstance(raised.value.__cause__, asyncpg.InsufficientResourcesError)
        assert raised.value.retry_after == 2
    finally:
        await pool.close()
