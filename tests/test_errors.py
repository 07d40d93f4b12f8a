"""Every error of API.md, reached through HTTP, as problem+json with its status; and a refused
request changes nothing (no place, hold, booking or challenge is lost)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from engine import schemas
from engine import web as web_module
from engine.app import create_app
from engine.appkeys import RESERVATIONS
from engine.errors import ValidationFailed
from engine.pow import leading_zero_bits_ok, solve
from engine.settings import Rate, Settings
from engine.web import unmatched
from tests.api import ADMIN, Api, Reply, applicant, largest_release
from tests.conftest import FakeClock, make_settings


def problem(reply: Reply, name: str, status: int) -> dict[str, Any]:
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    body = reply.body
    assert body["type"] == f"/problems/{name}"
    assert body["status"] == status and body["title"] and body["detail"]
    return body  # type: ignore[no-any-return]


async def state(api: Api, pg: asyncpg.Connection, release: str) -> tuple[Any, ...]:
    """Everything a refused request must leave as it was."""
    return (
        await api.free(release),
        await pg.fetchval("SELECT count(*) FROM bookings"),
        await pg.fetchval("SELECT sum(booked) FROM slots"),
    )


@pytest.fixture
async def release(api: Api) -> dict[str, Any]:
    await api.site()
    return await api.publish([1, 2])


async def test_validation_errors(api: Api, pg: asyncpg.Connection, release: dict[str, Any]) -> None:
    slot = release["slots"][0]["id"]
    before = await state(api, pg, release["id"])
    paid = await api.solved(release["id"])
    cases = [
        (b"{not json", "body"),
        (b"[]", "body"),
        (json.dumps({"slot_id": slot, **paid, "extra": 1}).encode(), "extra"),
        (json.dumps({"slot_id": 7, **paid}).encode(), "slot_id"),
        (json.dumps({"slot_id": slot, "challenge": paid["challenge"]}).encode(), "nonces"),
        (json.dumps({"slot_id": slot, **paid, "nonces": ["not ok!"]}).encode(), "nonces.0"),
        # A name given twice: our parser kept the last, a proxy may read the first.
        (
            json.dumps({"slot_id": "nowhere", **paid}).encode()[:-1]
            + b', "slot_id": "%s"}' % slot.encode(),
            "slot_id",
        ),
        (
            json.dumps({"slot_id": "nowhere", **paid}).encode()[:-1]
            + b', "slot\\u005fid": "%s"}' % slot.encode(),
            "slot_id",
        ),
    ]
    for raw, field in cases:
        r = await api.call(
            "POST", "/v1/holds", data=raw, headers={"Content-Type": "application/json"}
        )
        body = problem(r, "validation-error", 400)
        assert field in [e["field"] for e in body["errors"]], body
    r = await api.hold(slot, paid=paid, key="x" * 201)
    problem(r, "validation-error", 400)
    assert await state(api, pg, release["id"]) == before
    # None of those spent the challenge.
    assert (await api.hold(slot, paid=paid)).status == 201


def test_a_name_given_twice_is_refused_at_any_depth() -> None:
    person = json.dumps(applicant(family_name="email", given_names="given_names"))
    entry = b'{"challenge": "c", "nonces": ["n"], "applicant": %s}' % person.encode()
    assert schemas.parse(schemas.EntryRequest, entry).applicant.family_name == "email"
    slots = b'{"slots": [{"id": "a", "capacity": 1}, {"id": "b", "capacity": 1, "capacity": 9}]}'
    for model, raw, field in (
        (
            schemas.EntryRequest,
            entry.replace(b'"email": ', b'"email": "a@b.fr", "email": '),
            "applicant.email",
        ),
        (
            schemas.EntryRequest,
            entry.replace(b'"email": ', b'"email": "a@b.fr", "em\\u0061il": '),
            "applicant.email",
        ),
        (schemas.ReleasePatch, slots, "slots.1.capacity"),
    ):
        with pytest.raises(ValidationFailed) as refused:
            schemas.parse(model, raw)
        assert refused.value.extra["errors"] == [
            {"field": field, "message": "given more than once"}
        ], raw
    # A repeated name's first value is not validated: what it holds is told back cut short.
    long = "x" * 5000
    raw = b'{"release": {"%s": 0, "%s": 1}, "release": "r"}' % (long.encode(), long.encode())
    with pytest.raises(ValidationFailed) as refused:
        schemas.parse(schemas.ChallengeRequest, raw)
    assert [e["field"] for e in refused.value.extra["errors"]] == [
        "release",
        f"release.{long[:64]}",
    ]


async def test_confirm_validation_keeps_the_hold(
    api: Api, pg: asyncpg.Connection, release: dict[str, Any]
) -> None:
    hold = (await api.hold(release["slots"][1]["id"])).body
    before = await state(api, pg, release["id"])
    for person in (
        applicant(id_number="12"),
        applicant(birth_date="1990-02-30"),
        applicant(email="nobody"),
        {**applicant(), "nationality": "x"},
    ):
        problem(await api.confirm(hold, person), "validation-error", 400)
    assert await state(api, pg, release["id"]) == before
    assert (await api.confirm(hold)).status == 201


async def test_unauthorized(api: Api, pg: asyncpg.Connection, release: dict[str, Any]) -> None:
    hold = (await api.hold(release["slots"][1]["id"])).body
    before = await state(api, pg, release["id"])
    wrong = {**hold, "hold_token": "A" * 32}
    problem(await api.confirm(wrong), "unauthorized", 401)
    problem(
        await api.call("POST", f"/v1/holds/{hold['hold_id']}/confirm", {"applicant": applicant()}),
        "unauthorized",
        401,
    )
    problem(
        await api.call(
            "DELETE", f"/v1/holds/{hold['hold_id']}", headers={"Authorization": "Bearer nope"}
        ),
        "unauthorized",
        401,
    )
    assert await state(api, pg, release["id"]) == before
    done = await api.confirm(hold)
    ref = done.body["booking"]["reference"]
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
        problem(await api.call("GET", f"/v1/bookings/{ref}", headers=headers), "unauthorized", 401)
        problem(
            await api.call("DELETE", f"/v1/bookings/{ref}", headers=headers), "unauthorized", 401
        )
    problem(
        await api.call("GET", "/v1/admin/agenda?site=bobigny&date=2026-01-01"), "unauthorized", 401
    )
    problem(
        await api.call(
            "GET",
            "/v1/admin/agenda?site=bobigny&date=2026-01-01",
            headers={"Authorization": "Bearer wrong"},
        ),
        "unauthorized",
        401,
    )
    assert (
        await api.call(
            "GET",
            f"/v1/bookings/{ref}",
            headers={"Authorization": f"Bearer {done.body['cancel_token']}"},
        )
    ).body["booking"]["status"] == ("confirmed")


async def test_admin_refuses_everyone_without_a_configured_token(clean: None) -> None:
    app = create_app(make_settings(admin_token=None), sweep=False)
    async with TestClient(TestServer(app)) as client:
        api = Api(client, FakeClock())
        r = await api.call(
            "PUT", "/v1/admin/sites/x", {"name": "x", "timezone": "UTC", "procedures": []}, ADMIN
        )
        problem(r, "unauthorized", 401)


async def test_pow_invalid_leaves_the_challenge_unspent(
    api: Api, pg: asyncpg.Connection, release: dict[str, Any]
) -> None:
    slot = release["slots"][1]["id"]
    other = await api.publish([1])
    c = await api.challenge(release["id"], "10.0.0.1")
    good = solve(c["challenge"], c["difficulty"], c["puzzles"])
    tampered = c["challenge"][:-2] + ("AA" if not c["challenge"].endswith("AA") else "BB")
    bad_nonce = next(
        n
        for n in (str(i) for i in range(1000))
        if not leading_zero_bits_ok(
            hashlib.sha256(f"{c['challenge']}:0:{n}".encode()).digest(), c["difficulty"]
        )
    )
    before = await state(api, pg, release["id"])
    attempts = [
        ({"challenge": tampered, "nonces": good}, slot, "10.0.0.1"),
        ({"challenge": c["challenge"], "nonces": good}, slot, "10.0.0.2"),  # another client
        ({"challenge": c["challenge"], "nonces": good}, other["slots"][0]["id"], "10.0.0.1"),
        ({"challenge": c["challenge"], "nonces": [bad_nonce, *good[1:]]}, slot, "10.0.0.1"),
        ({"challenge": c["challenge"], "nonces": good[:1]}, slot, "10.0.0.1"),
        ({"challenge": "garbage", "nonces": good}, slot, "10.0.0.1"),
    ]
    for paid, slot_id, ip in attempts:
        problem(await api.hold(slot_id, ip, paid=paid), "pow-invalid", 403)
    assert await state(api, pg, release["id"]) == before
    assert (
        await api.hold(slot, "10.0.0.1", paid={"challenge": c["challenge"], "nonces": good})
    ).status == 201


async def test_not_found(api: Api, pg: asyncpg.Connection, release: dict[str, Any]) -> None:
    before = await state(api, pg, release["id"])
    rid = release["id"]
    missing_slot = f"{rid}.999"
    problem(await api.hold(missing_slot, paid=await api.solved(rid)), "not-found", 404)
    problem(await api.call("GET", "/v1/releases/r000000000000/slots"), "not-found", 404)
    problem(await api.call("GET", "/v1/releases/nonsense/slots"), "not-found", 404)
    problem(
        await api.call("POST", "/v1/challenges", {"release": "r000000000000"}), "not-found", 404
    )
    problem(
        await api.call(
            "POST",
            f"/v1/holds/{rid}.hnothere/confirm",
            {"applicant": applicant()},
            {"Authorization": "Bearer x"},
        ),
        "not-found",  # never issued (API.md); an expired hold is 410, test_hold_expired
        404,
    )
    problem(
        await api.call(
            "POST",
            "/v1/holds/garbage/confirm",
            {"applicant": applicant()},
            {"Authorization": "Bearer x"},
        ),
        "not-found",
        404,
    )
    problem(
        await api.call("GET", "/v1/bookings/AA-0000-0000", headers={"Authorization": "Bearer x"}),
        "not-found",
        404,
    )
    problem(await api.call("GET", "/v1/no/such/route"), "not-found", 404)
    problem(await api.call("GET", "/wp-admin/setup-config.php"), "not-found", 404)
    problem(await api.call("POST", "/"), "not-found", 404)
    assert await state(api, pg, release["id"]) == before


async def test_slot_full_spends_the_challenge(
    api: Api, pg: asyncpg.Connection, release: dict[str, Any]
) -> None:
    slot = release["slots"][0]["id"]
    assert (await api.hold(slot, "10.0.0.1")).status == 201
    before = await state(api, pg, release["id"])
    paid = await api.solved(release["id"], "10.0.0.2")
    problem(await api.hold(slot, "10.0.0.2", paid=paid), "slot-full", 409)
    assert await state(api, pg, release["id"]) == before
    # The same solved challenge cannot poll again, even for a slot with room.
    problem(
        await api.hold(release["slots"][1]["id"], "10.0.0.2", paid=paid), "challenge-expired", 410
    )


async def test_not_open(
    api: Api, clock: FakeClock, pg: asyncpg.Connection, release: dict[str, Any]
) -> None:
    """A hold before the opening is refused, and spends nothing. Its challenge is issued
    from 3 minutes before the opening: earlier, a farm stockpiles them, and one asked for
    at 5 minutes expires at the opening; later, a phone at the escalation cap, a minute or
    more of solving, would miss it. Each refusal says when to come back, in Retry-After."""
    later = await api.publish([1], opens_in_s=3600)
    opens = datetime.fromisoformat(later["opens_at"]).timestamp()
    clock.now = opens - 3600
    early = await api.call("POST", "/v1/challenges", {"release": later["id"]})
    problem(early, "not-open", 409)
    assert "180 s before" in early.body["detail"], early.body
    # In the site's time, as the release list gives it: it was in UTC, an hour off in Paris.
    assert f"opens at {later['opens_at']}:" in early.body["detail"], (later, early.body)
    assert early.body["retry_after"] == 3420 and early.headers["Retry-After"] == "3420"
    clock.now = opens - 180.5
    early = await api.call("POST", "/v1/challenges", {"release": later["id"]})
    assert early.status == 409 and early.headers["Retry-After"] == "1", early.body
    before = await state(api, pg, later["id"])
    clock.now = opens - 180
    paid = await api.solved(later["id"])  # asked for at once: still good after the opening
    too_soon = await api.hold(later["slots"][0]["id"], paid=paid)
    problem(too_soon, "not-open", 409)
    assert too_soon.headers["Retry-After"] == "180", too_soon.headers
    assert await state(api, pg, later["id"]) == before
    clock.now = opens + 60
    assert (await api.hold(later["slots"][0]["id"], paid=paid)).status == 201
    booked = await api.book(release["slots"][1]["id"])
    clock.advance(3 * 86400)  # every slot has started
    problem(await api.call("POST", "/v1/challenges", {"release": release["id"]}), "not-open", 409)
    problem(
        await api.call(
            "DELETE",
            f"/v1/bookings/{booked['booking']['reference']}",
            headers={"Authorization": f"Bearer {booked['cancel_token']}"},
        ),
        "not-open",
        409,
    )


async def test_identity_already_booked(
    api: Api, pg: asyncpg.Connection, release: dict[str, Any]
) -> None:
    person = applicant()
    first = await api.book(release["slots"][0]["id"], person)
    hold = (await api.hold(release["slots"][1]["id"])).body
    before = await state(api, pg, release["id"])
    same = {**person, "id_number": " " + person["id_number"][:4] + "-" + person["id_number"][4:]}
    problem(await api.confirm(hold, same), "identity-already-booked", 409)
    assert await state(api, pg, release["id"]) == before
    # Once the first booking is cancelled, the same person may confirm the hold they kept.
    await api.call(
        "DELETE",
        f"/v1/bookings/{first['booking']['reference']}",
        headers={"Authorization": f"Bearer {first['cancel_token']}"},
    )
    assert (await api.confirm(hold, same)).status == 201


async def test_challenge_expired(
    api: Api, clock: FakeClock, pg: asyncpg.Connection, release: dict[str, Any]
) -> None:
    paid = await api.solved(release["id"])
    clock.advance(301)
    before = await state(api, pg, release["id"])
    body = problem(await api.hold(release["slots"][1]["id"], paid=paid), "challenge-expired", 410)
    assert "time ran out" in body["detail"]
    assert await state(api, pg, release["id"]) == before


async def test_hold_expired(
    api: Api, clock: FakeClock, pg: asyncpg.Connection, release: dict[str, Any]
) -> None:
    slot = release["slots"][0]["id"]
    hold = (await api.hold(slot)).body
    clock.advance(601)
    problem(await api.confirm(hold), "hold-expired", 410)
    assert (await api.free(release["id"]))[slot] == 1
    released = (await api.hold(slot)).body
    auth = {"Authorization": f"Bearer {released['hold_token']}"}
    assert (
        await api.call("DELETE", f"/v1/holds/{released['hold_id']}", headers=auth)
    ).status == 204
    before = await state(api, pg, release["id"])
    problem(
        await api.call("DELETE", f"/v1/holds/{released['hold_id']}", headers=auth),
        "hold-expired",
        410,
    )
    problem(await api.confirm(released), "hold-expired", 410)
    assert await state(api, pg, release["id"]) == before


async def test_a_hold_never_issued_is_not_found(
    api: Api, clock: FakeClock, pg: asyncpg.Connection, release: dict[str, Any]
) -> None:
    """404 for an id this service never issued, 410 for one whose hold is gone: the id is
    signed, so they are told apart with nothing kept."""
    slot = release["slots"][0]["id"]
    hold = (await api.hold(slot)).body
    suffix = hold["hold_id"].partition(".")[2]
    other = "x" if suffix[-1] != "x" else "y"
    forged = {**hold, "hold_id": hold["hold_id"][:-1] + other}  # its signature broken
    made_up = {**hold, "hold_id": f"{release['id']}.h{'0' * 19}"}
    before = await state(api, pg, release["id"])
    for fake in (forged, made_up):
        auth = {"Authorization": f"Bearer {fake['hold_token']}"}
        problem(await api.confirm(fake), "not-found", 404)
        problem(
            await api.call("DELETE", f"/v1/holds/{fake['hold_id']}", headers=auth), "not-found", 404
        )
    assert await state(api, pg, release["id"]) == before
    clock.advance(601)
    problem(await api.confirm(hold), "hold-expired", 410)  # the real one, expired


async def test_hold_confirming_cannot_be_released(api: Api, release: dict[str, Any]) -> None:
    hold = (await api.hold(release["slots"][0]["id"])).body
    domain = api.client.app[RESERVATIONS]
    await domain.inventory.confirm_begin(release["id"], hold["hold_id"], domain.now_ms())
    r = await api.call(
        "DELETE",
        f"/v1/holds/{hold['hold_id']}",
        headers={"Authorization": f"Bearer {hold['hold_token']}"},
    )
    problem(r, "hold-confirming", 409)


async def test_payload_too_large(api: Api, pg: asyncpg.Connection, release: dict[str, Any]) -> None:
    before = await state(api, pg, release["id"])
    big = json.dumps({"slot_id": "x" * 17_000}).encode()
    problem(
        await api.call("POST", "/v1/holds", data=big, headers={"Content-Type": "application/json"}),
        "payload-too-large",
        413,
    )
    assert await state(api, pg, release["id"]) == before


async def test_a_body_that_cannot_be_decoded_is_a_400(
    api: Api, pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A body whose Content-Encoding does not decode was a 500 and a traceback, for anyone
    to send: a 400 now, public routes and staff's alike, and nothing changes. aiohttp then
    read what was left of the body, and logged its error again with a traceback at ERROR
    (an audit: a log flood for anyone to send): not any more."""
    await api.site()
    before = await pg.fetchval("SELECT count(*) FROM releases")
    for path, auth in (("/v1/challenges", b""), ("/v1/admin/releases", b"Authorization: Bearer ")):
        head = b"POST %s HTTP/1.1\r\nContent-Type: application/json\r\n" % path.encode()
        if auth:
            head += auth + ADMIN["Authorization"].split()[1].encode() + b"\r\n"
        head += b"Content-Encoding: gzip\r\n"
        with caplog.at_level(logging.ERROR, logger="aiohttp"):
            status, body = await raw_status(api, head, b"not gzip at all")
        assert status == 400, body
        assert json.loads(body)["type"] == "/problems/validation-error", body
        assert not [r for r in caplog.records if r.name.startswith("aiohttp")], caplog.text
    assert await pg.fetchval("SELECT count(*) FROM releases") == before


async def test_staff_bodies_have_a_larger_limit_of_their_own(
    api: Api, pg: asyncpg.Connection, settings: Settings
) -> None:
    # A release of the most slots the schema takes (2 000) is over the public 16 KiB.
    await api.site()
    body = json.dumps(largest_release(api.clock.now), indent=2).encode()
    assert settings.max_body_bytes < len(body) < settings.max_admin_body_bytes
    admin_json = {**ADMIN, "Content-Type": "application/json"}
    published = await api.call("POST", "/v1/admin/releases", data=body, headers=admin_json)
    assert published.status == 201, published.body
    assert len(published.body["release"]["slots"]) == 2000
    # Over staff's own limit: refused, whether its length is given or it comes in chunks.
    huge = body + b" " * settings.max_admin_body_bytes

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(huge), 65536):
            yield huge[start : start + 65536]

    for data in (io.BytesIO(huge), chunks()):  # BytesIO: with Content-Length
        refused = await api.call("POST", "/v1/admin/releases", data=data, headers=admin_json)
        problem(refused, "payload-too-large", 413)
    assert await pg.fetchval("SELECT count(*) FROM releases") == 1
    # The public limit still holds on the public routes, in chunks too.
    public = json.dumps({"slot_id": "x" * settings.max_body_bytes}).encode()

    async def public_chunks() -> AsyncIterator[bytes]:
        yield public[:1000]
        yield public[1000:]

    reply = await api.call(
        "POST", "/v1/holds", data=public_chunks(), headers={"Content-Type": "application/json"}
    )
    problem(reply, "payload-too-large", 413)


async def test_rate_limited(clean: None) -> None:
    app = create_app(make_settings(limit_address=Rate(2, 1000)), sweep=False)
    async with TestClient(TestServer(app)) as client:
        api = Api(client, FakeClock())
        await api.site()
        release = await api.publish([1])
        await api.challenge(release["id"], "10.0.0.9")
        await api.challenge(release["id"], "10.0.0.9")
        r = await api.call(
            "POST", "/v1/challenges", {"release": release["id"]}, {"X-Forwarded-For": "10.0.0.9"}
        )
        body = problem(r, "rate-limited", 429)
        assert int(r.headers["Retry-After"]) == body["retry_after"] >= 1
        # Another client is not affected.
        await api.challenge(release["id"], "10.0.0.10")


async def test_overloaded_when_shedding_load(clean: None) -> None:
    app = create_app(make_settings(max_in_flight=0), sweep=False)
    async with TestClient(TestServer(app)) as client:
        api = Api(client, FakeClock())
        r = await api.call("GET", "/v1/sites")
        problem(r, "overloaded", 503)
        assert int(r.headers["Retry-After"]) >= 1
        # Never the probes and the metrics: a liveness probe refused would restart the
        # busiest workers, and monitoring would go blind when it matters most.
        assert (await api.call("GET", "/healthz")).status == 200
        assert (await api.call("GET", "/metrics")).status == 200
        assert (await api.call("GET", "/readyz")).body.get("type") != "overloaded"
        # Nor the staff: the counter serves people in person during the rush.
        await api.site()
        day = "2026-12-01"
        agenda = await api.call("GET", f"/v1/admin/agenda?site=bobigny&date={day}", headers=ADMIN)
        assert agenda.status == 200, agenda.body
        problem(await api.call("GET", "/v1/admin/agenda", headers={}), "unauthorized", 401)


async def test_method_not_allowed_is_a_problem(api: Api) -> None:
    problem(await api.call("PUT", "/v1/sites"), "method-not-allowed", 405)


async def test_nul_characters_and_bad_identifiers_are_refused(
    api: Api, pg: asyncpg.Connection, release: dict[str, Any]
) -> None:
    before = await state(api, pg, release["id"])
    hold = (await api.hold(release["slots"][1]["id"])).body
    body = problem(await api.confirm(hold, applicant(family_name="N\x00")), "validation-error", 400)
    assert body["errors"] == [{"field": "applicant.family_name", "message": "must not contain NUL"}]
    problem(await api.call("GET", "/v1/releases?site=a%00b"), "validation-error", 400)
    problem(
        await api.call("GET", "/v1/admin/agenda?site=b%00&date=2026-01-01", headers=ADMIN),
        "validation-error",
        400,
    )
    problem(
        await api.call("GET", "/v1/bookings/AB%00", headers={"Authorization": "Bearer x"}),
        "not-found",
        404,
    )
    draw = await api.publish_draw([1])
    for method in ("GET", "DELETE"):
        entry = f"/v1/releases/{draw['id']}/entries/e%00x"
        problem(
            await api.call(method, entry, headers={"Authorization": "Bearer x"}), "not-found", 404
        )
    problem(
        await api.call(
            "PUT",
            "/v1/admin/sites/zz",
            {"name": "Bo\x00", "timezone": "UTC", "procedures": []},
            ADMIN,
        ),
        "validation-error",
        400,
    )
    staff = await api.call(
        "POST",
        "/v1/admin/bookings",
        {"slot_id": release["slots"][0]["id"], "applicant": applicant(given_names="\x00")},
        ADMIN,
    )
    problem(staff, "validation-error", 400)
    assert (await api.confirm(hold)).status == 201
    assert (await api.free(release["id"]))[release["slots"][0]["id"]] == 1
    assert before[1:] == (0, 0)


async def test_a_query_parameter_a_request_does_not_take_is_refused(
    api: Api, pg: asyncpg.Connection, release: dict[str, Any]
) -> None:
    """A handler reads the parameters it knows, and the first of each: a misspelt one was
    ignored. A staff cancel with ``plac=withdraw`` was done with the place returned to the
    public, which no retry can undo, and a misspelt filter listed everything. Now each is
    refused, naming the parameter, and changes nothing."""
    slot = release["slots"][0]["id"]
    reference = (await api.book(slot, applicant()))["booking"]["reference"]
    before = await state(api, pg, release["id"])
    cancel = f"/v1/admin/bookings/{reference}"
    refused = problem(
        await api.call("DELETE", f"{cancel}?by=prefecture&plac=withdraw", headers=ADMIN),
        "validation-error",
        400,
    )
    assert refused["errors"] == [{"field": "plac", "message": "not a parameter of this request"}]
    twice = problem(
        await api.call("DELETE", f"{cancel}?by=prefecture&by=person", headers=ADMIN),
        "validation-error",
        400,
    )
    assert twice["errors"] == [{"field": "by", "message": "given more than once"}]
    listing = problem(
        await api.call("GET", "/v1/releases?site=bobigny&procedur=x"), "validation-error", 400
    )
    assert listing["errors"] == [
        {"field": "procedur", "message": "not a parameter of this request"}
    ]
    for path in (
        f"/v1/releases/{release['id']}/slots?fresh=1",
        "/v1/sites?%FF=1",  # a name that is not UTF-8
        "/v1/releases?" + "&".join(f"p{n}=1" for n in range(500)),
    ):
        body = problem(await api.call("GET", path), "validation-error", 400)
        assert 1 <= len(body["errors"]) <= 10, body
    # A hold refused so leaves its challenge unspent: it holds once sent as it should be.
    paid = await api.solved(release["id"])
    held = {"slot_id": release["slots"][1]["id"], **paid}
    client = {"X-Forwarded-For": "10.0.0.1"}  # the challenge's
    problem(await api.call("POST", "/v1/holds?slot=1", held, client), "validation-error", 400)
    assert await state(api, pg, release["id"]) == before
    assert (await api.call("POST", "/v1/holds", held, client)).status == 201
    # The probes and the metrics take any: monitoring may add its own.
    for path in ("/healthz?probe=1", "/readyz?probe=1", "/metrics?x=1"):
        assert (await api.call("GET", path)).status == 200, path
    done = await api.call("DELETE", f"{cancel}?by=prefecture&place=withdraw", headers=ADMIN)
    assert done.status == 204, done.body


async def test_a_body_that_does_not_come_is_a_problem_in_bounded_time(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends its headers and part of its body, then nothing: the request
    held its place among those in progress for as long as the connection lived (a few
    thousand took a worker's every place). It is a 400 once ``BODY_READ_S`` is over."""
    monkeypatch.setattr(web_module, "BODY_READ_S", 0.5)
    server = api.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(
            b"POST /v1/challenges HTTP/1.1\r\nHost: test\r\nContent-Type: application/json"
            b"\r\nContent-Length: 100\r\n\r\n" + b'{"release": '
        )
        reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = int(reply.split()[1])
        assert status == 400, reply
        length = int(reply.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = json.loads(await reader.readexactly(length))
    finally:
        writer.close()
    assert body["type"] == "/problems/validation-error", body
    assert body["errors"] == [{"field": "body", "message": "not received within 0.5 s"}]


async def raw_status(api: Api, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send ``head`` (request line and headers, as bytes: a client can send any) and
    ``body``; return the reply's status and body."""
    status, _, body = await raw_reply(api, head, body)
    return status, body


async def raw_reply(api: Api, head: bytes, body: bytes = b"") -> tuple[int, bytes, bytes]:
    """As ``raw_status``, with the reply's headers (as bytes) between."""
    server = api.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        length = b"Content-Length: %d\r\n" % len(body) if body else b""
        writer.write(head + b"Host: test\r\n" + length + b"Connection: close\r\n\r\n" + body)
        reply = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = reply.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), headers, body


async def test_a_request_that_is_not_valid_http_is_a_problem(api: Api) -> None:
    # aiohttp answered these itself, before any route: text/plain, and a traceback logged.
    # The detail is said in the engine's words: none quotes what the client sent.
    for head, body in (
        (b"GET /v1/sites\xff HTTP/1.1\r\n", b""),
        (b"GET /v1/sites HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n", b""),
        (b"JRMI /v1/sites HTTP/1.1\r\n", b""),
        (b"CONNECT quoted-back@ HTTP/1.1\r\n", b""),
        (b"GET /v1/sites HTTP/1.1\r\nBad Name: x\r\n", b""),
        (b"POST /v1/challenges HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", b"{}"),
    ):
        status, headers, reply = await raw_reply(api, head, body)
        assert status == 400, reply
        assert b"\r\ncontent-type: application/problem+json" in b"\r\n" + headers.lower()
        assert b"\r\nx-request-id: " in b"\r\n" + headers.lower()
        problem = json.loads(reply)
        assert problem["type"] == "/problems/http-error" and problem["status"] == 400
        sent = {w for w in re.split(rb"[\s:]+", head) if len(w) > 3}
        assert problem["detail"] and not any(w in problem["detail"].encode() for w in sent)
    assert (await api.call("GET", "/v1/sites")).status == 200
    metrics = (await api.call("GET", "/metrics")).body
    assert 'guichet_http_requests_total{method="other",route="unreadable",status="400"} 6.0' in (
        metrics
    )
    assert 'guichet_rejections_total{level="",reason="http-error"} 6.0' in metrics
    # Where the bad request ends, and the next begins, is unknown: the connection is closed.
    server = api.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        good = b"GET /v1/sites HTTP/1.1\r\nHost: test\r\n\r\n"
        writer.write(b"GET /v1/sites HTTP/1.1\r\nBad Name: x\r\n\r\n" + good)
        replies = await asyncio.wait_for(reader.read(), 10)  # to the end: closed
    finally:
        writer.close()
    assert replies.count(b"HTTP/1.1 ") + replies.count(b"HTTP/1.0 ") == 1, replies


async def test_bytes_that_are_not_utf_8_in_headers_are_refused_or_ignored(
    api: Api, release: dict[str, Any]
) -> None:
    # aiohttp hands such bytes on as surrogates, which no str.encode() takes: a 500 before.
    held = (await api.hold(release["slots"][0]["id"])).body
    booked = await api.book(release["slots"][1]["id"], applicant())
    reference = booked["booking"]["reference"].encode()
    for head in (
        b"GET /v1/bookings/" + reference + b" HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\r\n",
        b"DELETE /v1/holds/" + held["hold_id"].encode() + b" HTTP/1.1\r\n"
        b"Authorization: Bearer t\xc3\r\n",
        b"GET /v1/admin/agenda?site=bobigny&date=2026-01-01 HTTP/1.1\r\n"
        b"Authorization: Bearer \xe9\r\n",
    ):
        status, body = await raw_status(api, head)
        assert status == 401, body
        assert json.loads(body)["type"] == "/problems/unauthorized"
    # A session header that is not ours is replaced by a new session, as any other.
    status, body = await raw_status(
        api,
        b"POST /v1/challenges HTTP/1.1\r\nContent-Type: application/json\r\n"
        b"Guichet-Session: s1.\xff.1.x\r\n",
        json.dumps({"release": release["id"]}).encode(),
    )
    assert status == 201, body
    assert json.loads(body)["session"].startswith("s1.")
    assert (await api.confirm(held)).status == 201  # the hold was left alone
    # Nowhere else does such a byte, in any header the engine reads, or in a path or query
    # (percent-encoded), give a 500.
    draw = (await api.publish_draw([1]))["id"]
    targets = [
        ("GET", b"/v1/releases?site=%FF"),
        ("GET", f"/v1/releases/{release['id']}/slots".encode()),
        ("GET", b"/v1/releases/%FF/slots"),
        ("POST", b"/v1/challenges"),
        ("POST", b"/v1/holds"),
        ("POST", b"/v1/holds/%FF/confirm"),
        ("GET", b"/v1/bookings/%FF"),
        ("POST", f"/v1/releases/{draw}/entries".encode()),
        ("GET", f"/v1/releases/{draw}/entries/%FF".encode()),
        ("GET", f"/v1/releases/{draw}/draw".encode()),
        ("GET", b"/v1/admin/agenda?site=%FF&date=%FF"),
        ("PATCH", f"/v1/admin/releases/{release['id']}".encode()),
        ("DELETE", b"/v1/admin/bookings/%FF?by=%FF"),
        ("GET", b"/v1/admin/fairness?release=%FF"),
    ]
    headers = (
        b"Authorization",
        b"X-Forwarded-For",
        b"Accept",
        b"Accept-Encoding",
        b"Content-Type",
        b"If-Match",
        b"Idempotency-Key",
        b"X-Request-Id",
        b"Guichet-Session",
    )
    admin_auth = ADMIN["Authorization"].encode()
    for method, path in targets:
        for name in headers:
            admin = b"" if name == b"Authorization" else b"Authorization: %s\r\n" % admin_auth
            head = b"%s %s HTTP/1.1\r\n%s%s: x\xff\r\n" % (method.encode(), path, admin, name)
            status, body = await raw_status(api, head, b"{}" if method != "GET" else b"")
            assert status < 500, (method, path, name, body)


async def test_dates_out_of_any_calendar_are_refused(api: Api, release: dict[str, Any]) -> None:
    for opens_at, starts_at in (
        ("9999-12-31T23:59:59Z", "2030-01-01T09:00:00Z"),
        ("2026-01-01T00:00:00Z", "9999-12-31T23:59:59Z"),
        ("0001-01-01T00:00:00+01:00", "2030-01-01T09:00:00Z"),
    ):
        r = await api.call("POST", "/v1/admin/releases", _one_slot(opens_at, starts_at), ADMIN)
        problem(r, "validation-error", 400)
    assert (await api.call("GET", "/v1/releases")).status == 200


def _one_slot(opens_at: object, starts_at: object) -> dict[str, Any]:
    """A first-come release of one slot at bobigny, its times as given."""
    return {
        "site": "bobigny",
        "procedure": "renouvellement",
        "mode": "fcfs",
        "opens_at": opens_at,
        "slots": [{"starts_at": starts_at, "duration_minutes": 15, "capacity": 1}],
    }


async def test_a_number_is_not_taken_for_a_time(api: Api, release: dict[str, Any]) -> None:
    """A string of digits was read as seconds since 1970: a tool's number where a time was
    meant published a slot at some date, or filtered the audit log from one."""
    for starts_at in ("1806220800", "+1806220800", "1806220800.5", "1.8e9", 1806220800):
        r = await api.call(
            "POST", "/v1/admin/releases", _one_slot("2026-01-01T00:00:00Z", starts_at), ADMIN
        )
        body = problem(r, "validation-error", 400)
        assert body["errors"][0]["field"] == "slots.0.starts_at", body
    for since in ("1806220800", "1806220800.5"):
        audit = await api.call("GET", f"/v1/admin/audit?since={since}", headers=ADMIN)
        problem(audit, "validation-error", 400)
    assert [r["id"] for r in (await api.call("GET", "/v1/releases")).body["releases"]] == [
        release["id"]
    ]


async def test_draw_windows_move_together(api: Api, clock: FakeClock) -> None:
    await api.site()
    now = clock.now
    iso = __import__("datetime").datetime.fromtimestamp
    utc = __import__("datetime").UTC

    def at(days: float) -> str:
        return str(iso(now + days * 86400, utc).isoformat())

    r = await api.call(
        "POST",
        "/v1/admin/releases",
        {
            "site": "bobigny",
            "procedure": "renouvellement",
            "mode": "draw",
            "registration_opens_at": at(1),
            "registration_closes_at": at(2),
            "draw_at": at(3),
            "slots": [{"starts_at": at(10), "duration_minutes": 15, "capacity": 1}],
        },
        ADMIN,
    )
    assert r.status == 201, r.body
    path = f"/v1/admin/releases/{r.body['release']['id']}"
    problem(
        await api.call("PATCH", path, {"registration_closes_at": at(4)}, ADMIN),
        "validation-error",
        400,
    )
    moved = await api.call(
        "PATCH", path, {"registration_closes_at": at(4), "draw_at": at(5)}, ADMIN
    )
    assert moved.status == 200, moved.body


async def test_a_get_resource_answers_head(api: Api) -> None:
    for path in ("/healthz", "/v1/releases", "/openapi.json"):
        reply = await api.call("HEAD", path)
        assert (reply.status, reply.body) == (200, ""), path
    assert (await api.call("HEAD", "/v1/admin/agenda?site=x&date=2026-01-01")).status == 401


async def test_method_not_allowed_names_the_allowed_methods(api: Api) -> None:
    r = await api.call("TRACE", "/v1/sites")
    problem(r, "method-not-allowed", 405)
    assert "GET" in r.headers["Allow"]


async def test_unknown_release_ids_cost_no_postgresql_query(
    api: Api, release: dict[str, Any]
) -> None:
    domain = api.client.app[RESERVATIONS]
    calls = {"release": 0, "release_ids": 0}
    for name in calls:
        real = getattr(domain.store, name)

        async def counted(*args: Any, _real: Any = real, _name: str = name) -> Any:
            calls[_name] += 1
            return await _real(*args)

        setattr(domain.store, name, counted)
    for i in range(50):
        problem(await api.call("GET", f"/v1/releases/r{i:012d}/slots"), "not-found", 404)
        problem(
            await api.call("POST", "/v1/challenges", {"release": f"r{i:012d}"}), "not-found", 404
        )
    assert calls == {"release": 0, "release_ids": 0}  # the known ids were read at publish
    api.clock.advance(3)
    problem(await api.call("GET", "/v1/releases/rzzzzzzzzzzzz/slots"), "not-found", 404)
    assert calls == {"release": 0, "release_ids": 1}


def test_the_catch_all_refuses_routes_it_could_not_shortcut() -> None:
    # With a variable first segment, "no route starts like this" would not prove a 404.
    with pytest.raises(ValueError, match="first segment"):
        unmatched(["/v1/sites", "/{tenant}/sites"])


async def test_a_refusal_quoting_kilobytes_of_input_is_not_kept(api: Api) -> None:
    """Refusal bodies are kept for the floods that repeat them, but not one whose detail
    quotes kilobytes of a made-up id: a thousand of them would take the room of those that
    repeat, and 8 MB."""
    web_module._cached_problem_json.cache_clear()
    kept = 0
    reply = await api.call("GET", f"/v1/releases/r{'x' * 4000}/slots")
    assert reply.status == 404 and reply.body["type"] == "/problems/not-found", reply.body
    assert web_module._cached_problem_json.cache_info().currsize == kept
    assert (await api.call("GET", "/v1/releases/rnothinghere/slots")).status == 404
    assert web_module._cached_problem_json.cache_info().currsize == kept + 1
