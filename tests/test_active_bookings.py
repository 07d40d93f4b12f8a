"""A booking is a person's active one until its appointment is over
(sql/009_retired_at.sql, sql/010_past_appointments.sql).

DESIGN.md allows one active booking per person per procedure. A residence permit is renewed
every one to four years, and a person told to come back with a missing paper must book
again: an appointment that is over must not bar the next one, nor count in the email cap,
nor bar or exclude a draw entry. It stays a confirmed booking all the same (its reference
reads the same, and the agenda of its day still lists it).

Whether an appointment is over is PostgreSQL's clock's to say, as every check of it runs
there. So each test sets the engine's clock three days back, books a slot that starts two
days later, that is yesterday by PostgreSQL's clock, then sets the clock right again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from engine.appkeys import LOTTERY
from tests.api import ADMIN, Api, applicant, ip
from tests.conftest import FakeClock
from tests.test_limits import engine

DAY = 86400.0


async def book_yesterday(
    api: Api, clock: FakeClock, person: dict[str, str], n: int
) -> dict[str, Any]:
    """Book ``person`` on a slot that started yesterday (by PostgreSQL's clock); return the
    booking. The engine's clock is three days back meanwhile."""
    clock.now -= 3 * DAY
    past = await api.publish([1], starts_in_days=2)
    booking = (await api.book(past["slots"][0]["id"], person, ip(n)))["booking"]
    clock.now += 3 * DAY
    return booking  # type: ignore[no-any-return]


async def test_a_person_books_the_procedure_again_once_their_appointment_is_over(
    api: Api, clock: FakeClock
) -> None:
    await api.site()
    person = applicant()
    before = await book_yesterday(api, clock, person, 1)
    release = await api.publish([1, 1])
    first, second = (s["id"] for s in release["slots"])
    again = await api.book(first, person, ip(2))
    assert again["booking"]["status"] == "confirmed"
    # The new one is active: a third is refused, as a second always was.
    hold = (await api.hold(second, ip(3))).body
    refused = await api.confirm(hold, person, ip(3))
    assert (refused.status, refused.body["type"]) == (409, "/problems/identity-already-booked")
    # The appointment that is over stays a confirmed booking, on its day's agenda.
    # The site's day (the time is written in its zone), whatever the hour in UTC.
    day = datetime.fromisoformat(before["slot"]["starts_at"]).date()
    agenda = await api.call("GET", f"/v1/admin/agenda?site=bobigny&date={day}", headers=ADMIN)
    assert [b["reference"] for b in agenda.body["bookings"]] == [before["reference"]]


async def test_the_email_cap_counts_appointments_to_come_only(clean: None) -> None:
    async with engine(max_active_per_email=1) as api:
        email = "family@example.org"
        await book_yesterday(api, api.clock, applicant(email=email), 1)  # type: ignore[arg-type]
        release = await api.publish([1, 1])
        first, second = (s["id"] for s in release["slots"])
        await api.book(first, applicant(email=email), ip(2))
        hold = (await api.hold(second, ip(3))).body
        capped = await api.confirm(hold, applicant(email=email), ip(3))
        assert capped.status == 429 and capped.body["level"] == "email"


async def test_an_appointment_that_is_over_neither_bars_a_draw_entry_nor_excludes_it(
    api: Api, clock: FakeClock
) -> None:
    await api.site()
    person = applicant()
    await book_yesterday(api, clock, person, 1)
    release = (await api.publish_draw([1]))["id"]
    entry = await api.enter(release, person, ip(2))
    assert entry.status == 201, entry.body
    clock.advance(90001)
    await api.client.app[LOTTERY].run_due()
    path = f"/v1/releases/{release}/entries/{entry.body['entry_id']}"
    view = await api.call(
        "GET", path, headers={"Authorization": f"Bearer {entry.body['entry_token']}"}
    )
    assert view.body["status"] == "won", view.body
    record = (await api.call("GET", f"/v1/releases/{release}/draw")).body
    assert record["excluded"] == []
