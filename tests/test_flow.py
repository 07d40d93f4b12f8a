"""The booking flow of API.md, end to end through HTTP, against real Redis and PostgreSQL."""

from __future__ import annotations

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

    gone = await api.call("DELETE", f"/v1/bookings/{booking['reference']}", headers=cancel)
    assert gone.status == 204
    read = await api.call("GET", f"/v1/bookings/{booking['reference']}", headers=cancel)
    assert read.body["booking"]["status"] == "cancelled"
    assert await api.free(release["id"]) == {slot: 2}
