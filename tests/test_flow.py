"""The booking flow of API.md, end to end through HTTP, against real Redis and PostgreSQL."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import asyncpg
import pytest

from engine import inventory as inventory_module
from engine.appkeys import SETTINGS
from engine.tokens import derived_token, token_hash
from tests.api import Api, applicant


async def test_hold_confirm_read_cancel(api: Api) -> None:
    await api.site()
    release = await api.publish([2])
    slot = release["slots"][0]["id"]
    assert await api.free(release["id"]) == {slot: 2}

    hold = await api.hold(slot)
    assert hold.status == 201
    assert hold.body["slot"]["id"] == slot
    assert await api.free(release["id"]) == {slot: 1}

    person = applicant()
    done = await api.confirm(hold.body, person)
    assert done.status == 201, done.body
    booking = done.body["booking"]
    assert booking["status"] == "confirmed"
    assert booking["applicant"] == {
        "family_name": person["family_name"],
        "given_names": person["given_names"],
    }
    assert await api.free(release["id"]) == {slot: 1}

    cancel = {"Authorization": f"Bearer {done.body['cancel_token']}"}
    read = await api.call("GET", f"/v1/bookings/{booking['reference']}", headers=cancel)
    assert read.status == 200 and read.body["booking"] == booking
    typed = booking["reference"].lower().replace("-", "")  # as a phone's keyboard gives it
    read = await api.call("GET", f"/v1/bookings/{typed}", headers=cancel)
    assert read.status == 200 and read.body["booking"] == booking

    gone = await api.call("DELETE", f"/v1/bookings/{booking['reference']}", headers=cancel)
    assert gone.status == 204
    read = await api.call("GET", f"/v1/bookings/{booking['reference']}", headers=cancel)
    assert read.body["booking"]["status"] == "cancelled"
    assert read.body["booking"]["cancelled_by"] == "person"
    assert await api.free(release["id"]) == {slot: 2}
    # The confirm's retry (its answer lost) gets the booking as it is now.
    again = await api.confirm(hold.body, person)
    assert again.status in (200, 201), again.body
    assert again.body["booking"] == read.body["booking"]


async def test_a_hold_retried_with_its_challenge_gets_the_same_hold(api: Api) -> None:
    """A client whose hold was granted but whose reply was lost (a 503 after Redis ran the
    hold) retries the same request: it gets that hold back, not 410 for the spent challenge
    and then 429 for a hold it never saw."""
    await api.site()
    release = await api.publish([3, 3])
    first, second = (s["id"] for s in release["slots"])
    paid = await api.solved(release["id"], "10.0.0.7")
    one = await api.hold(first, "10.0.0.7", paid=paid)
    again = await api.hold(first, "10.0.0.7", paid=paid)
    assert one.status == again.status == 201, (one.body, again.body)
    assert again.body["hold_id"] == one.body["hold_id"]
    assert again.body["hold_token"] == one.body["hold_token"]
    assert again.body["expires_at"] == one.body["expires_at"]
    assert await api.free(release["id"]) == {first: 2, second: 3}
    # The challenge still buys nothing else: not another slot, nor from another address.
    assert (await api.hold(second, "10.0.0.7", paid=paid)).status == 410
    assert (await api.hold(first, "10.0.0.8", paid=paid)).status in (403, 410)
    # Once the hold is confirmed, the challenge is simply spent.
    assert (await api.confirm(one.body, applicant())).status == 201
    assert (await api.hold(first, "10.0.0.7", paid=paid)).status == 410


async def test_a_hold_retried_after_its_challenge_ran_out_gets_the_same_hold(api: Api) -> None:
    """The same retry, minutes later (a phone off the network): the challenge's time has run
    out, the hold's has not. The hold comes back; the challenge buys nothing new."""
    await api.site()
    release = await api.publish([3, 3])
    first, second = (s["id"] for s in release["slots"])
    paid = await api.solved(release["id"], "10.0.0.7")
    one = await api.hold(first, "10.0.0.7", paid=paid)
    api.clock.advance(301)  # the challenge lives 300 s, the hold 600 s
    again = await api.hold(first, "10.0.0.7", paid=paid)
    assert (again.status, again.body) == (201, one.body)
    late = await api.hold(second, "10.0.0.7", paid=paid)
    assert late.status == 410 and "time ran out" in late.body["detail"]
    assert await api.free(release["id"]) == {first: 2, second: 3}
    api.clock.advance(300)  # the hold has expired too
    assert (await api.hold(first, "10.0.0.7", paid=paid)).status == 410


async def test_a_hold_ends_when_its_slot_starts(api: Api) -> None:
    """A hold taken two minutes before its slot started lived its whole ten minutes: the
    confirm, eight minutes into the appointment, booked it (201), for a time already
    begun, which the person could not cancel (409 not-open) and which kept them from
    booking the procedure again until it ended."""
    await api.site()
    release = await api.publish([2, 2], starts_in_days=120 / 86400)
    soon, later = release["slots"]
    hold = await api.hold(soon["id"])
    assert hold.status == 201, hold.body
    ends = _instant(soon["starts_at"]) - _instant(hold.body["expires_at"])
    assert timedelta(0) <= ends < timedelta(milliseconds=1)  # to the millisecond
    # A slot further off keeps the hold's whole time (its start is 15 minutes later).
    other = await api.hold(later["id"], "10.0.0.2")
    assert _instant(other.body["expires_at"]) < _instant(later["starts_at"])
    api.clock.advance(121)  # the first slot has started
    late = await api.confirm(hold.body)
    assert (late.status, late.body["type"]) == (410, "/problems/hold-expired"), late.body
    assert (await api.confirm(other.body)).status == 201


async def test_a_hold_on_a_slot_starting_within_the_millisecond_is_refused(api: Api) -> None:
    """Its deadline, the start to the millisecond, was already past: 201 with an
    expires_at before the hold's own time, its challenge spent, and the place reclaimed
    at once for the next hold."""
    await api.site()
    api.clock.now = math.floor(api.clock.now) + 0.2504  # the slot starts 0.4 ms into one
    release = await api.publish([1], starts_in_days=100 / 86400)
    slot = release["slots"][0]
    paid = await api.solved(release["id"])
    api.clock.now = _instant(slot["starts_at"]).timestamp() - 0.0002  # 0.2 ms before it
    late = await api.hold(slot["id"], paid=paid)
    assert (late.status, late.body.get("type")) == (409, "/problems/not-open"), late.body


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def test_an_expired_hold_not_yet_reclaimed_is_not_answered(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hold call reclaims 100 expired holds first. With more expired ahead of it (bots'
    holds expiring together), a retry's expired hold was answered 201, its expires_at in
    the past, for the confirm to be refused. It is gone, as reclaimed."""
    await api.site()
    release = await api.publish([3])
    slot = release["slots"][0]["id"]
    paid = await api.solved(release["id"], "10.0.0.7")
    assert (await api.hold(slot, "10.0.0.7", paid=paid, key="k")).status == 201
    monkeypatch.setattr(inventory_module, "RECLAIM_LIMIT", 0)  # the backlog ahead of it
    api.clock.advance(601)
    late = await api.hold(slot, "10.0.0.7", paid=paid, key="k")
    assert late.status == 410, late.body
    assert await api.free(release["id"]) == {slot: 3}


async def test_a_slot_is_not_full_while_its_expired_holds_wait_to_be_given_back(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hold call reclaims 100 expired holds first. When more expire together (a rush's
    holds), a slot whose own expired holds lay further back was answered slot-full, and the
    person's challenge spent, for a place free a second later. It is 503 with Retry-After
    1 now, the challenge unspent, until the backlog is given back."""
    await api.site()
    release = await api.publish([1])
    slot = release["slots"][0]["id"]
    assert (await api.hold(slot, "10.0.0.7")).status == 201
    api.clock.advance(601)  # that hold has expired
    monkeypatch.setattr(inventory_module, "RECLAIM_LIMIT", 0)  # and lies behind a backlog
    paid = await api.solved(release["id"], "10.0.0.8")
    waiting = await api.hold(slot, "10.0.0.8", paid=paid)
    assert waiting.status == 503, waiting.body
    assert waiting.body["level"] == "reclaiming" and waiting.headers["Retry-After"] == "1"
    monkeypatch.setattr(inventory_module, "RECLAIM_LIMIT", 100)  # the sweeper's pass
    assert (await api.hold(slot, "10.0.0.8", paid=paid)).status == 201  # not spent
    # Full indeed once nothing has expired: slot-full, as before.
    full = await api.hold(slot, "10.0.0.9")
    assert (full.status, full.body["type"]) == (409, "/problems/slot-full"), full.body


async def test_two_holds_of_one_idempotency_key_give_two_cancel_tokens(
    api: Api, pg: asyncpg.Connection
) -> None:
    """An Idempotency-Key sent again from an address once its hold has ended is granted a
    new hold, with the token of the first (it is of the address, the key and the slot).
    Each booking's cancel token was of that token alone: two people's bookings shared one
    (an audit booked them so). It is of the hold's id too; a booking made before that
    gets its own back at a confirm's replay."""
    await api.site()
    release = await api.publish([2])
    slot = release["slots"][0]["id"]
    first = (await api.hold(slot, "10.0.0.7", key="k")).body
    one = await api.confirm(first, applicant(), "10.0.0.7")
    second = (await api.hold(slot, "10.0.0.7", key="k")).body
    assert second["hold_id"] != first["hold_id"]
    two = await api.confirm(second, applicant(), "10.0.0.7")
    assert (one.status, two.status) == (201, 201), (one.body, two.body)
    assert one.body["cancel_token"] != two.body["cancel_token"]
    # A booking whose cancel token was of its hold's token alone (made before) gets that
    # one back at a confirm's replay, and it cancels.
    secret = api.client.app[SETTINGS].secret
    before = derived_token(secret, "cancel", first["hold_token"])
    reference = one.body["booking"]["reference"]
    await pg.execute(
        "UPDATE bookings SET cancel_token_hash = $2 WHERE reference = $1",
        reference,
        token_hash(before),
    )
    replayed = await api.confirm(first, applicant(), "10.0.0.7")
    assert replayed.status == 201 and replayed.body["cancel_token"] == before, replayed.body
    cancel = await api.call(
        "DELETE", f"/v1/bookings/{reference}", headers={"Authorization": f"Bearer {before}"}
    )
    assert cancel.status == 204


async def test_a_booked_hold_given_back_says_it_was_booked(api: Api) -> None:
    """A site that gives a hold back after a confirm whose answer was lost was told the
    hold had expired or been released: the person had a booking they could not see, and
    their next attempt was refused as their second (an audit). It is told the hold was
    confirmed, and the confirm, sent again, answers the booking."""
    await api.site()
    release = await api.publish([2])
    hold = (await api.hold(release["slots"][0]["id"])).body
    person = applicant()
    booked = await api.confirm(hold, person)
    assert booked.status == 201
    auth = {"Authorization": f"Bearer {hold['hold_token']}"}
    given_back = await api.call("DELETE", f"/v1/holds/{hold['hold_id']}", headers=auth)
    assert given_back.status == 409, given_back.body
    assert given_back.body["type"] == "/problems/hold-confirmed", given_back.body
    assert booked.body["booking"]["reference"] in given_back.body["detail"]
    again = await api.confirm(hold, person)
    assert again.body["booking"] == booked.body["booking"]
    assert again.body["cancel_token"] == booked.body["cancel_token"]
    assert await api.free(release["id"]) == {release["slots"][0]["id"]: 1}
