"""How long a big draw takes: 100 000 entries for 5 000 places, on a real PostgreSQL.

    python loadtests/draw_bench.py [--entries 100000] [--places 5000] [--bookings 0]
                                   [--pg-timeout 5] [--dsn DSN]

Creates a scratch site, a draw release of ``places`` places (10 per slot) and ``entries``
entries in the database (GUICHET_DATABASE_URL by default), then times the pure allocation
(engine.draw) and the whole draw as the engine runs it (Store.run_draw: allocation,
bookings and record, one transaction). ``--bookings N`` first adds N confirmed bookings of
another procedure (counter bookings made now, one person and one address each, the first
of them the entrants'), so that the draw's look-ups of the booking caps find a table of that
size and hits in it. While the draw runs, confirms of the other procedure (``book_hold``, one
after another in a process of their own) measure how long the draw holds confirms back: it
takes the booking caps' lock, which every confirm shares, for its last count of the caps
and its commit. Removes everything it created afterwards.
docs/draw.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import os
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from engine import draw
from engine.migrate import migrate
from engine.models import Procedure, Release, Site
from engine.reservations import SlotSpec, new_release, with_seed
from engine.settings import Settings
from engine.store import Store, create_pool
from engine.tokens import keyed_hash, new_id, new_reference, token_hash
from engine.web import json_bytes


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--places", type=int, default=5_000)
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "GUICHET_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/guichet"
        ),
    )
    parser.add_argument(
        "--pg-timeout",
        type=float,
        default=next(f.default for f in dataclasses.fields(Settings) if f.name == "pg_timeout_s"),
        help="the engine's GUICHET_PG_TIMEOUT_S: its statements' and idle transactions' limit",
    )
    parser.add_argument(
        "--bookings", type=int, default=0, help="bookings in the table before the draw"
    )
    args = parser.parse_args()
    await migrate(args.dsn)
    # As the engine's pool is: a draw must finish within the limits the engine runs under.
    pool = await create_pool(args.dsn, args.pg_timeout, 4)
    store = Store(pool, args.pg_timeout, 2)
    site_id = f"bench-{secrets.token_hex(4)}"
    now = datetime.now(UTC)
    procedures = (Procedure("bench", "Bench"), Procedure("other", "Other"))
    await store.upsert_site(Site(site_id, "Bench", "Europe/Paris", procedures))
    slots = [
        SlotSpec(now + timedelta(days=10, minutes=15 * i), 15, 10) for i in range(args.places // 10)
    ]
    release, seed = with_seed(
        new_release(
            site_id,
            "bench",
            "draw",
            slots,
            registration_opens_at=now - timedelta(days=2),
            registration_closes_at=now - timedelta(days=1),
            draw_at=now - timedelta(hours=1),
        )
    )
    await store.create_release(release, seed, now=now)
    other = new_release(
        site_id,
        "other",
        "fcfs",
        [
            SlotSpec(now + timedelta(days=5, minutes=15 * i), 15, SLOT_MAX)
            # Slots beyond those the loaded bookings fill: the confirms during the draw.
            for i in range(-(-args.bookings // SLOT_MAX) + CONFIRM_SLOTS)
        ],
        opens_at=now - timedelta(days=2),
    )
    await store.create_release(other, None, now=now)
    secret = secrets.token_bytes(32)
    rows = []
    for i in range(args.entries):
        entry_id = new_id("e", 20)
        rows.append(
            (
                entry_id,
                release.id,
                "bench",
                draw.entry_digest(entry_id),
                token_hash(entry_id),
                keyed_hash(secret, "identity", str(i)),
                keyed_hash(secret, "email", str(i)),
                f"Nom{i}",
                "Prénom",
                datetime(1990, 1, 1).date(),
                f"10.{i >> 16 & 255}.{i >> 8 & 255}.0/24",
            )
        )
    # Loading is the benchmark's own work: on a connection without the engine's limits.
    conn = await asyncpg.connect(args.dsn)
    try:
        start = time.perf_counter()
        await conn.copy_records_to_table(
            "entries",
            records=rows,
            columns=[
                "id",
                "release_id",
                "procedure_id",
                "digest",
                "token_hash",
                "identity_hash",
                "email_hash",
                "family_name",
                "given_names",
                "birth_date",
                "client_net",
            ],
        )
        print(f"entries: {args.entries} loaded in {time.perf_counter() - start:.2f} s (COPY)")
        if args.bookings:
            start = time.perf_counter()
            await load_bookings(conn, other, secret, args.bookings)
            took = time.perf_counter() - start
            print(f"bookings: {args.bookings} of another procedure loaded in {took:.2f} s")
    finally:
        await conn.close()
    try:
        digests = [r[3] for r in rows]
        places = [
            draw.Places(s.id, f"{s.starts_at:%Y-%m-%dT%H:%M:%S.%fZ}", s.capacity)
            for s in release.slots
        ]
        start = time.perf_counter()
        allocation = draw.allocate(seed or "", digests, "", places)
        pure = time.perf_counter() - start
        print(f"allocation alone (engine.draw): {pure:.2f} s for {len(allocation)} winners")
        # In a process of its own: in this one, the draw's computing would delay them too.
        spawn = multiprocessing.get_context("spawn")
        started, stop, out = spawn.Event(), spawn.Event(), spawn.Queue()
        room = [s.id for s in other.slots[-CONFIRM_SLOTS:]]
        confirming = spawn.Process(
            target=confirm_loop, args=(args.dsn, room, other.id, started, stop, out)
        )
        confirming.start()
        await asyncio.to_thread(started.wait, 30)
        start = time.perf_counter()
        stalls: list[float] = []
        ticker = asyncio.create_task(loop_stalls(stalls))
        outcome = await store.run_draw(
            release.id, datetime.now(UTC), lambda e: token_hash("cancel" + e), new_reference
        )
        total = time.perf_counter() - start
        ticker.cancel()
        stop.set()
        confirms: list[float] = await asyncio.to_thread(out.get, True, 30)
        confirming.join()
        assert outcome is not None
        print(
            f"the whole draw (Store.run_draw, one transaction): {total:.2f} s: "
            f"{outcome.entries} entries, {outcome.places} places, "
            f"{outcome.allocated} bookings created"
        )
        print(
            f"the event loop meanwhile (the worker's requests wait this long): longest stall "
            f"{max(stalls) * 1000:.0f} ms, stalls over 50 ms: {sum(s > 0.05 for s in stalls)}"
        )
        print(
            f"confirms of another procedure meanwhile: {len(confirms)}, longest "
            f"{max(confirms, default=0) * 1000:.0f} ms, median "
            f"{sorted(confirms)[len(confirms) // 2] * 1000 if confirms else 0:.1f} ms"
        )
        reads = []
        for _ in range(5):
            start = time.perf_counter()
            record = await store.draw_record(release.id)
            body = json_bytes(record)
            reads.append(time.perf_counter() - start)
        assert record is not None
        print(
            f"the record, read and serialised as GET /draw does on a miss: {len(body):,} bytes, "
            f"{min(reads) * 1000:.0f} - {max(reads) * 1000:.0f} ms (5 reads); each worker "
            "then keeps it"
        )
        start = time.perf_counter()
        problems = draw.verify(record)
        print(
            f"verify-draw on the record: {time.perf_counter() - start:.2f} s, "
            f"{'OK' if not problems else problems[:3]}"
        )
    finally:
        await pool.close()
        conn = await asyncpg.connect(args.dsn)  # the benchmark's own work, as the loading
        async with conn.transaction():
            await conn.execute("DELETE FROM draws WHERE release_id = $1", release.id)
            await conn.execute(
                "UPDATE entries SET booking_reference = NULL, "
                "status = 'not-drawn' WHERE release_id = $1",
                release.id,
            )
            await conn.execute("DELETE FROM entries WHERE release_id = $1", release.id)
            await conn.execute("DELETE FROM bookings WHERE release_id = $1", release.id)
            # Loaded without the slot counter's trigger: removed without it too.
            await conn.execute("ALTER TABLE bookings DISABLE TRIGGER USER")
            await conn.execute("DELETE FROM bookings WHERE release_id = $1", other.id)
            await conn.execute("ALTER TABLE bookings ENABLE TRIGGER USER")
            for rel_id in (release.id, other.id):
                await conn.execute("DELETE FROM audit_log WHERE subject = $1", rel_id)
                await conn.execute("DELETE FROM slots WHERE release_id = $1", rel_id)
                await conn.execute("DELETE FROM releases WHERE id = $1", rel_id)
            await conn.execute("DELETE FROM sites WHERE id = $1", site_id)
        await conn.close()


async def loop_stalls(stalls: list[float]) -> None:
    """How late each 1 ms sleep of this event loop wakes: what a request arriving during the
    draw would wait for the loop."""
    while True:
        before = time.perf_counter()
        await asyncio.sleep(0.001)
        stalls.append(time.perf_counter() - before - 0.001)


SLOT_MAX = 10_000  # the most places a slot may have (sql/001's CHECK)
CONFIRM_SLOTS = 5  # room for 50 000 confirms during the draw

BOOK = """SELECT outcome FROM book_hold($1, $2, $3, 'other', 'staff', $1, '\\x00', $4, $4,
              'Nom', 'Prénom', '1990-01-01', '\\x00', '10.0.0.0/24', '30 days', 3, 2, 4)"""


def confirm_loop(
    dsn: str, slots: list[str], release_id: str, started: Any, stop: Any, out: Any
) -> None:
    """Confirms of ``slots``, one after another until ``stop``, each a new person and
    address, as a worker's would be (one ``book_hold`` call): puts how long each took on
    ``out``."""

    async def run() -> list[float]:
        took = []
        conn = await asyncpg.connect(dsn)
        try:
            started.set()
            while not stop.is_set():
                person = secrets.token_bytes(32)
                before = time.perf_counter()
                slot = slots[len(took) // SLOT_MAX]  # each slot takes SLOT_MAX
                outcome = await conn.fetchval(BOOK, new_reference(), slot, release_id, person)
                took.append(time.perf_counter() - before)
                assert outcome == "booked", outcome
        finally:
            await conn.close()
        return took

    out.put(asyncio.run(run()))


async def load_bookings(conn: asyncpg.Connection, other: Release, secret: bytes, n: int) -> None:
    """``n`` confirmed counter bookings of ``other``'s slots, made now: person and address
    ``j`` each, as the entries' are numbered. Loaded with COPY and without the trigger that
    counts a slot's bookings (one UPDATE per row), in one transaction."""
    rows = [
        (
            f"BB-{j:010d}",
            other.slots[j // SLOT_MAX].id,
            other.id,
            "other",
            "staff",
            keyed_hash(secret, "identity", str(j)),
            keyed_hash(secret, "email", str(j)),
            f"Nom{j}",
            "Prénom",
            token_hash(f"cancel{j}"),
        )
        for j in range(n)
    ]
    async with conn.transaction():
        await conn.execute("ALTER TABLE bookings DISABLE TRIGGER USER")
        await conn.copy_records_to_table(
            "bookings",
            records=rows,
            columns=[
                "reference",
                "slot_id",
                "release_id",
                "procedure_id",
                "channel",
                "identity_hash",
                "email_hash",
                "family_name",
                "given_names",
                "cancel_token_hash",
            ],
        )
        await conn.execute("ALTER TABLE bookings ENABLE TRIGGER USER")
    await conn.execute("ANALYZE bookings")


if __name__ == "__main__":
    asyncio.run(main())
