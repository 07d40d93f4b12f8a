"""Apply the SQL of ``sql/`` that a database has not seen yet.

Two kinds of files:
- ``sql/NNN_name.sql``, numbered migrations: each applied once, in order, never edited after
  it shipped (a database that ran it would never see the edit).
- ``sql/functions/name.sql``, one stored function each (``CREATE OR REPLACE``): applied after
  the numbered migrations, and again whenever its text changes. A function is changed by
  editing its file, not by restating it whole in a new migration; a change that also needs a
  column adds the column in a numbered migration, which runs first.

Idempotent and safe to run from several processes at once: an advisory lock serialises them,
and each file commits with its record (``schema_migrations``, or ``schema_functions`` with the
text's SHA-256).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from engine.logs import log

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
_LOCK_KEY = 0x6775696368  # "guich"
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_FUNCTION = re.compile(r"^([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Applied:
    """What one ``migrate`` call applied: migration versions, then function names."""

    versions: list[int] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)


def migrations(sql_dir: Path = SQL_DIR) -> list[tuple[int, Path]]:
    found = []
    for path in sorted(sql_dir.iterdir()):
        m = _NAME.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return found


def functions(sql_dir: Path = SQL_DIR) -> list[tuple[str, str, Path]]:
    """Each function file of ``sql/functions/``: its name, its text's SHA-256, its path."""
    folder = sql_dir / "functions"
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        m = _FUNCTION.match(path.name)
        if m:
            found.append((m.group(1), hashlib.sha256(path.read_bytes()).hexdigest(), path))
    return found


@functools.cache
def shipped_migrations(sql_dir: Path = SQL_DIR) -> frozenset[int]:
    """The versions of the migrations this engine ships: the schema it needs."""
    return frozenset(version for version, _ in migrations(sql_dir))


@functools.cache
def shipped_functions(sql_dir: Path = SQL_DIR) -> frozenset[tuple[str, str]]:
    """(name, checksum) of each function this engine ships: the versions it needs."""
    return frozenset((name, checksum) for name, checksum, _ in functions(sql_dir))


async def migrate(dsn: str, timeout_s: float = 30.0, sql_dir: Path = SQL_DIR) -> Applied:
    """Apply pending migrations, then the functions whose text changed since last applied."""
    conn = await asyncpg.connect(dsn, timeout=timeout_s, command_timeout=timeout_s)
    applied = Applied()
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now());
               CREATE TABLE IF NOT EXISTS schema_functions (
                   name text NOT NULL,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                   PRIMARY KEY (name, checksum))"""
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
            applied.versions.append(version)
        # Every version of a function ever applied stays listed, so that readiness can tell
        # an older engine, during a rolling deploy, that its version was applied (a newer
        # one replaced it, compatibly); the latest applied is the one in force.
        current = {
            r["name"]: r["checksum"]
            for r in await conn.fetch(
                """SELECT DISTINCT ON (name) name, checksum FROM schema_functions
                   ORDER BY name, applied_at DESC"""
            )
        }
        for name, checksum, path in functions(sql_dir):
            if current.get(name) == checksum:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(
                    """INSERT INTO schema_functions (name, checksum) VALUES ($1, $2)
                       ON CONFLICT (name, checksum) DO UPDATE SET applied_at = clock_timestamp()""",
                    name,
                    checksum,
                )
            log.info("function_applied", name=name, checksum=checksum[:12])
            applied.functions.append(name)
    finally:
        await conn.close()
    return applied
