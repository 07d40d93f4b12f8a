"""Migrations apply on an empty database, again with no effect, and upgrade a database that
already holds data (a draw release published before draws had seeds); an engine on a schema
behind its own is not ready."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from engine import draw
from engine.app import create_app
from engine.appkeys import RESERVATIONS
from engine.errors import NotCommitted, SchemaBehind
from engine.migrate import (
    MIGRATIONS_LOCK,
    SQL_DIR,
    VERSION_LINE,
    Applied,
    functions,
    migrate,
    migrations,
)
from engine.sweeper import sweep
from tests.api import ADMIN, Api
from tests.conftest import DATABASE_URL, FakeClock, make_settings
from tests.procs import poll

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
    assert applied.versions == [v for v, _ in migrations()]
    assert applied.functions == [f.name for f in functions()] != []
    assert await migrate(scratch) == Applied()


@asynccontextmanager
async def engine_on(database_url: str) -> AsyncIterator[TestClient]:
    app = create_app(make_settings(database_url=database_url), sweep=False)
    async with TestClient(TestServer(app)) as client:
        yield client


async def not_ready(client: TestClient) -> dict[str, Any]:
    """/readyz's 503 problem, which says what each store is."""
    r = await client.get("/readyz")
    assert r.status == 503 and r.headers["Retry-After"], await r.text()
    return await r.json()  # type: ignore[no-any-return]


async def test_an_engine_is_not_ready_on_a_schema_behind_its_own(
    scratch: str, tmp_path: Path
) -> None:
    """A worker started before `guichet migrate` (or against a database it never ran on)
    answers /readyz 503 and says which migration is missing, so that no traffic is sent
    to it. It may get traffic all the same (a proxy that does not read /readyz): what needs
    the schema is refused, 503 with Retry-After, rather than failed on a column or function
    it does not find (500), and its sweeper waits. Once migrated it serves, without a
    restart."""
    for _, path in migrations()[:-1]:
        shutil.copy(path, tmp_path / path.name)
    await migrate(scratch, sql_dir=tmp_path)
    latest = migrations()[-1][0]
    async with engine_on(scratch) as client:
        body = await not_ready(client)
        assert (body["postgresql"], body["redis"]) == ("schema-behind", "ok")
        assert f"lacks migration(s) {latest} and function(s) book_hold of" in body["detail"]
        refused = await client.get("/v1/sites")
        assert refused.status == 503 and refused.headers["Retry-After"]
        assert "run `guichet migrate`" in (await refused.json())["detail"]
        for ops in ("/healthz", "/metrics", "/openapi.json"):
            assert (await client.get(ops)).status == 200
        report = await sweep(client.app[RESERVATIONS], reconcile=True)
        assert isinstance(report.failure, SchemaBehind) and not report.swept
        await migrate(scratch)

        async def serving() -> bool:  # the worker checks again by itself, every 2 s
            return (await client.get("/v1/sites")).status == 200

        await poll(serving, lambda: "the worker did not notice the migration", within_s=10)
        r = await client.get("/readyz")
        assert r.status == 200, await r.text()


async def test_a_function_is_applied_again_when_its_version_rises(
    scratch: str, tmp_path: Path
) -> None:
    """sql/functions/: applied after the migrations, again when its version rises. An older
    version (an older engine's migrate, in a rolling deploy) never replaces a newer one, and
    a text changed without a new version is refused."""
    (tmp_path / "functions").mkdir()
    probe = tmp_path / "functions" / "guichet_probe.sql"
    shutil.copy(migrations()[0][1], tmp_path)

    def write(version: int, value: int) -> None:
        probe.write_text(
            f"-- version: {version}\nCREATE OR REPLACE FUNCTION guichet_probe() RETURNS int"
            f" LANGUAGE sql AS 'SELECT {value}';"
        )

    write(1, 1)
    assert await migrate(scratch, sql_dir=tmp_path) == Applied([1], ["guichet_probe"])
    assert await migrate(scratch, sql_dir=tmp_path) == Applied()
    write(2, 2)
    assert await migrate(scratch, sql_dir=tmp_path) == Applied([], ["guichet_probe"])
    write(1, 1)  # an older engine's
    assert await migrate(scratch, sql_dir=tmp_path) == Applied()
    write(2, 3)
    with pytest.raises(RuntimeError, match="changed without a new version"):
        await migrate(scratch, sql_dir=tmp_path)
    probe.write_text("CREATE OR REPLACE FUNCTION guichet_probe() RETURNS int AS 'SELECT 4';")
    with pytest.raises(ValueError, match="version"):
        await migrate(scratch, sql_dir=tmp_path)
    conn = await asyncpg.connect(scratch)
    try:
        assert await conn.fetchval("SELECT guichet_probe()") == 2
    finally:
        await conn.close()


def test_each_version_of_a_function_names_one_text() -> None:
    """A function's text changed under the same version would be refused by the first host's
    migrate, at deploy: caught here, from the repository's history of each file (and the
    working tree's). Versions never go down either."""
    root = SQL_DIR.parent
    for f in functions():
        rel = f.path.relative_to(root).as_posix()
        log = subprocess.run(
            ["git", "log", "--format=%H", "--", rel], cwd=root, capture_output=True, text=True
        )
        if log.returncode != 0:
            pytest.skip("not a git checkout")
        texts = {f.version: f.checksum}
        for commit in log.stdout.split():
            shown = subprocess.run(
                ["git", "show", f"{commit}:{rel}"], cwd=root, capture_output=True, text=True
            )
            version = VERSION_LINE.match(shown.stdout)
            if shown.returncode != 0 or version is None:
                continue  # not there, or from before versions
            checksum = hashlib.sha256(shown.stdout.encode()).hexdigest()
            v = int(version.group(1))
            assert v <= f.version, f"{rel}: version {v} at {commit[:7]}, {f.version} now"
            assert texts.setdefault(v, checksum) == checksum, (
                f"{rel}: version {v} names two texts (one at {commit[:7]}): raise its version"
            )


async def test_an_engine_is_not_ready_until_its_version_of_a_function_is_in_force(
    scratch: str,
) -> None:
    """A function this engine ships, in a version above the one in force, makes it not
    ready; a newer version in force (a rolling deploy's newer engine) does not. A database
    migrated before sql/functions/ existed says only what it lacks."""
    await migrate(scratch)
    conn = await asyncpg.connect(scratch)
    try:
        await conn.execute("DROP TABLE schema_functions")
        async with engine_on(scratch) as client:
            body = await not_ready(client)
            assert "(PostgreSQL lacks function(s) book_hold of this engine" in body["detail"]
            assert (await migrate(scratch)).functions == ["book_hold"]
            assert (await client.get("/readyz")).status == 200
            await conn.execute("UPDATE schema_functions SET version = 0")
            body = await not_ready(client)
            assert "lacks function(s) book_hold of this engine" in body["detail"]
            await conn.execute("UPDATE schema_functions SET version = 99")
            r = await client.get("/readyz")
            assert r.status == 200, await r.text()
    finally:
        await conn.close()


async def test_an_engine_starts_and_is_not_ready_without_its_database(scratch: str) -> None:
    async with engine_on(scratch + "_missing") as client:
        body = await not_ready(client)
        assert (body["postgresql"], body["redis"]) == ("unavailable", "ok")


async def test_a_migration_waits_for_a_lock_a_bounded_time(scratch: str, tmp_path: Path) -> None:
    """A transaction left open on a live table (a report, a console) holds a lock that a
    migration needs: the migration gives up after its lock timeout, and does not queue
    every request on the table behind itself until its own statement timeout."""
    shutil.copy(migrations()[0][1], tmp_path / migrations()[0][1].name)
    assert (await migrate(scratch, sql_dir=tmp_path)).versions == [1]
    (tmp_path / "002_add.sql").write_text("ALTER TABLE sites ADD COLUMN note text;")
    conn = await asyncpg.connect(scratch)
    try:
        async with conn.transaction():
            await conn.execute("SELECT * FROM sites")  # holds ACCESS SHARE until it ends
            with pytest.raises(asyncpg.LockNotAvailableError):
                await migrate(scratch, sql_dir=tmp_path, timeout_s=60, lock_timeout_s=0.2)
        assert (await migrate(scratch, sql_dir=tmp_path)).versions == [2]
    finally:
        await conn.close()


async def test_upgrade_keeps_and_seeds_existing_draw_releases(scratch: str, tmp_path: Path) -> None:
    for _, path in migrations()[:2]:
        shutil.copy(path, tmp_path / path.name)
    assert (await migrate(scratch, sql_dir=tmp_path)).versions == [1, 2]
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
        assert (await migrate(scratch)).versions == [v for v, _ in migrations()][2:]
        seed, commitment = await conn.fetchrow(
            "SELECT seed, seed_commitment FROM releases WHERE id = 'rold00000000d'"
        )
        assert len(seed) == 64 and draw.seed_commitment(seed) == commitment
    finally:
        await conn.close()


async def test_upgrade_flags_the_entries_earlier_draws_excluded(
    scratch: str, tmp_path: Path
) -> None:
    """sql/007 reads each draw record already written once: its excluded entries get the
    flag, and a withdrawal by the entry's person does not."""
    versions = [v for v, _ in migrations()]
    upto = versions.index(7)
    for _, path in migrations()[:upto]:
        shutil.copy(path, tmp_path / path.name)
    assert (await migrate(scratch, sql_dir=tmp_path)).versions == versions[:upto]
    conn = await asyncpg.connect(scratch)
    try:
        await conn.execute(
            """INSERT INTO sites VALUES ('s', 'S', 'UTC');
               INSERT INTO procedures VALUES ('s', 'p', 'P');
               INSERT INTO releases (id, site_id, procedure_id, mode, registration_opens_at,
                   registration_closes_at, draw_at, seed, seed_commitment)
               VALUES ('rold00000000d', 's', 'p', 'draw', now() - interval '2 days',
                   now() - interval '1 day', now(), 'x', 'y');
               INSERT INTO entries (id, release_id, procedure_id, digest, token_hash,
                   identity_hash, email_hash, family_name, given_names, birth_date, status)
               SELECT 'e' || n, 'rold00000000d', 'p', 'd' || n, '\\x00', sha256(n::text::bytea),
                   '\\x00', 'F', 'G', '1990-01-01', s
               FROM (VALUES (1, 'withdrawn'), (2, 'withdrawn'), (3, 'not-drawn')) v(n, s);
               INSERT INTO draws (release_id, record, places, allocated, carried)
               VALUES ('rold00000000d', '{"excluded": ["d1"]}', 0, 0, 0)"""
        )
        assert (await migrate(scratch)).versions == versions[upto:]
        flags = await conn.fetch("SELECT id, excluded FROM entries ORDER BY id")
        assert [(r["id"], r["excluded"]) for r in flags] == [
            ("e1", True),
            ("e2", False),
            ("e3", False),
        ]
    finally:
        await conn.close()


BOOK = (
    "SELECT outcome FROM book_hold($1, 'rplans000000f.000', 'rplans000000f', 'p', 'online', $2,"
    " '\\x00', $3, $4, 'F', 'G', '1990-01-01', '\\x00', '10.0.0.0/24', '30 days', 3, 3, 3)"
)
FILL = """
INSERT INTO bookings (reference, slot_id, release_id, procedure_id, channel, hold_id,
                      hold_token_hash, identity_hash, email_hash, family_name, given_names,
                      birth_date, cancel_token_hash, client_net)
SELECT 'F' || n, 'rplans000000f.000', 'rplans000000f', 'p', 'online', 'fill' || n, '\\x00',
       sha256(('fi' || n)::bytea), sha256(('fe' || n)::bytea), 'F', 'G', '1990-01-01', '\\x00',
       '10.0.0.0/24'
  FROM generate_series(1, $1) n
"""


async def test_book_hold_plans_made_on_an_empty_table_stay_good(scratch: str) -> None:
    """book_hold's plans, made while `bookings` was empty and analysed empty, must not read
    the table once it has filled: a plan that did scanned every confirmed booking at every
    confirm (sql/006_book_generic_plans.sql). The connection asks for custom plans, as the
    engine's pool does, and the function must keep its own plans all the same. (Reads the
    statistics with ``pg_stat_force_next_flush``: PostgreSQL 15 or later.)"""
    await migrate(scratch)
    conn = await asyncpg.connect(scratch, server_settings={"plan_cache_mode": "force_custom_plan"})
    other = await asyncpg.connect(scratch)
    try:
        await other.execute(
            """ALTER TABLE bookings SET (autovacuum_enabled = false);
               INSERT INTO sites VALUES ('s', 'S', 'UTC');
               INSERT INTO procedures VALUES ('s', 'p', 'P');
               INSERT INTO releases (id, site_id, procedure_id, mode, opens_at)
               VALUES ('rplans000000f', 's', 'p', 'fcfs', now());
               INSERT INTO slots (id, release_id, starts_at, duration_minutes, capacity)
               VALUES ('rplans000000f.000', 'rplans000000f', now() + interval '1 day', 20,
                       10000);
               ANALYZE bookings"""
        )

        async def book(n: int) -> None:
            identity = hashlib.sha256(b"i%d" % n).digest()
            email = hashlib.sha256(b"e%d" % n).digest()
            assert await conn.fetchval(BOOK, f"R{n}", f"h{n}", identity, email) == "booked"
            # The same person again: the statements for a person already booked run too.
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.fetchval(BOOK, f"S{n}", f"g{n}", identity, email)

        for n in range(10):  # PL/pgSQL keeps a generic plan after five calls
            await book(n)
        await other.execute(FILL, 5000)  # from another session: conn keeps its plans

        async def reads() -> tuple[int, int, int]:
            # conn's counts reach the shared statistics when it is next idle.
            await conn.execute("SELECT pg_stat_force_next_flush()")
            await conn.execute("SELECT 1")
            await other.execute("SELECT pg_stat_clear_snapshot()")
            row = await other.fetchrow(
                """SELECT t.seq_tup_read, t.idx_scan,
                          (SELECT sum(i.idx_tup_read) FROM pg_stat_user_indexes i
                            WHERE i.relid = t.relid) AS idx_tup_read
                     FROM pg_stat_user_tables t WHERE t.relname = 'bookings'"""
            )
            return row["seq_tup_read"], row["idx_scan"], row["idx_tup_read"]

        seq_before, scans_before, idx_before = await reads()
        for n in range(10, 30):
            await book(n)
        seq_after, scans_after, idx_after = await reads()
        config = await other.fetchval("SELECT proconfig FROM pg_proc WHERE proname = 'book_hold'")
    finally:
        await conn.close()
        await other.close()
    assert "plan_cache_mode=auto" in config  # its plans are kept: planning was half its cost
    assert scans_after - scans_before >= 40  # the counts were taken
    assert seq_after - seq_before == 0
    assert (idx_after - idx_before) / 40 < 10  # a handful per confirm, not 5 000


async def test_a_migration_changed_after_it_was_applied_is_refused(
    scratch: str, tmp_path: Path
) -> None:
    """A numbered migration is applied once: an edit after that never reaches the
    databases that ran it, and they would differ from those migrated after. Each is
    recorded with its text's SHA-256, and migrate refuses to go on, saying which file.
    A database migrated before the checksums were kept takes the text it finds then."""
    for _, path in migrations()[:2]:
        shutil.copy(path, tmp_path / path.name)
    assert (await migrate(scratch, sql_dir=tmp_path)).versions == [1, 2]
    second = tmp_path / migrations()[1][1].name
    text = second.read_text()
    second.write_text(text + "\n-- a comment added after it shipped\n")
    with pytest.raises(RuntimeError, match=f"{second.name} changed after"):
        await migrate(scratch, sql_dir=tmp_path)
    second.write_text(text.replace("\n", "\r\n"))  # a Windows checkout: the same text
    assert await migrate(scratch, sql_dir=tmp_path) == Applied()
    conn = await asyncpg.connect(scratch)
    try:
        await conn.execute("UPDATE schema_migrations SET checksum = NULL")  # an older migrate
        assert await migrate(scratch, sql_dir=tmp_path) == Applied()
        recorded = await conn.fetch("SELECT version, checksum FROM schema_migrations")
        assert {r["version"]: r["checksum"] for r in recorded} == {
            v: hashlib.sha256(p.read_text().encode()).hexdigest() for v, p in migrations()[:2]
        }
    finally:
        await conn.close()
    second.write_text(text + "\n-- and now\n")
    with pytest.raises(RuntimeError, match="changed after"):
        await migrate(scratch, sql_dir=tmp_path)


async def test_migrate_takes_its_time_limits_and_says_what_is_wrong(scratch: str) -> None:
    """`guichet migrate --timeout --lock-timeout`: a migration building an index on a
    large table may need more than 30 s. Here another migrate holds the migrations' lock
    (a deploy on another host), so one with a 1 s limit gives up, in one line that says
    what happened, not a traceback."""
    env = {**os.environ, "GUICHET_DATABASE_URL": scratch}
    env.pop("GUICHET_MIGRATE_DATABASE_URL", None)

    async def run(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "engine", "migrate", *args),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    other = await asyncpg.connect(scratch)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", MIGRATIONS_LOCK)
        code, _, err = await run("--timeout", "1")
        assert code == 1, err
        assert "statement timeout" in err and "Traceback" not in err, err
    finally:
        await other.close()
    code, out, err = await run("--timeout", "600", "--lock-timeout", "0.5")
    assert code == 0, err
    assert f"{len(migrations())} migration(s) applied" in out
    assert (await run("--timeout", "0"))[0] == 2  # not a time limit


async def test_a_column_added_while_workers_serve_fails_no_transaction(scratch: str) -> None:
    """A migration adds a column to a table the workers read in transactions, while they
    serve (a rolling deploy). A statement read with * that a pooled connection prepared
    before then no longer returns what it did: asyncpg cannot prepare it again in a
    transaction, and the staff's next change of the release failed with 500, once per
    pooled connection. The release's columns are named now; and any statement of the
    kind left (a function's result changed) is a 503 to retry, not a 500."""
    await migrate(scratch)
    clock = FakeClock()
    app = create_app(make_settings(database_url=scratch, pg_pool_size=1), clock=clock, sweep=False)
    async with TestClient(TestServer(app)) as client:
        api = Api(client, clock)
        await api.site()
        release = await api.publish([2])
        path = f"/v1/admin/releases/{release['id']}"
        change = {"slots": [{"id": release["slots"][0]["id"], "capacity": 3}]}
        assert (await api.call("PATCH", path, change, ADMIN)).status == 200
        conn = await asyncpg.connect(scratch)
        try:
            await conn.execute("ALTER TABLE releases ADD COLUMN note text")
            change["slots"][0]["capacity"] = 4
            reply = await api.call("PATCH", path, change, ADMIN)
            assert reply.status == 200, reply.body
            store = client.app[RESERVATIONS].store
            async with store._transaction() as pooled:  # the pool's one connection
                await pooled.fetch("SELECT * FROM releases")
            await conn.execute("ALTER TABLE releases ADD COLUMN other_note text")
            with pytest.raises(NotCommitted):
                async with store._transaction() as pooled:
                    await pooled.fetch("SELECT * FROM releases")
            async with store._transaction() as pooled:  # prepared again
                assert "other_note" in (await pooled.fetch("SELECT * FROM releases"))[0]
        finally:
            await conn.close()


async def test_migrate_takes_no_lock_on_its_records_when_nothing_is_to_add(scratch: str) -> None:
    """Every worker's schema check reads schema_migrations. A migrate that took the table's
    exclusive lock at each run (to add the checksum column if missing) waited behind any
    open reader of it, a backup's say, and every worker's check waited behind the migrate:
    not ready, all of them. It adds the column once, waiting for the lock no longer than
    any migration does."""
    await migrate(scratch)
    reader = await asyncpg.connect(scratch, statement_cache_size=0)
    try:
        async with reader.transaction():
            await reader.fetch("SELECT * FROM schema_migrations")  # a backup, a console
            assert await migrate(scratch, timeout_s=2) == Applied()
            await reader.execute("SELECT 1")
        await reader.execute("ALTER TABLE schema_migrations DROP COLUMN checksum")  # older
        async with reader.transaction():
            await reader.fetch("SELECT * FROM schema_migrations")
            with pytest.raises(asyncpg.LockNotAvailableError):
                await migrate(scratch, timeout_s=60, lock_timeout_s=0.2)
        assert await migrate(scratch) == Applied()
        assert (
            await reader.fetchval("SELECT count(*) FROM schema_migrations WHERE checksum IS NULL")
            == 0
        )
    finally:
        await reader.close()
