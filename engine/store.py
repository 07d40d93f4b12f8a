"""PostgreSQL: the truth. All SQL of the engine lives here.

Every call is bounded: the pool's acquire has a timeout, each statement has a client-side
timeout, and the server itself aborts statements and idle transactions that outlive them, so
a transaction that did not commit within ``pg_timeout_s`` never will (the sweeper relies on it).
asyncpg's errors are mapped to domain errors in ``_connection`` and ``_map_integrity``, only there.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo

import asyncpg

from engine import draw, logs
from engine.errors import (
    IdentityAlreadyBooked,
    NotCommitted,
    NotFound,
    NotOpen,
    PreconditionFailed,
    RateLimited,
    SchemaBehind,
    SlotFull,
    StoreUnavailable,
    ValidationFailed,
)
from engine.migrate import shipped_functions, shipped_migrations
from engine.models import (
    WINDOWS,
    Booking,
    CancelledBy,
    DrawOutcome,
    Entry,
    Procedure,
    Release,
    Site,
    Slot,
    release_etag,
)
from engine.settings import Settings

DRAW_TIMEOUT_S = 300.0
# A use of a pooled connection may take this many of its statements' limits in all.
CALLS_PER_DEADLINE = 4
_DRAW_LIMITS = (
    "SET LOCAL statement_timeout = '300s'; SET LOCAL idle_in_transaction_session_timeout = '300s'"
)


class DrawRaced(Exception):
    """A booking committed during a draw took a winner over a cap, or booked a winner the
    procedure after the draw read its entries (the one-active-booking index), or confirms
    in flight kept the booking caps' lock from the draw: the draw rolls back and runs
    again at the next sweep."""


T = TypeVar("T")

_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # Class 53: out of connections, disk, memory or a configured limit; class 58: an I/O
    # error. The server cannot serve now; nothing is wrong with the request.
    asyncpg.InsufficientResourcesError,
    asyncpg.PostgresSystemError,
    # Class 57: a timeout (query canceled), a shutdown (admin, crash: every backend ended after
    # another crashed), a server still starting, an idle session ended.
    asyncpg.OperatorInterventionError,
    # A standby after a failover, or a server in read-only mode: no write passes until the
    # primary is back.
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.IdleInTransactionSessionTimeoutError,
    # Class 40: a deadlock or a serialisation failure rolled the transaction back; trying
    # again is the cure.
    asyncpg.TransactionRollbackError,
    # A database that does not exist, or refuses our role: unavailable too, so that the
    # engine starts and /readyz answers 503 until it is there.
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
    # target_session_attrs in the URL (several hosts, for a failover) and none of them
    # fits now: every host a standby while one is promoted.
    asyncpg.TargetServerAttributeNotMatched,
    # A statement this connection prepared before a migration changed what it returns (a
    # column added to a table it reads with *, a function's result): in a transaction,
    # asyncpg cannot prepare it again and go on, so the transaction fails, once per pooled
    # connection. It rolled back, and the statement is prepared anew at the next try.
    asyncpg.InvalidCachedStatementError,
)
# Of those, the ones after which nothing was written for certain (NotCommitted). Not a timeout
# (the COMMIT may have gone through) and not 40003, "statement completion unknown".
_ROLLED_BACK = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.IdleInTransactionSessionTimeoutError,
    asyncpg.InvalidCachedStatementError,
)

# A release's own columns, named: read with * in a transaction, a column a migration adds
# would fail the transaction once per pooled connection (InvalidCachedStatementError).
_RELEASE_COLUMNS = """id, site_id, procedure_id, mode, opens_at, registration_opens_at,
    registration_closes_at, draw_at, seed, seed_commitment, beacon, entries_digest,
    beacon_source"""

_BOOKING_COLUMNS = """
    b.reference, b.status, b.release_id, b.slot_id, s.starts_at, s.duration_minutes,
    b.family_name, b.given_names, b.birth_date, b.channel, b.hold_token_hash,
    b.cancel_token_hash, r.mode, st.timezone, b.cancelled_by, b.place_withdrawn
"""
_BOOKING_FROM = """bookings b JOIN slots s ON s.id = b.slot_id
    JOIN releases r ON r.id = b.release_id JOIN sites st ON st.id = r.site_id"""


# A booking b is a person's active one while confirmed and its appointment is not over, by
# PostgreSQL's clock, as in book_hold (sql/010_past_appointments.sql). A booking is retired
# only once it is over, so "not retired" is part of "active": it lets a query use the unique
# index of active bookings.
_ENDS = """(SELECT s.starts_at + make_interval(mins => s.duration_minutes)
             FROM slots s WHERE s.id = b.slot_id)"""
_OVER = f"{_ENDS} <= now()"
_ACTIVE = f"b.status = 'confirmed' AND b.retired_at IS NULL AND {_ENDS} > now()"
# The active bookings of the addresses in $1, through bookings_active_by_email (the draw's
# caps; book_hold counts one address the same way).
_ACTIVE_OF_EMAILS = f"b.email_hash = ANY($1::bytea[]) AND b.cancelled_at IS NULL AND {_ACTIVE}"
# A person's bookings and cancellations over the period count toward their caps, except those
# the prefecture cancelled (sql/013_cancelled_by.sql; book_hold asks the same).
_COUNTED = "b.cancelled_by IS DISTINCT FROM 'prefecture'"

# What Store.purge erases: names, birth date, client network, and the keyed hashes, replaced
# by hashes of the row's own key (unique, as the indexes on them need, and linked to no one).
# It finds its rows through bookings_unpurged and entries_unpurged (sql/012): created before
# the cutoff and not purged. An entry is purged once its release's last appointment started
# a day (the longest slot) before the cutoff, and its draw has dealt with it or was due
# before the cutoff: a draw that keeps failing must not keep its entrants' data for ever.
# If it runs at last, it passes over purged entries (Store._draw_exclusions), so that the
# places it carries from other releases go to nobody without a name.


def _purge_statement(table: str, key: str, due: str, also: str = "") -> str:
    """Erase one batch ($2 rows) of ``table``'s rows not purged, made before the cutoff
    ($1 days ago), and ``due``; each keyed by ``key``."""
    a = table[0]
    return f"""
WITH batch AS (
    SELECT {a}.{key} FROM {table} {a}
     WHERE {a}.purged_at IS NULL AND {a}.created_at < now() - make_interval(days => $1)
       AND {due}
     LIMIT $2 FOR UPDATE SKIP LOCKED)
UPDATE {table} {a}
   SET family_name = '', given_names = '', birth_date = NULL, client_net = NULL,
       identity_hash = sha256(convert_to('purged identity ' || {a}.{key}, 'UTF8')),
       email_hash = sha256(convert_to('purged email ' || {a}.{key}, 'UTF8')),
       {also}purged_at = now()
  FROM batch WHERE {a}.{key} = batch.{key}"""  # noqa: S608 (constants)


_PURGE_BOOKINGS = _purge_statement(
    "bookings",
    "reference",
    f"{_ENDS} < now() - make_interval(days => $1)",
    "retired_at = coalesce(b.retired_at, now()), ",
)
_PURGE_ENTRIES = _purge_statement(
    "entries",
    "id",
    """(e.status <> 'registered'
            OR (SELECT r.draw_at FROM releases r WHERE r.id = e.release_id)
               < now() - make_interval(days => $1))
       AND (SELECT max(s.starts_at) FROM slots s WHERE s.release_id = e.release_id)
           < now() - make_interval(days => $1) - interval '1 day'""",
)

# Every confirm counts the booking caps under this lock, shared (book_hold): a draw takes it
# alone to count them again, its winners booked, and commit (Store.run_draw).
_CAPS_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('booking-caps', 0))"
# A short wait for a lock that may be held for seconds: the draw's for the caps lock, a
# withdrawal's for a release row a draw (or the freeze) holds. Then back TO DEFAULT.
_LOCK_SOON = "SET LOCAL lock_timeout = '500ms'"
_LOCK_AS_USUAL = "SET LOCAL lock_timeout TO DEFAULT"

# Staff's capacity change takes this lock, and every write of capacities to Redis from a
# snapshot shares it (Store.patch_release, Store.with_snapshot).
_CAPACITY_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('capacity:' || $1, 0))"
_CAPACITY_LOCK_SHARED = (
    "SELECT pg_advisory_xact_lock_shared(hashtextextended('capacity:' || $1, 0))"
)


@dataclass(frozen=True, slots=True)
class Purged:
    """What one call of Store.purge erased; ``more``: it stopped at its batch limit;
    ``failures``: the kinds (bookings, entries) whose purge failed, and why."""

    bookings: int
    entries: int
    more: bool
    failures: tuple[tuple[str, Exception], ...] = ()


def below_floor(slot_id: str, floor: int, what: str) -> dict[str, str]:
    """The validation error of a capacity below the places ``what`` (booked, or booked and
    held) on its slot."""
    return {
        "field": f"slots.{slot_id}.capacity",
        "message": f"cannot go below {floor} ({what} places)",
    }


async def create_pool(
    dsn: str, timeout_s: float, size: int, statement_cache_size: int = 100
) -> asyncpg.Pool:
    """A pool that connects lazily, so the engine starts (and answers 503) without PostgreSQL.
    ``statement_cache_size`` 0: behind pgbouncer in transaction mode (no prepared statement
    outlives its transaction there)."""
    ms = str(int(timeout_s * 1000))
    pool = asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=size,
        timeout=timeout_s,
        command_timeout=timeout_s,
        statement_cache_size=statement_cache_size,
        # The engine's statements are a fixed set, which the cache holds: none needs to be
        # let go of (and closed) after five minutes, as asyncpg does by default.
        max_cached_statement_lifetime=0,
        reset=_keep_session,
        server_settings={
            "statement_timeout": ms,
            "idle_in_transaction_session_timeout": ms,
            "application_name": "guichet",
            # A statement asyncpg keeps prepared gets a generic plan after five runs. Made
            # while bookings was empty, that plan scans every confirmed booking through
            # whichever partial index on status = 'confirmed' came first (the cancel, the
            # draw entry check...) until autovacuum analyses the table: planned afresh,
            # each query sees the table as it is (sql/005_book_custom_plans.sql). The
            # confirm's book_hold keeps plans that cannot go wrong so, and its own
            # setting (sql/006_book_generic_plans.sql): planning it at every call halved
            # the confirms PostgreSQL could do.
            "plan_cache_mode": "force_custom_plan",
        },
    )
    return await pool


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on release (advisory unlock, CLOSE ALL, UNLISTEN, RESET
    ALL): a round trip per request, and the engine keeps no session state. Its locks are
    transaction-scoped (pg_advisory_xact_lock), its settings SET LOCAL, and it neither
    listens nor keeps cursors. asyncpg still ends any open transaction before this runs."""


@dataclass(frozen=True, slots=True)
class IdentityRules:
    """Caps against resale: per identity over a sliding period, and per email address."""

    period: timedelta = timedelta(days=30)
    max_bookings: int = 3
    max_cancellations: int = 2
    max_active_per_email: int = 4

    @classmethod
    def of(cls, settings: Settings) -> IdentityRules:
        return cls(
            timedelta(days=settings.identity_period_days),
            settings.max_bookings_per_identity,
            settings.max_cancellations_per_identity,
            settings.max_active_per_email,
        )


@dataclass
class SchemaState:
    """What this worker last learnt of PostgreSQL's schema (``Store.ping``): ``behind``
    while it lacks a migration or function of this engine. Requests that need the schema
    are refused with it meanwhile (503), rather than fail on a column or function they do
    not find (500s), and the sweeper waits."""

    behind: SchemaBehind | None = None


class Store:
    def __init__(
        self,
        pool: asyncpg.Pool,
        timeout_s: float,
        retry_after_s: int,
        rules: IdentityRules | None = None,
        schema: SchemaState | None = None,
    ) -> None:
        self._pool = pool
        self._timeout_s = timeout_s
        self._retry_after_s = retry_after_s
        self._rules = rules or IdentityRules()
        self.schema = schema or SchemaState()

    @asynccontextmanager
    async def _connection(
        self, deadline_s: float | None = None
    ) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        """A pooled connection, for ``deadline_s`` at most in all (by default, four of
        its statements' limits: the wait for it included). Each statement has its limit,
        but some of asyncpg's own waits have none (the Close of a statement its cache lets
        go of): a PostgreSQL that stops answering in one of them held the request, and
        every request waiting on the same refill, until TCP gave up."""
        try:
            async with (
                asyncio.timeout(deadline_s or CALLS_PER_DEADLINE * self._timeout_s),
                self._pool.acquire(timeout=self._timeout_s) as conn,
            ):
                yield conn
        except _ROLLED_BACK as exc:
            raise NotCommitted(self._retry_after_s, "PostgreSQL cannot write now") from exc
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(self._retry_after_s, "PostgreSQL did not answer") from exc

    @asynccontextmanager
    async def _transaction(
        self, deadline_s: float | None = None
    ) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        async with self._connection(deadline_s) as conn, conn.transaction():
            yield conn

    async def ping(self) -> None:
        """PostgreSQL answers and has every migration and function of this engine's
        ``sql/``: a worker started before ``guichet migrate`` ran (or without it) is not
        ready, rather than failing requests on a column or function it does not find. What
        it finds is kept in ``schema``."""
        async with self._connection() as conn:
            try:
                rows = await conn.fetch("SELECT version FROM schema_migrations")
            except asyncpg.UndefinedTableError:
                rows = []  # never migrated
            try:
                in_force = await conn.fetch("SELECT name, version FROM schema_functions")
            except asyncpg.UndefinedTableError:
                in_force = []  # migrated by an engine before sql/functions/
        missing = sorted(shipped_migrations() - {row["version"] for row in rows})
        # This engine's version of each function, or a newer one (a rolling deploy), as a
        # newer migration may be there.
        versions = {row["name"]: row["version"] for row in in_force}
        behind = sorted(n for n, v in shipped_functions().items() if versions.get(n, 0) < v)
        self.schema.behind = (
            SchemaBehind(self._retry_after_s, missing, behind) if missing or behind else None
        )
        if self.schema.behind is not None:
            raise self.schema.behind

    # Personal data -------------------------------------------------------------------

    async def purge(self, days: int, batch: int = 1000, batches: int = 5) -> Purged:
        """Erase the personal data of bookings whose appointment ended more than ``days``
        days ago, and of the draw entries of releases whose last appointment did, by
        PostgreSQL's clock (sql/011_personal_data_purge.sql). At most ``batches`` batches of
        ``batch`` rows of each, each batch its own short statement, so that a backlog (the
        first run, say) is worked through over several calls; rows another transaction holds
        are left for the next call. One kind failing (a timeout, a bug) does not keep the
        other's data: each is tried, and its failure returned."""
        counts = [0, 0]
        more = False
        failures = []
        for i, (kind, statement) in enumerate(
            (("bookings", _PURGE_BOOKINGS), ("entries", _PURGE_ENTRIES))
        ):
            try:
                for _ in range(batches):
                    async with self._connection() as conn:
                        status = await conn.execute(statement, days, batch)
                    n = int(status.split()[-1])  # "UPDATE <n>"
                    counts[i] += n
                    if n < batch:
                        break
                else:
                    more = True
            except Exception as exc:
                failures.append((kind, exc))
        return Purged(counts[0], counts[1], more, tuple(failures))

    # Sites -------------------------------------------------------------------------------

    async def upsert_site(self, site: Site) -> Site:
        """Create or replace a site. Procedures left out are removed unless releases use them:
        the site as stored is returned."""
        async with self._transaction() as conn:
            await conn.execute(
                """INSERT INTO sites (id, name, timezone) VALUES ($1, $2, $3)
                   ON CONFLICT (id) DO UPDATE
                   SET name = excluded.name, timezone = excluded.timezone, updated_at = now()""",
                site.id,
                site.name,
                site.timezone,
            )
            await conn.executemany(
                """INSERT INTO procedures (site_id, id, name) VALUES ($1, $2, $3)
                   ON CONFLICT (site_id, id) DO UPDATE SET name = excluded.name""",
                [(site.id, p.id, p.name) for p in site.procedures],
            )
            await conn.execute(
                """DELETE FROM procedures p WHERE p.site_id = $1 AND NOT p.id = ANY($2::text[])
                   AND NOT EXISTS (SELECT 1 FROM releases r
                                   WHERE r.site_id = p.site_id AND r.procedure_id = p.id)""",
                site.id,
                [p.id for p in site.procedures],
            )
            await _audit(conn, "admin", "site.upsert", site.id, {"name": site.name})
            kept = await conn.fetch(
                "SELECT id, name FROM procedures WHERE site_id = $1 ORDER BY id", site.id
            )
        return Site(site.id, site.name, site.timezone, tuple(Procedure(*r.values()) for r in kept))

    async def sites(self) -> list[Site]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT s.id, s.name, s.timezone,
                          coalesce(array_agg(p.id ORDER BY p.id)
                                   FILTER (WHERE p.id IS NOT NULL), '{}') AS ids,
                          coalesce(array_agg(p.name ORDER BY p.id)
                                   FILTER (WHERE p.id IS NOT NULL), '{}') AS names
                   FROM sites s LEFT JOIN procedures p ON p.site_id = s.id
                   GROUP BY s.id ORDER BY s.id"""
            )
        return [
            Site(
                r["id"],
                r["name"],
                r["timezone"],
                tuple(Procedure(i, n) for i, n in zip(r["ids"], r["names"], strict=True)),
            )
            for r in rows
        ]

    async def site_timezone(self, site_id: str) -> str | None:
        async with self._connection() as conn:
            tz: str | None = await conn.fetchval(
                "SELECT timezone FROM sites WHERE id = $1", site_id
            )
            return tz

    # Releases ----------------------------------------------------------------------------

    async def create_release(
        self, release: Release, seed_hex: str | None = None, *, now: datetime
    ) -> bool:
        """Store a new release; a draw release with its secret seed and its commitment.
        False if a release of that id is there already (then nothing changes). A draw is
        refused before another of the procedure that has closed (``now``) and not drawn."""
        async with self._transaction() as conn:
            try:
                created = await conn.fetchval(
                    """INSERT INTO releases (id, site_id, procedure_id, mode, opens_at,
                           registration_opens_at, registration_closes_at, draw_at,
                           seed, seed_commitment, beacon_source, inventory_built_at)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NULL)
                       ON CONFLICT (id) DO NOTHING RETURNING id""",
                    release.id,
                    release.site_id,
                    release.procedure_id,
                    release.mode,
                    release.opens_at,
                    release.registration_opens_at,
                    release.registration_closes_at,
                    release.draw_at,
                    seed_hex,
                    release.seed_commitment,
                    release.beacon_source,
                )
            except asyncpg.ForeignKeyViolationError:
                raise NotFound(
                    f"No procedure {release.procedure_id!r} at site {release.site_id!r}"
                ) from None
            if created is None:
                return False
            if release.draw_at is not None and (
                ahead := await _closed_draw_after(
                    conn, release.id, release.site_id, release.procedure_id, release.draw_at, now
                )
            ):
                raise ValidationFailed([{"field": "draw_at", "message": ahead}])
            await conn.executemany(
                """INSERT INTO slots (id, release_id, starts_at, duration_minutes, capacity)
                   VALUES ($1, $2, $3, $4, $5)""",
                [
                    (s.id, release.id, s.starts_at, s.duration_minutes, s.capacity)
                    for s in release.slots
                ],
            )
            await _audit(
                conn,
                "admin",
                "release.create",
                release.id,
                {"slots": len(release.slots), "mode": release.mode},
            )
        return True

    async def release(self, release_id: str) -> Release | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                """SELECT r.*, st.timezone FROM releases r JOIN sites st ON st.id = r.site_id
                   WHERE r.id = $1""",
                release_id,
            )
            if row is None:
                return None
            slots = await conn.fetch(
                """SELECT id, starts_at, duration_minutes, capacity, booked FROM slots
                   WHERE release_id = $1 ORDER BY starts_at, id""",
                release_id,
            )
        return _release(row, slots)

    async def releases(
        self, site_id: str | None, procedure_id: str | None, now: datetime
    ) -> list[Release]:
        """Releases with at least one slot not started yet, oldest first."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT r.*, st.timezone FROM releases r JOIN sites st ON st.id = r.site_id
                   WHERE ($1::text IS NULL OR r.site_id = $1)
                     AND ($2::text IS NULL OR r.procedure_id = $2)
                     AND EXISTS (SELECT 1 FROM slots s
                                 WHERE s.release_id = r.id AND s.starts_at > $3)
                   ORDER BY coalesce(r.opens_at, r.registration_opens_at), r.id""",
                site_id,
                procedure_id,
                now,
            )
            slots = await conn.fetch(
                """SELECT release_id, id, starts_at, duration_minutes, capacity, booked
                   FROM slots WHERE release_id = ANY($1::text[]) ORDER BY starts_at, id""",
                [r["id"] for r in rows],
            )
        by_release: dict[str, list[asyncpg.Record]] = {}
        for s in slots:
            by_release.setdefault(s["release_id"], []).append(s)
        return [_release(r, by_release.get(r["id"], [])) for r in rows]

    async def release_ids(self) -> list[str]:
        async with self._connection() as conn:
            return [r["id"] for r in await conn.fetch("SELECT id FROM releases")]

    async def built(self, release_id: str, within_s: float) -> bool:
        """Record that the release's inventory has been written to Redis (the first time
        only), and say whether that first time was in the last ``within_s`` seconds, by
        PostgreSQL's clock: a first build, or one racing it, not a loss."""
        async with self._connection() as conn:
            # Written the first time only: a rebuild reads the row, and neither writes it
            # nor waits for a draw or a change that holds it locked. Neither written nor
            # found (the snapshot is from before a first build that was committing as this
            # one waited for it): a first build too, raced (a review).
            return bool(
                await conn.fetchval(
                    """WITH first AS (
                           UPDATE releases SET inventory_built_at = now()
                            WHERE id = $1 AND inventory_built_at IS NULL
                           RETURNING inventory_built_at)
                       SELECT coalesce((SELECT inventory_built_at FROM first),
                                       (SELECT inventory_built_at FROM releases WHERE id = $1),
                                       now())
                              > now() - make_interval(secs => $2)""",
                    release_id,
                    within_s,
                )
            )

    async def active_release_ids(self, now: datetime) -> list[str]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT DISTINCT release_id FROM slots
                   WHERE starts_at > $1::timestamptz - interval '1 day'
                   ORDER BY release_id""",
                now,
            )
        return [r["release_id"] for r in rows]

    async def patch_release(
        self,
        release_id: str,
        windows: dict[str, datetime],
        capacities: dict[str, int],
        now: datetime,
        lower: Callable[[dict[str, int]], Awaitable[None]],
        if_match: frozenset[str] | None = None,
        raised: Callable[[], Awaitable[None]] | None = None,
        settle_s: float = 0.0,
    ) -> None:
        """Change windows not yet started, and capacities never below what is booked.
        A window is changed only from and to times more than ``settle_s`` away: the time
        every worker takes to see the change.

        ``lower`` is given the bookings of each slot whose capacity goes down, while the
        slots' rows are locked and before anything commits, so that Redis can lower them
        with its holds counted; it raises to refuse the change. ``raised`` is called there
        too if a capacity goes up (Redis's fence moves). The capacity lock orders
        this change against every write of capacities to Redis from a snapshot
        (``with_snapshot``).

        ``if_match``: the ETags (``Release.etag``) the change was made against, or ``*``;
        refused with PreconditionFailed if the release has changed since. Checked under the
        capacity lock, taken after the changed slots' rows as a withdrawing cancel takes
        them: a withdrawal committed before is seen, one still running on a slot this
        change does not touch comes after it, and one on a slot it touches waits for it."""
        async with self._transaction() as conn:
            # NO KEY UPDATE: changes to a release serialise on its row, while the bookings
            # inserted meanwhile (their foreign key takes KEY SHARE on it) go on.
            row = await conn.fetchrow(
                f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE id = $1 FOR NO KEY UPDATE",  # noqa: S608
                release_id,
            )
            if row is None:
                raise NotFound(f"No release {release_id!r}")
            errors = []
            settled = now + timedelta(seconds=settle_s)
            for name, value in windows.items():
                if row[name] is None:
                    errors.append(
                        {"field": name, "message": f"not a window of a {row['mode']} release"}
                    )
                elif row[name] <= now:
                    errors.append({"field": name, "message": "this window has already started"})
                elif row[name] <= settled:
                    errors.append(
                        {
                            "field": name,
                            "message": f"this window starts within {settle_s:g} s: too late "
                            "for every worker to see a change",
                        }
                    )
                elif value <= settled:
                    errors.append(
                        {"field": name, "message": f"must be more than {settle_s:g} s from now"}
                    )
            if "opens_at" in windows and not errors:
                # As at publishing: a first-come release opening after its last slot
                # starts has nothing to offer. (A draw may come after its own slots.)
                last = await conn.fetchval(
                    "SELECT max(starts_at) FROM slots WHERE release_id = $1", release_id
                )
                if windows["opens_at"] >= last:
                    errors.append(
                        {"field": "opens_at", "message": "must come before the last slot starts"}
                    )
            if (
                capacities
                and row["mode"] == "draw"
                and (fixed := await _draw_places_fixed(conn, row, now))
            ):
                errors.append({"field": "slots", "message": fixed})
            if "draw_at" in windows and not errors:
                if row["registration_closes_at"] <= now:
                    errors.append({"field": "draw_at", "message": _DRAW_TIME_FIXED})
                elif ahead := await _closed_draw_after(
                    conn, row["id"], row["site_id"], row["procedure_id"], windows["draw_at"], now
                ):
                    errors.append({"field": "draw_at", "message": ahead})
            if errors:
                raise ValidationFailed(errors)
            try:
                await conn.execute(
                    """UPDATE releases SET opens_at = coalesce($2, opens_at),
                           registration_opens_at = coalesce($3, registration_opens_at),
                           registration_closes_at = coalesce($4, registration_closes_at),
                           draw_at = coalesce($5, draw_at)
                       WHERE id = $1""",
                    release_id,
                    windows.get("opens_at"),
                    windows.get("registration_opens_at"),
                    windows.get("registration_closes_at"),
                    windows.get("draw_at"),
                )
            except asyncpg.CheckViolationError:
                raise ValidationFailed(
                    [
                        {
                            "field": "body",
                            "message": "windows must keep registration_opens_at < "
                            "registration_closes_at <= draw_at",
                        }
                    ]
                ) from None
            lowered: dict[str, int] = {}
            before: dict[str, int] = {}
            rises = False
            # One statement for all the changed slots, not two a slot: a release may have
            # 2 000, and a PostgreSQL slow for a while held their locks, and the release's,
            # for 4 000 round trips (a staff booking on one of them waited, and failed).
            found: dict[str, asyncpg.Record] = {}
            if capacities:  # none: a change of windows alone
                rows = await conn.fetch(
                    """SELECT id, booked, capacity FROM slots
                       WHERE release_id = $1 AND id = ANY($2::text[]) ORDER BY id FOR UPDATE""",
                    release_id,
                    list(capacities),
                )
                found = {r["id"]: r for r in rows}
            for slot_id, capacity in capacities.items():
                current = found.get(slot_id)
                if current is None:
                    raise NotFound(f"No slot {slot_id!r} in release {release_id!r}")
                if capacity < current["booked"]:
                    raise ValidationFailed([below_floor(slot_id, current["booked"], "booked")])
                before[slot_id] = current["capacity"]
                if capacity < current["capacity"]:
                    lowered[slot_id] = current["booked"]
                rises = rises or capacity > current["capacity"]
            if capacities or if_match is not None:
                # A raise too: a snapshot's write in progress, of the capacity from before,
                # would land after this change's own and put Redis back below PostgreSQL
                # (the fence moves only for a lowering) until the next reconcile.
                await conn.execute(_CAPACITY_LOCK, release_id)
            if if_match is not None and "*" not in if_match:
                slots = await conn.fetch(
                    "SELECT id, capacity FROM slots WHERE release_id = $1", release_id
                )
                etag = release_etag(
                    tuple(row[w] for w in WINDOWS), ((s["id"], s["capacity"]) for s in slots)
                )
                if etag not in if_match:
                    raise PreconditionFailed(
                        "The release's windows or capacities changed since you read them: "
                        "read it again (GET) and redo your change on what it is now"
                    )
            if lowered:
                await lower(lowered)
            if rises and raised is not None:
                await raised()
            if capacities:
                await conn.execute(
                    """UPDATE slots SET capacity = c.capacity
                       FROM unnest($1::text[], $2::integer[]) AS c (id, capacity)
                       WHERE slots.id = c.id""",
                    list(capacities),
                    list(capacities.values()),
                )
            await _audit(
                conn,
                "admin",
                "release.patch",
                release_id,
                {
                    "windows": {k: v.isoformat() for k, v in windows.items()},
                    "capacities": capacities,
                    # What they were: who changed what from what, without a second source.
                    "before": {
                        "windows": {k: row[k].isoformat() for k in windows},
                        "capacities": before,
                    },
                },
            )

    async def with_snapshot(
        self,
        release_id: str,
        apply: Callable[[list[tuple[str, int]], list[tuple[str, str, str]]], Awaitable[T]],
    ) -> T:
        """Read a release's capacities and active bookings (reference, slot, and the hold
        it confirmed, '' for a draw's) in one snapshot, and run ``apply``
        on them (it writes them to Redis) before a capacity change can commit: the change
        waits for the shared capacity lock, so an older capacity is never written over a
        newer one. One statement, so one snapshot, taken once the lock is granted: under
        REPEATABLE READ the snapshot would date from the lock statement's start, before its
        wait, and miss the change it waited for."""
        async with self._transaction() as conn:
            await conn.execute(_CAPACITY_LOCK_SHARED, release_id)
            rows = await conn.fetch(
                """SELECT id AS slot_id, capacity, NULL AS reference, NULL AS hold_id FROM slots
                   WHERE release_id = $1
                   UNION ALL
                   SELECT slot_id, NULL, reference, coalesce(hold_id, '') FROM bookings
                   WHERE release_id = $1 AND status = 'confirmed'""",
                release_id,
            )
            capacities = [(r["slot_id"], r["capacity"]) for r in rows if r["reference"] is None]
            bookings = [
                (r["reference"], r["slot_id"], r["hold_id"])
                for r in rows
                if r["reference"] is not None
            ]
            return await apply(capacities, bookings)

    # Bookings ----------------------------------------------------------------------------

    async def book(
        self,
        *,
        reference: str,
        release: Release,
        slot_id: str,
        channel: Literal["online", "staff"],
        hold_id: str,
        hold_token_hash: bytes | None,
        identity_hash: bytes,
        email_hash: bytes,
        family_name: str,
        given_names: str,
        birth_date: date,
        cancel_token_hash: bytes,
        client_net: str | None = None,
    ) -> Booking:
        """Insert a confirmed booking; return it, or the one this hold already has.

        One statement, one round trip: ``book_hold`` (sql/004_book.sql) checks the identity
        and email caps (``IdentityRules``) and inserts. The slot's count and its capacity
        check happen in the same transaction (trigger and CHECK constraint); a constraint
        violation becomes SlotFull or IdentityAlreadyBooked.
        """
        rules = self._rules
        # An agent's booking (an admin request) also says in its audit row which agent
        # made it, in the same transaction; a confirm online is the one statement.
        who = logs.agent.get()
        async with self._transaction() if who is not None else self._connection() as conn:
            try:
                row = await conn.fetchrow(
                    "SELECT * FROM book_hold($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
                    " $13, $14, $15, $16, $17, $18)",
                    reference,
                    slot_id,
                    release.id,
                    release.procedure_id,
                    channel,
                    hold_id,
                    hold_token_hash,
                    identity_hash,
                    email_hash,
                    family_name,
                    given_names,
                    birth_date,
                    cancel_token_hash,
                    client_net,
                    rules.period,
                    rules.max_bookings,
                    rules.max_cancellations,
                    rules.max_active_per_email,
                )
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise _map_integrity(exc) from None
            if who is not None and row is not None and row["outcome"] == "booked":
                await conn.execute(
                    """UPDATE audit_log SET detail = detail || jsonb_build_object('agent', $2::text)
                       WHERE subject = $1 AND action = 'booking.confirm'""",
                    row["reference"],
                    who,
                )
        assert row is not None
        outcome = row["outcome"]
        if outcome in ("booked", "existing"):
            booking = Booking(*list(row.values())[:_BOOK_HOLD_FIELDS])
            if booking.status == "cancelled":
                # A confirm's retry after the booking was cancelled: book_hold does not say
                # who cancelled it (rare, so read again rather than change its columns).
                return await self.booking(booking.reference) or booking
            return booking
        count = row["limit_count"]
        if outcome == "email":
            raise RateLimited(
                86400,
                f"This email address already has {count} active bookings, the most allowed",
                level="email",
            )
        what = "bookings" if outcome == "identity-bookings" else "cancellations"
        raise RateLimited(
            max(1, int(row["wait_s"] or 0) + 1),
            f"This person has had {count} {what} in {rules.period.days} days, the most allowed",
            level="identity",
        )

    async def booking_by_hold(self, hold_id: str) -> Booking | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_BOOKING_COLUMNS} FROM {_BOOKING_FROM} WHERE b.hold_id = $1",  # noqa: S608
                hold_id,
            )
        return None if row is None else _booking(row)

    async def bookings_by_holds(self, hold_ids: Sequence[str]) -> dict[str, str]:
        """hold id -> reference, for the holds whose booking is confirmed (a cancelled one
        leaves the hold's place free)."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT hold_id, reference FROM bookings
                   WHERE hold_id = ANY($1::text[]) AND status = 'confirmed'""",
                list(hold_ids),
            )
        return {r["hold_id"]: r["reference"] for r in rows}

    async def booking(self, reference: str) -> Booking | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_BOOKING_COLUMNS} FROM {_BOOKING_FROM} WHERE b.reference = $1",  # noqa: S608
                reference,
            )
        return None if row is None else _booking(row)

    async def audit(
        self,
        *,
        subject: str | None,
        agent: str | None,
        action: str | None,
        since: datetime | None,
        until: datetime | None,
        before: int | None,
        limit: int,
    ) -> list[asyncpg.Record]:
        """Audit rows, newest first, matching every filter given; ``before``: ids below
        it (the next page). Read backwards along the primary key (or the subject's index):
        a filter few rows match reads much of a long log, within the statement's time
        limit (then a 503)."""
        terms, args = [], []
        for term, value in (
            ("subject = ${}", subject),
            ("detail->>'agent' = ${}", agent),
            ("action = ${}", action),
            ("at >= ${}", since),
            ("at < ${}", until),
            ("id < ${}", before),
        ):
            if value is not None:
                args.append(value)
                terms.append(term.format(len(args)))
        where = " AND ".join(terms) or "true"
        async with self._connection() as conn:
            return list(
                await conn.fetch(
                    f"""SELECT id, at, actor, action, subject, detail FROM audit_log
                        WHERE {where} ORDER BY id DESC LIMIT {int(limit)}""",  # noqa: S608 (constants)
                    *args,
                )
            )

    async def check_identity(self, reference: str, identity_hash: bytes) -> bool | None:
        """Whether the booking was made for this identity (None: no such booking); the
        check is in the audit log, with its answer."""
        async with self._transaction() as conn:
            booked = await conn.fetchval(
                "SELECT identity_hash FROM bookings WHERE reference = $1", reference
            )
            if booked is None:
                return None
            matches = hmac.compare_digest(bytes(booked), identity_hash)
            await _audit(conn, "staff", "booking.identity_check", reference, {"matches": matches})
        return matches

    async def cancel(
        self,
        reference: str,
        actor: str,
        by: CancelledBy = "person",
        withdraw: Callable[[str], Awaitable[None]] | None = None,
    ) -> bool:
        """Cancel a confirmed booking, for the person or by the prefecture (which counts
        toward none of the person's caps). False if it was already cancelled.

        With ``withdraw``, the place is taken off its slot: the slot's capacity goes one
        lower in the same transaction, and ``withdraw`` is given the slot while its row is
        locked and before anything commits, under the capacity lock, as a lowering of
        ``patch_release`` is (Redis takes the place off first); it raises to refuse."""
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                """UPDATE bookings SET status = 'cancelled', cancelled_at = now(),
                       cancelled_by = $2, place_withdrawn = $3
                   WHERE reference = $1 AND status = 'confirmed'
                   RETURNING slot_id, release_id""",
                reference,
                by,
                withdraw is not None,
            )
            if row is None:
                return False
            detail = {"by": by, "place": "returned"}
            if withdraw is not None:
                # The trigger took the booking off the slot's count and locked its row.
                await conn.execute(
                    "UPDATE slots SET capacity = capacity - 1 WHERE id = $1", row["slot_id"]
                )
                await conn.execute(_CAPACITY_LOCK, row["release_id"])
                await withdraw(row["slot_id"])
                detail["place"] = "withdrawn"
            await _audit(conn, actor, "booking.cancel", reference, detail)
        return True

    async def bookings_by_network(
        self, now: datetime, release_id: str | None = None
    ) -> list[tuple[str, int]]:
        """Confirmed online bookings of appointments still to come, per client network
        (IPv4 /24, IPv6 /64), busiest first."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT b.client_net, count(*) AS n
                   FROM bookings b JOIN slots s ON s.id = b.slot_id
                   WHERE b.status = 'confirmed' AND b.client_net IS NOT NULL
                     AND s.starts_at > $1 AND ($2::text IS NULL OR b.release_id = $2)
                   GROUP BY b.client_net ORDER BY n DESC, b.client_net""",
                now,
                release_id,
            )
        return [(r["client_net"], r["n"]) for r in rows]

    async def agenda(self, site_id: str, day: date, timezone: str) -> list[dict[str, Any]]:
        """The confirmed bookings of ``day`` at a site, from its midnight to the next in
        the site's zone (23 or 25 hours on the days the clocks change). A range of times,
        not the local date of each slot: the slots' index finds it, where the date was
        computed for every booking the site ever had."""
        zone = ZoneInfo(timezone)
        start = datetime.combine(day, time(), zone)
        end = datetime.combine(day + timedelta(days=1), time(), zone)
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT s.starts_at, s.duration_minutes, b.reference, b.family_name,
                          b.given_names, b.birth_date, r.procedure_id, b.channel, s.id AS slot_id
                   FROM bookings b JOIN slots s ON s.id = b.slot_id
                   JOIN releases r ON r.id = b.release_id
                   WHERE r.site_id = $1 AND b.status = 'confirmed'
                     AND s.starts_at >= $2 AND s.starts_at < $3
                   ORDER BY s.starts_at, s.id, b.family_name, b.reference""",
                site_id,
                start,
                end,
            )
        return [dict(r) for r in rows]

    # Draws --------------------------------------------------------------------------------

    async def add_entry(
        self,
        *,
        entry_id: str,
        digest: str,
        release: Release,
        token_hash: bytes,
        identity_hash: bytes,
        email_hash: bytes,
        family_name: str,
        given_names: str,
        birth_date: date,
        client_net: str | None,
    ) -> None:
        """Register an entry, unless this person has an active booking for the procedure or
        an entry in this draw already, or the entry list is frozen."""
        async with self._transaction() as conn:
            await _require_unfrozen(conn, release.id)
            booked = await conn.fetchval(
                f"""SELECT 1 FROM bookings b
                    WHERE b.procedure_id = $1 AND b.identity_hash = $2 AND {_ACTIVE}""",  # noqa: S608 (constants)
                release.procedure_id,
                identity_hash,
            )
            if booked:
                raise IdentityAlreadyBooked(
                    "This person already has an active booking for this procedure"
                )
            try:
                await conn.execute(
                    """INSERT INTO entries (id, release_id, procedure_id, digest, token_hash,
                           identity_hash, email_hash, family_name, given_names, birth_date,
                           client_net)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)""",
                    entry_id,
                    release.id,
                    release.procedure_id,
                    digest,
                    token_hash,
                    identity_hash,
                    email_hash,
                    family_name,
                    given_names,
                    birth_date,
                    client_net,
                )
                if client_net is None:  # at the counter or on the phone, by staff
                    await _audit(conn, "staff", "entry.create", entry_id, {"release": release.id})
            except asyncpg.UniqueViolationError as exc:
                # The id (and the digest made from it) too: it comes from the challenge, so the
                # same one is this request's retry (Lottery.enter tells).
                constraint = getattr(exc, "constraint_name", "")
                if constraint in ("entries_one_per_person", "entries_pkey", "entries_digest_key"):
                    raise IdentityAlreadyBooked(
                        "This person already has an entry in this draw"
                    ) from None
                raise

    async def entry_status(
        self, entry_id: str, release_id: str, identity_hash: bytes
    ) -> str | None:
        """The status of this entry of this release, for this person, for a retry of the
        request that registered it: None if there is none, or if its person withdrew it
        (the draw's exclusions read ``withdrawn`` too, and are answered)."""
        async with self._connection() as conn:
            status: str | None = await conn.fetchval(
                """SELECT status FROM entries WHERE id = $1 AND release_id = $2
                   AND identity_hash = $3 AND (status <> 'withdrawn' OR excluded)""",
                entry_id,
                release_id,
                identity_hash,
            )
        return status

    async def entry(self, entry_id: str) -> Entry | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                """SELECT id, release_id, status, token_hash, booking_reference, excluded
                   FROM entries WHERE id = $1""",
                entry_id,
            )
        return None if row is None else Entry(*row.values())

    async def withdraw_entry(self, release_id: str, entry_id: str) -> bool:
        """Withdraw a registered entry; False if it is not registered (any more). After the
        freeze it stays among the draw's entries, flagged, and the draw passes it over
        (sql/015_entry_withdrawn_frozen.sql). The release row's lock (FOR SHARE) orders this
        with the freeze and with the draw, which take it FOR UPDATE: a withdrawal is either
        before the freeze, or flagged, and never after the draw. A draw holds that lock for
        seconds: a withdrawal does not wait for it (a pooled connection each), it is told
        to try again."""
        async with self._transaction() as conn:
            await conn.execute(_LOCK_SOON)
            try:
                frozen = await conn.fetchval(
                    "SELECT entries_digest IS NOT NULL FROM releases WHERE id = $1 FOR SHARE",
                    release_id,
                )
            except asyncpg.LockNotAvailableError:
                raise StoreUnavailable(
                    self._retry_after_s, "The release is being drawn or changed: try again"
                ) from None
            await conn.execute(_LOCK_AS_USUAL)
            done = await conn.fetchval(
                """UPDATE entries SET status = 'withdrawn', withdrawn_frozen = $2
                   WHERE id = $1 AND status = 'registered' RETURNING id""",
                entry_id,
                bool(frozen),
            )
        return done is not None

    async def set_beacon(self, release_id: str, beacon: str, now: datetime) -> None:
        """Add the public beacon value, once: between the entry list's freeze and the draw.
        The same value again changes nothing (a retry). Another is refused: with the seed
        and the entries digest, an insider could try values until one ranks the entries
        they want, and set that one. Before the freeze, a worker whose clock lags could
        still register an entry chosen knowing it."""
        async with self._transaction() as conn:
            # The row's lock first, and what to check in a statement of its own: a draw
            # holds the row while it runs, and a statement that waited for it would see
            # the draw's row but not its record (the snapshot it began with), and add a
            # beacon the draw never used.
            locked = await conn.fetchval(
                "SELECT 1 FROM releases WHERE id = $1 AND mode = 'draw' FOR NO KEY UPDATE",
                release_id,
            )
            if locked is None:
                raise NotFound(f"No draw release {release_id!r}")
            row = await conn.fetchrow(
                """SELECT beacon, registration_closes_at <= $2 AND draw_at > $2 AS open,
                          entries_digest IS NOT NULL AS frozen,
                          EXISTS (SELECT 1 FROM draws d WHERE d.release_id = r.id) AS drawn
                   FROM releases r WHERE id = $1""",
                release_id,
                now,
            )
            assert row is not None  # locked above
            if row["beacon"] == beacon:
                return
            if row["beacon"] is not None:
                raise NotOpen("The beacon is set already: it cannot change")
            if not row["open"] or row["drawn"]:
                raise NotOpen("A beacon is added after registration closes and before the draw")
            if not row["frozen"]:
                raise NotOpen(
                    "The entry list is not frozen yet (within a sweep of the closing): add the "
                    "beacon once GET /v1/releases shows the release's entries_digest"
                )
            await conn.execute("UPDATE releases SET beacon = $2 WHERE id = $1", release_id, beacon)
            await _audit(conn, "admin", "draw.beacon", release_id, {"beacon": beacon})

    async def draws_due(self, now: datetime) -> list[str]:
        """Draw releases whose draw time has come and which have not been drawn."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT r.id FROM releases r
                   WHERE r.mode = 'draw' AND r.draw_at <= $1
                     AND NOT EXISTS (SELECT 1 FROM draws d WHERE d.release_id = r.id)
                   ORDER BY r.draw_at, r.id""",
                now,
            )
        return [r["id"] for r in rows]

    async def closed_unfrozen(self, now: datetime) -> list[str]:
        """Draw releases whose registration has closed and whose entries are not frozen."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT id FROM releases WHERE mode = 'draw' AND entries_digest IS NULL
                     AND registration_closes_at <= $1 ORDER BY registration_closes_at, id""",
                now,
            )
        return [r["id"] for r in rows]

    async def freeze_entries(self, release_id: str, now: datetime) -> bool:
        """Record the entries digest of a draw whose registration has closed; False if it
        is not closed, frozen already, or busy (its row locked: being changed, frozen or
        drawn elsewhere; the next sweep comes back to it, rather than wait). Each release
        in its own transaction, with the draw's bounds: a list of hundreds of thousands of
        entries takes seconds to read."""
        async with self._transaction(CALLS_PER_DEADLINE * DRAW_TIMEOUT_S) as conn:
            await conn.execute(_DRAW_LIMITS, timeout=DRAW_TIMEOUT_S)
            closed = await conn.fetchval(
                """SELECT true FROM releases WHERE id = $1 AND mode = 'draw'
                     AND entries_digest IS NULL AND registration_closes_at <= $2
                   FOR UPDATE SKIP LOCKED""",
                release_id,
                now,
                timeout=DRAW_TIMEOUT_S,
            )
            if not closed:
                return False
            digests = await conn.fetch(
                "SELECT digest FROM entries WHERE release_id = $1 AND status <> 'withdrawn'",
                release_id,
                timeout=DRAW_TIMEOUT_S,
            )
            frozen = await asyncio.to_thread(draw.entries_digest, [d["digest"] for d in digests])
            await conn.execute(
                "UPDATE releases SET entries_digest = $2 WHERE id = $1",
                release_id,
                frozen,
                timeout=DRAW_TIMEOUT_S,
            )
        return True

    async def draw_record(self, release_id: str) -> dict[str, Any] | None:
        async with self._connection() as conn:
            raw = await conn.fetchval("SELECT record FROM draws WHERE release_id = $1", release_id)
        return None if raw is None else dict(json.loads(raw))

    @staticmethod
    async def _book_winners(
        conn: asyncpg.pool.PoolConnectionProxy,
        rel: asyncpg.Record,
        refs: list[str],
        winners: list[tuple[asyncpg.Record, str]],
        slot_release: dict[str, str],
        cancel_token_hash: Callable[[str], bytes],
    ) -> None:
        """Book each winner (an entry, its slot) under its reference, in one statement."""
        await conn.execute(
            """INSERT INTO bookings (reference, slot_id, release_id, procedure_id, channel,
                   entry_id, identity_hash, email_hash, family_name, given_names,
                   birth_date, cancel_token_hash, client_net)
               SELECT ref, slot, rel, $4, 'draw', entry, ident, email, family, given,
                      birth, cancel, net
               FROM unnest($1::text[], $2::text[], $3::text[], $5::text[], $6::bytea[],
                           $7::bytea[], $8::text[], $9::text[], $10::date[], $11::bytea[],
                           $12::text[])
                    AS w(ref, slot, rel, entry, ident, email, family, given, birth,
                         cancel, net)""",
            refs,
            [slot for _, slot in winners],
            [slot_release[slot] for _, slot in winners],
            rel["procedure_id"],
            [e["id"] for e, _ in winners],
            [e["identity_hash"] for e, _ in winners],
            [e["email_hash"] for e, _ in winners],
            [e["family_name"] for e, _ in winners],
            [e["given_names"] for e, _ in winners],
            [e["birth_date"] for e, _ in winners],
            [cancel_token_hash(e["id"]) for e, _ in winners],
            [e["client_net"] for e, _ in winners],
            timeout=DRAW_TIMEOUT_S,
        )

    async def _draw_exclusions(
        self,
        conn: asyncpg.pool.PoolConnectionProxy,
        entries: list[asyncpg.Record],
        ranked: list[str],
        places: list[draw.Places],
    ) -> list[str]:
        """The entries the draw passes over, keeping their rank: their person withdrew them
        after registration closed, or their personal data was purged (a draw that failed
        for months), or their person has an active
        booking of the procedure, or is at a cap of book_hold's (bookings or cancellations
        over the period), or their email address would go over its cap of active bookings
        (those the draw gives counted in draw order: the best-ranked entries of an address
        take what room it has left). A confirm online is held to the same caps."""
        rules = self._rules
        out = {
            e["digest"]
            for e in entries
            if e["withdrawn_frozen"]
            or e["booked"]
            or e["purged_at"] is not None
            or e["recent_bookings"] >= rules.max_bookings
            or e["recent_cancellations"] >= rules.max_cancellations
        }
        rows = await conn.fetch(
            f"""SELECT b.email_hash, count(*) AS active FROM bookings b
                WHERE {_ACTIVE_OF_EMAILS} GROUP BY b.email_hash""",  # noqa: S608 (constants)
            list({e["email_hash"] for e in entries}),
            timeout=DRAW_TIMEOUT_S,
        )
        active: Counter[bytes] = Counter({r["email_hash"]: r["active"] for r in rows})
        by_digest = {e["digest"]: e for e in entries}
        room = sum(p.count for p in places)
        for digest in ranked:
            if room == 0:
                break  # no place left: nobody further down wins, nor needs passing over
            if digest in out:
                continue
            email = by_digest[digest]["email_hash"]
            if active[email] >= rules.max_active_per_email:
                out.add(digest)
                continue
            active[email] += 1
            room -= 1
        return [e["digest"] for e in entries if e["digest"] in out]

    async def _check_draw_caps(
        self, conn: asyncpg.pool.PoolConnectionProxy, winners: list[tuple[asyncpg.Record, str]]
    ) -> None:
        """The caps again, with the winners booked: the exclusions were counted without
        book_hold's locks, and a confirm online may have committed since. This statement sees
        every such confirm: the draw holds the caps lock, which each confirm shares while it
        counts and books. Over a cap, the draw fails and runs again at the next sweep,
        counting it."""
        rules = self._rules
        over = await conn.fetchval(
            f"""SELECT
                  (SELECT count(*) FROM (
                     SELECT 1 FROM bookings b WHERE {_ACTIVE_OF_EMAILS}
                     GROUP BY b.email_hash HAVING count(*) > $2) e)
                + (SELECT count(*) FROM (
                     SELECT 1 FROM bookings b
                     WHERE b.identity_hash = ANY($3::bytea[]) AND {_COUNTED}
                       AND b.created_at > now() - $4::interval
                     GROUP BY b.identity_hash HAVING count(*) > $5) i)""",  # noqa: S608 (constants)
            list({e["email_hash"] for e, _ in winners}),
            rules.max_active_per_email,
            [e["identity_hash"] for e, _ in winners],
            rules.period,
            rules.max_bookings,
            timeout=DRAW_TIMEOUT_S,
        )
        if over:
            raise DrawRaced(f"{over} winner(s) went over a booking cap during the draw")

    async def run_draw(
        self,
        release_id: str,
        now: datetime,
        cancel_token_hash: Callable[[str], bytes],
        new_ref: Callable[[], str],
    ) -> DrawOutcome | None:
        """Run a due draw, once: allocate, book the winners, publish the record, in one
        transaction. A crash anywhere rolls it all back, and running again gives the same
        result, since its inputs were frozen when registration closed. None if not due,
        drawn, or busy: its release row locked (another worker running it, a change to the
        release), another draw of its procedure at its site running, or one due before it
        and not drawn (which runs first: GuichetDrawOverdue if it never does). A busy draw is not
        waited for (a draw takes seconds, and every worker's sweeper would queue behind
        it): the next sweep runs it, or finds it drawn."""
        async with self._transaction(2 * CALLS_PER_DEADLINE * DRAW_TIMEOUT_S) as conn:
            # A big draw outlives the pool's per-call timeout: each call passes its own. And
            # between its statements the allocation runs here, in Python (0.8 s for 100 000
            # entries on a slow machine, docs/draw.md): the session's idle-in-transaction
            # limit, a few seconds, would end a draw of a few hundred thousand at every try.
            await conn.execute(_DRAW_LIMITS, timeout=DRAW_TIMEOUT_S)
            rel = await conn.fetchrow(
                f"""SELECT {_RELEASE_COLUMNS} FROM releases
                    WHERE id = $1 AND mode = 'draw' FOR UPDATE SKIP LOCKED""",  # noqa: S608
                release_id,
                timeout=DRAW_TIMEOUT_S,
            )
            if rel is None or rel["draw_at"] > now:
                return None
            drawn = "SELECT 1 FROM draws WHERE release_id = $1"
            if await conn.fetchval(drawn, release_id, timeout=DRAW_TIMEOUT_S):
                return None
            # Draws of one procedure at one site share their carried places: one at a time.
            if not await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
                f"draw:{rel['site_id']}:{rel['procedure_id']}",
                timeout=DRAW_TIMEOUT_S,
            ):
                return None
            # And in the order of their draw times (then ids): one run before an earlier
            # one not drawn yet (passed by, failing, racing a confirm) took the free places
            # that one carries over, its places changed after its close. It waits.
            if await conn.fetchval(
                """SELECT 1 FROM releases r
                   WHERE r.mode = 'draw' AND r.site_id = $1 AND r.procedure_id = $2
                     AND (r.draw_at, r.id) < ($3, $4)
                     AND NOT EXISTS (SELECT 1 FROM draws d WHERE d.release_id = r.id)
                   LIMIT 1""",
                rel["site_id"],
                rel["procedure_id"],
                rel["draw_at"],
                release_id,
                timeout=DRAW_TIMEOUT_S,
            ):
                return None
            # Each entry's person: an active booking of the procedure, and their bookings and
            # cancellations over the caps' period (book_hold's caps, sql/010).
            entries = await conn.fetch(
                f"""SELECT e.*, EXISTS (SELECT 1 FROM bookings b
                        WHERE b.procedure_id = e.procedure_id
                          AND b.identity_hash = e.identity_hash AND {_ACTIVE}) AS booked,
                        recent.bookings AS recent_bookings,
                        recent.cancellations AS recent_cancellations
                    FROM entries e, LATERAL (
                        SELECT count(*) FILTER (WHERE b.created_at > now() - $2::interval)
                                   AS bookings,
                               count(*) FILTER (WHERE b.cancelled_at > now() - $2::interval)
                                   AS cancellations
                        FROM bookings b
                        WHERE b.identity_hash = e.identity_hash AND {_COUNTED}) recent
                    WHERE e.release_id = $1
                      AND (e.status = 'registered' OR e.withdrawn_frozen)""",  # noqa: S608 (constants)
                release_id,
                self._rules.period,
                timeout=DRAW_TIMEOUT_S,
            )
            digests = [e["digest"] for e in entries]
            frozen = rel["entries_digest"] or draw.entries_digest(digests)
            if frozen != draw.entries_digest(digests):
                raise RuntimeError(f"the entries of {release_id} changed after registration closed")
            places_rows = await conn.fetch(
                """SELECT s.id, s.release_id, s.starts_at, s.capacity - s.booked AS free
                   FROM slots s JOIN releases r ON r.id = s.release_id
                   WHERE s.capacity > s.booked AND s.starts_at > $2
                     AND (s.release_id = $1
                          OR (r.mode = 'draw' AND r.site_id = $3 AND r.procedure_id = $4
                              AND EXISTS (SELECT 1 FROM draws d WHERE d.release_id = r.id)))
                   FOR UPDATE OF s""",
                release_id,
                now,
                rel["site_id"],
                rel["procedure_id"],
                timeout=DRAW_TIMEOUT_S,
            )
            places = [draw.Places(p["id"], _utc(p["starts_at"]), p["free"]) for p in places_rows]
            beacon = rel["beacon"] or ""
            # Ranked once (a fifth of a second per 100 000 entries): for the exclusions and the
            # allocation. The computing runs in a thread: the worker's event loop, which
            # serves requests meanwhile, gets the interpreter back every few milliseconds
            # instead of waiting for the whole of it.
            ranked = await asyncio.to_thread(draw.ranking, rel["seed"], digests, beacon)
            excluded = await self._draw_exclusions(conn, entries, ranked, places)
            record = await asyncio.to_thread(
                functools.partial(
                    draw.record,
                    ranked=ranked,
                    release=release_id,
                    seed_hex=rel["seed"],
                    beacon=beacon,
                    digests=digests,
                    places=places,
                    excluded=excluded,
                    drawn_at=_utc(now),
                    beacon_source=rel["beacon_source"],
                )
            )
            # The computing is done: back to the session's idle limit, so that a connection
            # stalled from here on does not hold the draw's locks for minutes.
            await conn.execute(
                "SET LOCAL idle_in_transaction_session_timeout TO DEFAULT", timeout=DRAW_TIMEOUT_S
            )
            # The commitment published at release time, not one recomputed from the seed:
            # a verifier then checks the seed against what the world saw.
            record["seed_commitment"] = rel["seed_commitment"]
            by_digest = {e["digest"]: e for e in entries}
            slot_release = {p["id"]: p["release_id"] for p in places_rows}
            winners = [(by_digest[d], slot) for d, slot in record["allocation"].items()]
            refs = [new_ref() for _ in winners]
            # The winners' appointments of the procedure that are over leave the unique index
            # of active bookings, as book_hold does (sql/010_past_appointments.sql).
            await conn.execute(
                f"""UPDATE bookings b SET retired_at = now()
                    WHERE b.procedure_id = $1 AND b.identity_hash = ANY($2::bytea[])
                      AND b.status = 'confirmed' AND b.retired_at IS NULL AND {_OVER}""",  # noqa: S608 (constants)
                rel["procedure_id"],
                [e["identity_hash"] for e, _ in winners],
                timeout=DRAW_TIMEOUT_S,
            )
            try:
                await self._book_winners(conn, rel, refs, winners, slot_release, cancel_token_hash)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != "bookings_one_active_per_identity":
                    raise
                # A winner booked the procedure (online, at the counter, in another site's
                # draw) after the entries were read: give way, as to a cap gone over.
                raise DrawRaced("a winner booked the procedure during the draw") from None
            await conn.execute(
                """UPDATE entries e SET status = 'won', booking_reference = w.ref
                   FROM unnest($1::text[], $2::text[]) AS w(id, ref) WHERE e.id = w.id""",
                [e["id"] for e, _ in winners],
                refs,
                timeout=DRAW_TIMEOUT_S,
            )
            await conn.execute(
                """UPDATE entries SET status = CASE WHEN digest = ANY($2::text[])
                       THEN 'withdrawn' ELSE 'not-drawn' END,
                       excluded = digest = ANY($2::text[])
                   WHERE release_id = $1 AND status = 'registered'""",
                release_id,
                excluded,
                timeout=DRAW_TIMEOUT_S,
            )
            carried = sum(1 for _, slot in winners if slot_release[slot] != release_id)
            await conn.execute(
                """INSERT INTO draws (release_id, record, places, allocated, carried)
                   VALUES ($1, $2::jsonb, $3, $4, $5)""",
                release_id,
                json.dumps(record),
                sum(p.count for p in places),
                len(winners),
                carried,
                timeout=DRAW_TIMEOUT_S,
            )
            await conn.execute(
                "UPDATE releases SET entries_digest = $2 WHERE id = $1",
                release_id,
                frozen,
                timeout=DRAW_TIMEOUT_S,
            )
            await _audit(
                conn,
                "engine",
                "draw.run",
                release_id,
                {"entries": len(entries), "allocated": len(winners), "carried": carried},
            )
            # Last, the caps counted again under their lock, held to the commit: every
            # confirm that counted without the winners has committed (the lock waits for
            # it) and is seen, and one that comes now waits and counts them. Only this
            # count and the commit hold confirms back (docs/draw.md, step 8). A confirm
            # still in flight after half a second (one takes a few milliseconds, 183 ms at
            # worst in draw_bench.py) may be waiting on this draw (its person won here, and
            # books the procedure online or at the counter): the draw gives way and reruns,
            # rather than wait for PostgreSQL's deadlock check while every confirm queues
            # behind it.
            await conn.execute(_LOCK_SOON, timeout=DRAW_TIMEOUT_S)
            try:
                await conn.execute(_CAPS_LOCK, timeout=DRAW_TIMEOUT_S)
            except asyncpg.LockNotAvailableError:
                raise DrawRaced("confirms in flight kept the booking caps' lock") from None
            await conn.execute(_LOCK_AS_USUAL, timeout=DRAW_TIMEOUT_S)
            await self._check_draw_caps(conn, winners)
        return DrawOutcome(
            release_id,
            len(entries),
            sum(p.count for p in places),
            len(winners),
            carried,
            tuple(sorted(set(slot_release.values()) | {release_id})),
        )


async def _require_unfrozen(conn: asyncpg.pool.PoolConnectionProxy, release_id: str) -> None:
    """Entries change only while the list is not frozen. The row lock (FOR SHARE) makes
    freeze_entries (FOR UPDATE) wait for this transaction, or this one wait for it: a late
    request on a slow path or a worker whose clock lags cannot slip in after the freeze."""
    frozen = await conn.fetchval(
        "SELECT entries_digest IS NOT NULL FROM releases WHERE id = $1 FOR SHARE", release_id
    )
    if frozen:
        raise NotOpen("Registration has closed")


async def _draw_places_fixed(
    conn: asyncpg.pool.PoolConnectionProxy, release: asyncpg.Record, now: datetime
) -> str | None:
    """Why a draw release's capacities cannot change now, if they cannot. Whoever knows
    the seed knows the ranking once the list is frozen (and the beacon set): a place added
    or taken away then moves the cut-off onto whom they chose. So a draw's own places are
    fixed from its close to its draw; after it, they carry over to the procedure's next
    draw, and are fixed while one has closed and is not drawn."""
    drawn = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM draws WHERE release_id = $1)", release["id"]
    )
    if not drawn:
        if release["registration_closes_at"] <= now:
            return (
                "a draw's places are fixed from registration's close to the draw: change "
                "them after it"
            )
        return None
    pending = await _closed_undrawn(
        conn, release["id"], release["site_id"], release["procedure_id"], now
    )
    if pending is None:
        return None
    return (
        f"this release's free places carry over to the draw of {pending}, closed and not "
        "drawn yet: change them after it"
    )


_DRAW_TIME_FIXED = (
    "a draw's time is fixed from registration's close: its places depend on it (its slots "
    "that start after it, and the free places of the procedure's draws run before it)"
)


async def _closed_undrawn(
    conn: asyncpg.pool.PoolConnectionProxy,
    release_id: str,
    site_id: str,
    procedure_id: str,
    now: datetime,
    drawn_from: datetime | None = None,
) -> str | None:
    """A draw of the procedure at the site, other than ``release_id``, whose registration
    has closed and which is not drawn (drawn at ``drawn_from`` or later, if given): the
    earliest by draw time."""
    found = await conn.fetchval(
        """SELECT r.id FROM releases r
           WHERE r.mode = 'draw' AND r.id <> $1 AND r.site_id = $2 AND r.procedure_id = $3
             AND r.registration_closes_at <= $4
             AND ($5::timestamptz IS NULL OR r.draw_at >= $5)
             AND NOT EXISTS (SELECT 1 FROM draws d WHERE d.release_id = r.id)
           ORDER BY r.draw_at LIMIT 1""",
        release_id,
        site_id,
        procedure_id,
        now,
        drawn_from,
    )
    return None if found is None else str(found)


async def _closed_draw_after(
    conn: asyncpg.pool.PoolConnectionProxy,
    release_id: str,
    site_id: str,
    procedure_id: str,
    draw_at: datetime,
    now: datetime,
) -> str | None:
    """Why a release may not be drawn at ``draw_at``, if it may not: a draw carries over
    the free places of the procedure's draws run before it, so one put before a draw that
    has closed would change that draw's places after its close."""
    closed = await _closed_undrawn(conn, release_id, site_id, procedure_id, now, draw_at)
    if closed is None:
        return None
    return (
        f"must come after the draw of {closed}, closed and not drawn yet: a draw before it "
        "would take the free places it carries over"
    )


def _map_integrity(exc: asyncpg.IntegrityConstraintViolationError) -> Exception:
    name = getattr(exc, "constraint_name", None)
    if name == "slot_not_overbooked":
        return SlotFull("No free place left on this slot")
    if name == "bookings_one_active_per_identity":
        return IdentityAlreadyBooked("This person already has an active booking for this procedure")
    return exc


def _release(row: asyncpg.Record, slots: Sequence[asyncpg.Record]) -> Release:
    return Release(
        id=row["id"],
        site_id=row["site_id"],
        procedure_id=row["procedure_id"],
        mode=row["mode"],
        opens_at=row["opens_at"],
        registration_opens_at=row["registration_opens_at"],
        registration_closes_at=row["registration_closes_at"],
        draw_at=row["draw_at"],
        timezone=row["timezone"],
        seed_commitment=row["seed_commitment"],
        entries_digest=row["entries_digest"],
        beacon=row["beacon"],
        beacon_source=row["beacon_source"],
        slots=tuple(
            Slot(s["id"], s["starts_at"], s["duration_minutes"], s["capacity"], s["booked"])
            for s in slots
        ),
    )


def _utc(moment: datetime) -> str:
    """Fixed-width UTC (microseconds always written), so text order is time order."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# book_hold answers every field of a Booking but the last two, who cancelled it and how.
_BOOK_HOLD_FIELDS = len(fields(Booking)) - 2


def _booking(row: asyncpg.Record) -> Booking:
    return Booking(*row.values())


async def _audit(
    conn: asyncpg.pool.PoolConnectionProxy,
    actor: str,
    action: str,
    subject: str,
    detail: dict[str, Any],
) -> None:
    if (who := logs.agent.get()) is not None:  # the staff agent of an admin request
        detail = {**detail, "agent": who}
    await conn.execute(
        "INSERT INTO audit_log (actor, action, subject, detail) VALUES ($1, $2, $3, $4::jsonb)",
        actor,
        action,
        subject,
        json.dumps(detail),
    )
