"""Personal data is erased GUICHET_RETENTION_DAYS after the appointment (sql/011).

As in test_active_bookings.py, an appointment in the past (by PostgreSQL's clock, which the
purge reads) is booked with the engine's clock set back, then the clock is set right.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from engine.appkeys import LOTTERY, RESERVATIONS
from engine.settings import Settings
from engine.store import Purged
from engine.sweeper import sweep, sweep_once
from tests.api import ADMIN, Api, applicant, as_applicant, ip
from tests.conftest import FakeClock
from tests.test_limits import engine

DAY = 86400.0


async def backdate(pg: asyncpg.Connection, days: float) -> None:
    """Move the rows' creation times back as the engine's clock was: PostgreSQL stamps them
    with its own, and the purge reads them (an appointment ends after it was booked)."""
    for table in ("bookings", "entries"):
        await pg.execute(
            f"UPDATE {table} SET created_at = created_at - make_interval(secs => $1)",
            days * DAY,
        )


def identity_hash(person: dict[str, str], secret: bytes) -> bytes:
    return as_applicant(person).identity_hash(secret)


async def test_a_booking_keeps_no_personal_data_past_its_retention(
    api: Api, clock: FakeClock, pg: asyncpg.Connection, settings: Settings
) -> None:
    await api.site()
    person, other = applicant(), applicant()
    clock.now -= 3 * DAY
    past = await api.publish([1], starts_in_days=2)  # yesterday, by PostgreSQL's clock
    booked = await api.book(past["slots"][0]["id"], person, ip(1))
    await backdate(pg, 3)
    clock.now += 3 * DAY
    future = await api.publish([1])
    await api.book(future["slots"][0]["id"], other, ip(2))
    store = api.client.app[RESERVATIONS].store
    assert await store.purge(2) == Purged(0, 0, more=False)  # over for a day only
    assert await store.purge(0) == Purged(1, 0, more=False)
    assert await store.purge(0) == Purged(0, 0, more=False)
    reference = booked["booking"]["reference"]
    row = await pg.fetchrow("SELECT * FROM bookings WHERE reference = $1", reference)
    assert (row["family_name"], row["given_names"], row["birth_date"]) == ("", "", None)
    assert row["client_net"] is None and row["purged_at"] is not None
    assert row["identity_hash"] != identity_hash(person, settings.secret)
    kept = await pg.fetchrow("SELECT * FROM bookings WHERE reference <> $1", reference)
    assert kept["family_name"] == other["family_name"] and kept["purged_at"] is None
    assert kept["identity_hash"] == identity_hash(other, settings.secret)
    # The booking itself stays: it reads, counts in its slot, and shows on its day's agenda.
    read = await api.call(
        "GET",
        f"/v1/bookings/{reference}",
        headers={"Authorization": f"Bearer {booked['cancel_token']}"},
    )
    assert read.body["booking"]["status"] == "confirmed"
    assert read.body["booking"]["applicant"] == {"family_name": "", "given_names": ""}
    assert await pg.fetchval("SELECT booked FROM slots WHERE id = $1", past["slots"][0]["id"]) == 1
    # The site's day (the time is written in its zone), whatever the hour in UTC.
    day = datetime.fromisoformat(booked["booking"]["slot"]["starts_at"]).date()
    agenda = await api.call("GET", f"/v1/admin/agenda?site=bobigny&date={day}", headers=ADMIN)
    [line] = agenda.body["bookings"]
    assert (line["reference"], line["family_name"], line["birth_date"]) == (reference, "", None)
    csv = await api.call(
        "GET",
        f"/v1/admin/agenda?site=bobigny&date={day}",
        headers={**ADMIN, "Accept": "text/csv"},
    )
    assert reference in csv.body


async def test_draw_entries_keep_no_personal_data_past_their_retention(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    await api.site()
    clock.now -= 10 * DAY
    release = (await api.publish_draw([1]))["id"]  # slots three days on: a week ago
    entry = await api.enter(release, applicant(), ip(1))
    assert entry.status == 201, entry.body
    clock.advance(90001)
    await api.client.app[LOTTERY].run_due()
    clock.now += 10 * DAY - 90001
    await backdate(pg, 10)
    store = api.client.app[RESERVATIONS].store
    assert await store.purge(9) == Purged(0, 0, more=False)
    assert await store.purge(5) == Purged(1, 1, more=False)  # the entry, and the booking it won
    row = await pg.fetchrow("SELECT * FROM entries WHERE id = $1", entry.body["entry_id"])
    assert (row["family_name"], row["birth_date"], row["status"]) == ("", None, "won")
    record = await api.call("GET", f"/v1/releases/{release}/draw")
    assert record.status == 200 and len(record.body["entries"]) == 1


async def test_entries_of_a_draw_that_never_ran_are_purged_and_then_passed_over(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    # A draw that fails for months must not keep its entrants' data past the retention; and
    # if it runs at last, a purged entry must not win a place carried from another draw,
    # which would book someone without a name.
    await api.site()
    clock.now -= 100 * DAY
    # A draw of the procedure before it, drawn with nobody entered: its place (a slot in
    # 100 days) is carried to the next.
    carrier = await api.publish_draw([1], closes_in_s=1, draw_in_s=2, starts_in_days=200)
    clock.advance(3)
    lottery = api.client.app[LOTTERY]
    assert (await lottery.run(carrier["id"])) is not None
    late = (await api.publish_draw([1]))["id"]  # slots 97 days ago; its draw was due 99
    entry = await api.enter(late, applicant(), ip(1))
    assert entry.status == 201, entry.body
    clock.now += 100 * DAY
    await backdate(pg, 100)
    store = api.client.app[RESERVATIONS].store
    assert await store.purge(5) == Purged(0, 1, more=False)
    row = await pg.fetchrow("SELECT * FROM entries WHERE id = $1", entry.body["entry_id"])
    assert (row["family_name"], row["birth_date"], row["status"]) == ("", None, "registered")
    [outcome] = await lottery.run_due()
    # One place, the carrier's (its own slots have started), and nobody to take it.
    assert (outcome.entries, outcome.places, outcome.allocated) == (1, 1, 0)
    row = await pg.fetchrow("SELECT * FROM entries WHERE id = $1", entry.body["entry_id"])
    assert (row["status"], row["excluded"]) == ("withdrawn", True)
    assert await pg.fetchval("SELECT count(*) FROM bookings") == 0
    record = await api.call("GET", f"/v1/releases/{late}/draw")
    assert record.status == 200 and record.body["excluded"] == [row["digest"]]


async def test_the_sweeper_purges_past_the_retention_it_is_set_to(
    clean: None, pg: asyncpg.Connection
) -> None:
    async with engine(retention_days=30) as api:
        clock = api.clock
        assert isinstance(clock, FakeClock)
        clock.now -= 40 * DAY
        old = await api.publish([1], starts_in_days=2)  # 38 days ago
        await api.book(old["slots"][0]["id"], applicant(), ip(1))
        await backdate(pg, 40)
        clock.now += 40 * DAY
        recent = await api.publish([1], starts_in_days=1)
        await api.book(recent["slots"][0]["id"], applicant(), ip(2))
        domain = api.client.app[RESERVATIONS]
        assert (await sweep_once(domain, reconcile=False)).purged is None
        assert (await sweep_once(domain, reconcile=False, purge=True)).purged == Purged(1, 0, False)
    async with engine(retention_days=0) as api:
        domain = api.client.app[RESERVATIONS]
        assert (await sweep_once(domain, reconcile=False, purge=True)).purged is None


async def test_a_backlog_is_purged_a_bounded_part_at_a_time(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """The first run after an upgrade finds every old booking at once: each call erases at
    most its batches, says there is more, and the sweeper comes back at its next pass."""
    await api.site()
    clock.now -= 3 * DAY
    past = await api.publish([5], starts_in_days=2)
    for n in range(5):
        await api.book(past["slots"][0]["id"], applicant(), ip(n + 1))
    clock.now += 3 * DAY
    store = api.client.app[RESERVATIONS].store
    assert await store.purge(0, batch=2, batches=2) == Purged(4, 0, more=True)
    assert await store.purge(0, batch=2, batches=2) == Purged(1, 0, more=False)
    assert await pg.fetchval("SELECT count(*) FROM bookings WHERE purged_at IS NULL") == 0


async def test_a_registered_entry_is_kept_until_its_draw(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """A draw whose own slots are long past (its places may come from other releases) keeps
    its entries' data until the draw has dealt with them, or was due before the cutoff."""
    await api.site()
    clock.now -= 10 * DAY
    release = (await api.publish_draw([1], draw_in_s=30 * DAY))["id"]
    assert (await api.enter(release, applicant(), ip(1))).status == 201
    await backdate(pg, 10)
    clock.now += 10 * DAY
    store = api.client.app[RESERVATIONS].store
    assert await store.purge(0) == Purged(0, 0, more=False)
    assert await pg.fetchval("SELECT count(*) FROM entries WHERE purged_at IS NULL") == 1


async def test_the_purge_of_one_kind_failing_keeps_none_of_the_other(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """The bookings' purge failing (here: its statement waits on a table lock past its
    limit) does not keep the draw entries' personal data: each kind is tried on its own,
    and each failure is counted by kind, for the alert GuichetPurgeFailing."""
    await api.site()
    clock.now -= 100 * DAY
    past = await api.publish([1], starts_in_days=2)
    await api.book(past["slots"][0]["id"], applicant(), ip(1))
    release = (await api.publish_draw([1]))["id"]  # its draw was due 99 days ago
    assert (await api.enter(release, applicant(), ip(2))).status == 201
    clock.now += 100 * DAY
    await backdate(pg, 100)
    domain = api.client.app[RESERVATIONS]

    def failures(kind: str) -> float | None:
        return domain.metrics.registry.get_sample_value(
            "guichet_purge_failures_total", {"kind": kind}
        )

    async with pg.transaction():
        await pg.execute("LOCK TABLE bookings IN EXCLUSIVE MODE")  # reads go on
        purged = (await sweep(domain, reconcile=False, purge=True)).purged
    assert purged is not None and (purged.bookings, purged.entries) == (0, 1)
    assert [kind for kind, _ in purged.failures] == ["bookings"]
    assert (failures("bookings"), failures("entries")) == (1, 0)
    assert not purged.more  # tried again the next hour, not at every pass
    assert (await sweep(domain, reconcile=False, purge=True)).purged == Purged(1, 0, more=False)
