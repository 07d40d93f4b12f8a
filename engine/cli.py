"""The ``guichet`` command (also ``python -m engine``).

serve       serve the HTTP API (GUICHET_HOST, GUICHET_PORT, GUICHET_WORKERS)
migrate     apply the SQL migrations and functions the database has not seen (idempotent)
demo        seed the demo sites and releases (idempotent)
sweep       one sweeper pass now: reclaim, settle stale confirms, reconcile, and run the
            draws that are due
verify-draw RECORD [--commitment C] [--entry-id E]
            recompute a draw from its public record (a file or a URL); exit 0 when it
            matches, 1 with what differs. With the seed commitment you kept from when
            registration opened, check the record's against it; with your entry id, say
            what the draw gave you
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from engine.errors import StoreUnavailable
from engine.settings import ConfigError, Settings, unknown_variables

if TYPE_CHECKING:
    from engine.reservations import Reservations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guichet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve the HTTP API")
    migrating = sub.add_parser("migrate", help="apply pending SQL migrations")
    migrating.add_argument(
        "--timeout",
        type=_seconds,
        default=30.0,
        help="most seconds a statement may take (default 30; an index on a large table "
        "may need more)",
    )
    migrating.add_argument(
        "--lock-timeout",
        type=_seconds,
        default=5.0,
        help="most seconds to wait for a table's lock, then fail and leave the table to "
        "its requests (default 5)",
    )
    sub.add_parser("demo", help="seed demo sites and releases")
    sub.add_parser("sweep", help="run one sweeper pass, with a reconcile, due draws and the purge")
    verify = sub.add_parser("verify-draw", help="recompute a draw from its public record")
    verify.add_argument("record", help="a file, or an http(s) URL of GET /v1/releases/ID/draw")
    verify.add_argument(
        "--commitment",
        help="the seed_commitment you kept from GET /v1/releases when registration opened: "
        "the record's must be the same (the record alone is checked only against itself)",
    )
    verify.add_argument(
        "--entries-digest",
        help="the entries_digest you kept from GET /v1/releases after registration closed: "
        "the record's must be the same (no entry added or removed since)",
    )
    verify.add_argument(
        "--entry-id", help="your entry id (from your registration): say what the draw gave it"
    )
    verify.add_argument(
        "--timeout",
        type=_seconds,
        default=120.0,
        help="most seconds to fetch the record from a URL, in all (default 120)",
    )
    args = parser.parse_args(argv)
    if args.command == "verify-draw":
        return _verify_draw(
            args.record, args.commitment, args.entries_digest, args.entry_id, args.timeout
        )

    from engine import logs

    logs.configure()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"guichet: {exc}", file=sys.stderr)
        return 2
    for name in unknown_variables(os.environ):
        print(f"guichet: warning: {name} is not a setting; it is ignored", file=sys.stderr)
    if args.command == "serve":
        from engine.serve import ListenError, serve

        try:
            serve(settings)
        except ConfigError as exc:
            print(f"guichet: {exc}", file=sys.stderr)
            return 2
        except ListenError as exc:
            print(f"guichet: {exc}", file=sys.stderr)
            return 1
        return 0
    # Not a worker: its metrics must not land among the workers' (prometheus-client's
    # multiprocess folder, where a heartbeat left by a command that has ended would read as
    # a worker stuck), nor does anything scrape them.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    commands: dict[str, Callable[[Settings], Coroutine[Any, Any, int]]] = {
        "migrate": lambda s: _migrate(s, args.timeout, args.lock_timeout),
        "demo": _demo,
        "sweep": _sweep,
    }
    try:
        return asyncio.run(commands[args.command](settings))
    except StoreUnavailable as exc:
        print(f"guichet: {exc.detail}; try again", file=sys.stderr)
        return 1


def _seconds(text: str) -> float:
    value = float(text)
    if not 0.001 <= value <= 86400:  # PostgreSQL counts milliseconds, and 0 is no limit
        raise argparse.ArgumentTypeError(f"{text}: seconds, from 0.001 to 86400")
    return value


async def _migrate(settings: Settings, timeout_s: float, lock_timeout_s: float) -> int:
    import asyncpg

    from engine.migrate import migrate

    try:
        applied = await migrate(
            settings.migrate_database_url or settings.database_url,
            timeout_s=timeout_s,
            lock_timeout_s=lock_timeout_s,
        )
    except (RuntimeError, ValueError) as exc:  # what to do about it, in its message
        print(f"guichet: {exc}", file=sys.stderr)
        return 1
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        # Nothing of the migration that failed stayed: each file commits with its record.
        why = str(exc) or "no answer within the time limit"
        print(
            f"guichet: migrate failed, run it again: {type(exc).__name__}: {why}", file=sys.stderr
        )
        return 1
    print(
        f"guichet: {len(applied.versions)} migration(s) applied"
        + (f": {applied.versions}" if applied.versions else "")
        + f"; {len(applied.functions)} function(s) applied"
        + (f": {applied.functions}" if applied.functions else "")
    )
    return 0


async def _demo(settings: Settings) -> int:
    from engine import demo

    async with _domain(settings) as domain:
        created = await demo.seed(domain)
    print(f"guichet: demo seeded, {len(created)} release(s) created")
    return 0


async def _sweep(settings: Settings) -> int:
    from engine.lottery import Lottery
    from engine.sweeper import sweep_once

    async with _domain(settings) as domain:
        report = await sweep_once(domain, reconcile=True, lottery=Lottery(domain))
        if report.standby:
            # A pass that did nothing must not read as one that found nothing to do.
            print(
                "guichet: a worker is sweeping (it holds the sweeper's lock), so this pass "
                "did nothing; try again in a few seconds",
                file=sys.stderr,
            )
            return 1
        bookings = entries = 0
        # The purge by hand: the whole backlog, and a failure fails the command.
        while settings.retention_days:
            purged = await domain.store.purge(settings.retention_days)
            bookings, entries = bookings + purged.bookings, entries + purged.entries
            if purged.failures:
                raise purged.failures[0][1]
            if not purged.more:
                break
    print(
        f"guichet: swept {report.releases} release(s), settled {report.settled} confirm(s), "
        f"{report.corrections} correction(s), ran {report.draws} draw(s), purged the personal "
        f"data of {bookings} booking(s) and {entries} entry(ies)"
    )
    return 0


# The largest record fetched: one of 100 000 entries is about 10 MiB.
RECORD_MAX_BYTES = 256 * 1024 * 1024


def _fetch(url: str, timeout_s: float) -> str:
    """The body at ``url``, within ``timeout_s`` in all. urllib's timeout is each read's:
    a server that sent its headers or its body a byte at a time, or for ever, held the
    command as long. The fetch runs in a thread of its own, given up on at the deadline
    (a daemon thread: it ends with the command)."""
    done: list[str | BaseException] = []

    def fetch() -> None:
        try:
            done.append(_get(url, timeout_s))
        except BaseException as exc:  # handed to the command's thread
            done.append(exc)

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not done:
        raise TimeoutError(f"the record took more than {timeout_s:g} s to come")
    if isinstance(done[0], BaseException):
        raise done[0]
    return done[0]


def _get(url: str, timeout_s: float) -> str:
    import http.client
    import urllib.request

    chunks: list[bytes] = []
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=min(30.0, timeout_s)) as response:  # noqa: S310
            while chunk := response.read1(1 << 16):
                size += len(chunk)
                if size > RECORD_MAX_BYTES:
                    raise ValueError(f"the record is larger than {RECORD_MAX_BYTES >> 20} MiB")
                chunks.append(chunk)
            if response.length:  # read1 does not say so: the connection closed early
                raise ValueError("the record was cut short")
    except http.client.HTTPException as exc:  # not HTTP, or a chunked answer cut short
        raise ValueError(f"not a whole HTTP answer: {exc!r}") from exc
    return b"".join(chunks).decode()


def _verify_draw(
    source: str,
    commitment: str | None,
    entries_digest: str | None,
    entry_id: str | None,
    timeout_s: float,
) -> int:
    """Recompute a draw record. Reads a file, or fetches an http(s) URL. ``commitment``
    and ``entries_digest``: as the person kept them from the listing."""
    from engine import draw

    try:
        if source.startswith(("http://", "https://")):
            text = _fetch(source, timeout_s)
        else:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        record = draw.load(text)
    except (OSError, ValueError) as exc:
        print(f"guichet verify-draw: cannot read {source}: {exc}", file=sys.stderr)
        return 2
    problems = draw.verify(record)
    mine = draw.entry_digest(entry_id) if entry_id is not None else None
    if draw.malformed(record) is None:  # else verify says so, and nothing else is read
        if commitment is not None and commitment.strip().lower() != record["seed_commitment"]:
            problems.append(
                "the record's seed commitment is not the commitment you kept: the seed is "
                "not the one committed to when registration opened"
            )
        if (
            entries_digest is not None
            and entries_digest.strip().lower() != record["entries_digest"]
        ):
            problems.append(
                "the record's entries digest is not the one you kept: the entry list is not "
                "the one frozen when registration closed"
            )
        if mine is not None and mine not in record["entries"]:
            problems.append(f"your entry (digest {mine}) is not in the entry list")
    if problems:
        print(
            f"guichet verify-draw: the record of {record.get('release')} does NOT match:",
            file=sys.stderr,
        )
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(
        f"guichet verify-draw: OK: {len(record['allocation'])} place(s) allocated among "
        f"{len(record['entries'])} entries of {record['release']}, as published"
        + (", from the seed committed to" if commitment is not None else "")
        + (", on the entries frozen at the close" if entries_digest is not None else "")
    )
    if record.get("beacon_source") and not record.get("beacon"):
        print(
            "guichet verify-draw: WARNING: the draw used no beacon, though the release named "
            f"its source ({record['beacon_source']}): whoever knew the seed could know the "
            "ranking before the draw"
        )
    elif record.get("beacon_source"):
        print(
            f"guichet verify-draw: beacon {record['beacon']!r}: check it against its source, "
            f"named when the release was published: {record['beacon_source']}"
        )
    if mine is not None:
        if mine in record["allocation"]:
            outcome = f"won a place on slot {record['allocation'][mine]}"
        elif mine in record.get("excluded", []):
            outcome = "was passed over (booked otherwise, at a cap, or withdrawn: docs/draw.md)"
        else:
            outcome = "was not drawn"
        print(f"guichet verify-draw: your entry (digest {mine}) {outcome}")
    return 0


@contextlib.asynccontextmanager
async def _domain(settings: Settings) -> AsyncIterator[Reservations]:
    """The domain with its stores, for one command."""
    from engine.app import close_stores, redis_client
    from engine.inventory import Inventory
    from engine.metrics import Metrics
    from engine.reservations import Reservations
    from engine.store import IdentityRules, Store, create_pool

    pool = await create_pool(
        settings.database_url, settings.pg_timeout_s, 2, settings.pg_statement_cache_size
    )
    redis = redis_client(settings)
    inventory = Inventory(redis, settings.redis_timeout_s, settings.retry_after_s)
    try:
        yield Reservations(
            settings,
            Store(pool, settings.pg_timeout_s, settings.retry_after_s, IdentityRules.of(settings)),
            inventory,
            Metrics(),
        )
    finally:
        await close_stores(pool, inventory.pipelining, redis, settings.pg_timeout_s)
