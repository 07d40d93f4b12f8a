"""What PostgreSQL says of one load-test release: its slots, the overbooked slots of the
whole database, and the release's confirmed bookings, the bots' apart.

    python loadtests/dbcheck.py DSN RELEASE BOT_FAMILY_PREFIX < CONFIRMED.json

prints one JSON object. Its standard input is a JSON list of booking references the engine
answered confirmed (201) and the run did not cancel: ``missing`` counts those PostgreSQL
does not have confirmed, each a confirmed booking lost. The locustfile runs it at the end of
a run, in a process of its own (Locust's gevent and asyncpg's event loop do not mix), and
through the engine's own driver rather than `psql`, which a machine whose PostgreSQL `make
test` installed may not have on its PATH. The bots' bookings are told apart by the family
names the locustfile gives their buyers, whatever networks their confirms or entries came
from. A draw's winners may be given places left free in the procedure's earlier draws (an
earlier run's): they are counted by their entries.
"""

from __future__ import annotations

import asyncio
import json
import sys

import asyncpg

QUERY = """
SELECT
    (SELECT count(*) FROM slots WHERE release_id = $1) AS slots,
    (SELECT count(*) FROM slots s WHERE s.capacity < (
        SELECT count(*) FROM bookings b WHERE b.slot_id = s.id AND b.status = 'confirmed'
    )) AS overbooked,
    count(*) AS bookings,
    count(*) FILTER (WHERE b.family_name LIKE $2 || '%') AS bot_bookings
FROM bookings b
WHERE b.status = 'confirmed'
  AND (b.release_id = $1 OR b.entry_id IN (SELECT id FROM entries WHERE release_id = $1))
"""


MISSING = """
SELECT count(*) FROM unnest($1::text[]) AS told(reference)
WHERE NOT EXISTS (
    SELECT 1 FROM bookings b WHERE b.reference = told.reference AND b.status = 'confirmed'
)
"""


async def check(
    dsn: str, release: str, bot_prefix: str, confirmed: list[str] | None = None
) -> dict[str, int]:
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        row = await conn.fetchrow(QUERY, release, bot_prefix, timeout=30)
        missing = await conn.fetchval(MISSING, confirmed or [], timeout=30)
    finally:
        await conn.close()
    assert row is not None
    return {**dict(row.items()), "missing": missing}


def main() -> None:
    dsn, release, bot_prefix = sys.argv[1:4]
    confirmed = json.loads(sys.stdin.read() or "[]")
    print(json.dumps(asyncio.run(check(dsn, release, bot_prefix, confirmed))))


if __name__ == "__main__":
    main()
