"""Apply the numbered SQL migrations of ``sql/`` that a database has not seen yet.

Idempotent and safe to run from several processes at once: an advisory lock serialises them,
and each migration commits with its version in ``schema_migrations``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import asyncpg

from engine.logs import log

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
_LOCK_KEY = 0x6775696368  # "guich"
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def migrations(sql_dir: Path = SQL_DIR) -> list[tuple[int, Path]]:
    found = []
    for path in sorted(sql_dir.iterdir()):
        m = _NAME.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return found


@functools.cache
def shipped_migrations(sql_dir: Path = SQL_DIR) -> frozenset[int]:
    """The versions of the migrations this engine ships: the schema it needs."""
    return frozenset(version for version, _ in migrations(sql_dir))


async def migrate(dsn: str, timeout_s: float = 30.0, sql_dir: Path = SQL_DIR) -> list[int]:
    """Apply pending migrations; return the versions applied by this call."""
    conn = await asyncpg.connect(dsn, timeout=timeout_s, command_timeout=timeout_s)
    applied: list[int] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, path in migrations(sql_dir):
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    version,
                    path.name,
                )
            log.info("migration_applied", version=version, name=path.name)
            applied.append(version)
    finally:
        await conn.close()
    return applied
