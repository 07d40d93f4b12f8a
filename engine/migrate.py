"""Apply the SQL of ``sql/`` that a database has not seen yet.

Two kinds of files:
- ``sql/NNN_name.sql``, numbered migrations: each applied once, in order, never edited after
  it shipped (a database that ran it would never see the edit). Each is recorded with the
  SHA-256 of its text, and ``migrate`` refuses to go on if a file it applied has changed
  since: the change belongs in a new migration. (Databases migrated before the checksums
  were recorded take the text they find then as the one applied.)
- ``sql/functions/name.sql``, one stored function each (``CREATE OR REPLACE``), whose first
  line is ``-- version: N``: applied after the numbered migrations, and again when its
  version is above the one in force. A function is changed by editing its file and raising
  its version, not by restating it whole in a new migration; a change that also needs a
  column adds the column in a numbered migration, which runs first. An older engine's
  ``migrate`` (a host restarting during a rolling deploy) never puts an older version back.

Idempotent and safe to run from several processes at once: an advisory lock serialises them,
and each file commits with its record (``schema_migrations``, or ``schema_functions`` with the
version and the text's SHA-256).
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
MIGRATIONS_LOCK = 0x6775696368  # "guich"
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_FUNCTION = re.compile(r"^([a-z0-9_]+)\.sql$")
VERSION_LINE = re.compile(r"\A-- version: ([1-9][0-9]*)\n")


@dataclass(frozen=True)
class Function:
    """A file of ``sql/functions/``."""

    name: str
    version: int
    checksum: str  # SHA-256 of its text: the same version must keep the same text
    path: Path


@dataclass(frozen=True)
class Applied:
    """What one ``migrate`` call applied: migration versions, then function names."""

    versions: list[int] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)


def checksum(path: Path) -> str:
    """SHA-256 of a file's text (read in text mode: a checkout with CRLF line ends has the
    same)."""
    return hashlib.sha256(path.read_text(encoding="utf-8").encode()).hexdigest()


def migrations(sql_dir: Path = SQL_DIR) -> list[tuple[int, Path]]:
    found = []
    for path in sorted(sql_dir.iterdir()):
        m = _NAME.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return found


def functions(sql_dir: Path = SQL_DIR) -> list[Function]:
    """Each function file of ``sql/functions/``."""
    folder = sql_dir / "functions"
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        m = _FUNCTION.match(path.name)
        if m:
            text = path.read_text(encoding="utf-8")
            version = VERSION_LINE.match(text)
            if version is None:
                raise ValueError(f"{path} must begin with a '-- version: N' line")
            found.append(Function(m.group(1), int(version.group(1)), checksum(path), path))
    return found


@functools.cache
def shipped_migrations(sql_dir: Path = SQL_DIR) -> frozenset[int]:
    """The versions of the migrations this engine ships: the schema it needs."""
    return frozenset(version for version, _ in migrations(sql_dir))


@functools.cache
def shipped_functions(sql_dir: Path = SQL_DIR) -> dict[str, int]:
    """The version of each function this engine ships: the least it needs in force."""
    return {f.name: f.version for f in functions(sql_dir)}


async def migrate(
    dsn: str, timeout_s: float = 30.0, sql_dir: Path = SQL_DIR, lock_timeout_s: float = 5.0
) -> Applied:
    """Apply pending migrations, then the functions whose version is above the one in force.

    Each waits at most ``lock_timeout_s`` for a lock (a file may set less): a statement
    queued behind a long transaction on a live table would otherwise hold every request on
    that table behind it, up to ``timeout_s``. Then it fails, and can be run again."""
    lock_timeout = f"SET LOCAL lock_timeout = '{_ms(lock_timeout_s)}ms'"
    # Its own bounds, not those set on the role for the engine's short requests (behind
    # pgbouncer, deploy/pgbouncer.ini): a migration may build an index for a while.
    ms = str(_ms(timeout_s))
    conn = await asyncpg.connect(
        dsn,
        timeout=timeout_s,
        # The server's limit first, which says which statement it cancelled and why; the
        # client's, a little later, for a server that does not answer at all.
        command_timeout=timeout_s + 5,
        statement_cache_size=0,  # should it be pgbouncer after all, the check below answers
        server_settings={"statement_timeout": ms, "idle_in_transaction_session_timeout": ms},
    )
    applied = Applied()
    try:
        in_force = await conn.fetchval(
            "SELECT setting FROM pg_settings WHERE name = 'statement_timeout'"
        )
        if in_force != ms:
            # Settings sent at connect that did not arrive: a pooler (pgbouncer) between,
            # through which the session lock below would stay held on a server connection.
            raise RuntimeError(
                f"guichet migrate must connect to PostgreSQL itself, not through a pooler: "
                f"its statement_timeout is {in_force} ms, not {ms}; set "
                "GUICHET_MIGRATE_DATABASE_URL (deploy/pgbouncer.ini)"
            )
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATIONS_LOCK)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now(),
                   checksum text);
               CREATE TABLE IF NOT EXISTS schema_functions (
                   name text PRIMARY KEY,
                   version integer NOT NULL,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        has_checksums = await conn.fetchval(
            """SELECT true FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = 'schema_migrations'
                 AND column_name = 'checksum'"""
        )
        if not has_checksums:
            # Once, on a database of an engine before checksums. ALTER takes the table's
            # exclusive lock, which every worker's schema check then waits behind: not at
            # every migrate, and not for longer than a lock may be waited for.
            async with conn.transaction():
                await conn.execute(lock_timeout)
                await conn.execute("ALTER TABLE schema_migrations ADD COLUMN checksum text")
        done = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        for version, path in migrations(sql_dir):
            if version in done:
                await _check_applied(conn, version, path, done[version])
                continue
            async with conn.transaction():
                await conn.execute(lock_timeout)
                await conn.execute(path.read_text(encoding="utf-8"))
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    version,
                    path.name,
                    checksum(path),
                )
            log.info("migration_applied", version=version, name=path.name)
            applied.versions.append(version)
        in_force = {
            r["name"]: (r["version"], r["checksum"])
            for r in await conn.fetch("SELECT name, version, checksum FROM schema_functions")
        }
        for f in functions(sql_dir):
            version, recorded = in_force.get(f.name, (0, ""))
            if f.version < version:
                continue  # a newer engine's version is in force: keep it
            if f.version == version:
                if f.checksum != recorded:
                    raise RuntimeError(
                        f"{f.path} changed without a new version: raise its '-- version:'"
                    )
                continue
            async with conn.transaction():
                await conn.execute(lock_timeout)
                await conn.execute(f.path.read_text(encoding="utf-8"))
                await conn.execute(
                    """INSERT INTO schema_functions (name, version, checksum)
                       VALUES ($1, $2, $3)
                       ON CONFLICT (name) DO UPDATE
                       SET version = $2, checksum = $3, applied_at = now()""",
                    f.name,
                    f.version,
                    f.checksum,
                )
            log.info("function_applied", name=f.name, version=f.version)
            applied.functions.append(f.name)
    finally:
        await conn.close()
    return applied


def _ms(seconds: float) -> int:
    """Milliseconds for a PostgreSQL limit, never 0 (which is none)."""
    return max(1, round(seconds * 1000))


async def _check_applied(
    conn: asyncpg.Connection, version: int, path: Path, recorded: str | None
) -> None:
    """Refuse a migration file changed since it was applied: the databases that ran it
    would never see the change, and the others would differ from them."""
    found = checksum(path)
    if recorded is None:
        # Applied before checksums were recorded: the text found now is taken as applied.
        await conn.execute(
            "UPDATE schema_migrations SET checksum = $2 WHERE version = $1", version, found
        )
    elif recorded != found:
        raise RuntimeError(
            f"{path} changed after this database applied it (SHA-256 {recorded[:12]}..., now "
            f"{found[:12]}...): put it back as it was, and make the change in a new migration"
        )
