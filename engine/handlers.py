"""Public HTTP handlers: parse, call the domain, render. Nothing else happens here."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from engine import render, schemas, sessions
from engine.appkeys import LOTTERY, RESERVATIONS, SETTINGS
from engine.errors import ValidationFailed
from engine.identity import Applicant
from engine.pow import ALGORITHM
from engine.web import bearer, client_address, json_response, parse_body

_IDEMPOTENCY_KEY_MAX = 200


def _client(request: web.Request) -> str:
    return client_address(request, request.app[SETTINGS].trusted_proxies)


def applicant(a: schemas.Applicant) -> Applicant:
    return Applicant(a.family_name, a.given_names, a.birth_date, a.id_number, a.email)


async def list_sites(request: web.Request) -> web.Response:
    sites = await request.app[RESERVATIONS].sites()
    return json_response({"sites": [render.site(s) for s in sites]})


async def list_releases(request: web.Request) -> web.Response:
    domain = request.app[RESERVATIONS]
    site, procedure = request.query.get("site"), request.query.get("procedure")
    for name, value in (("site", site), ("procedure", procedure)):
        if value is not None:
            schemas.parse_ident(name, value)
    releases = await domain.releases(site, procedure)
    return json_response({"releases": [render.release(r) for r in releases]})


async def list_slots(request: web.Request) -> web.Response:
    domain = request.app[RESERVATIONS]
    release = await domain.release(request.match_info["release"])
    counts = await domain.slot_counts(release.id)
    now = domain.now()
    slots = []
    for slot in release.slots:
        if slot.starts_at <= now:
            continue
        count = counts.get(slot.id)
        slots.append(
            {**render.slot(slot, release.timezone), "free": count.free if count is not None else 0}
        )
    return json_response({"slots": slots})


async def create_challenge(request: web.Request) -> web.Response:
    body = await parse_body(request, schemas.ChallengeRequest)
    domain = request.app[RESERVATIONS]
    challenge, session = await domain.challenge(
        body.release, _client(request), request.headers.get(sessions.HEADER)
    )
    return json_response(
        {
            "challenge": challenge.text,
            "algorithm": ALGORITHM,
            "difficulty": challenge.difficulty,
            "puzzles": challenge.puzzles,
            "expires_at": render.local(
                datetime.fromtimestamp(challenge.expires_ms / 1000, UTC), "UTC"
            ),
            "session": session,
        },
        status=201,
    )


async def create_hold(request: web.Request) -> web.Response:
    body = await parse_body(request, schemas.HoldRequest)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= _IDEMPOTENCY_KEY_MAX and key.isascii()):
        raise ValidationFailed(
            [{"field": "Idempotency-Key", "message": "must be 1 to 200 ASCII characters"}]
        )
    domain = request.app[RESERVATIONS]
    hold = await domain.hold(body.slot_id, body.challenge, list(body.nonces), _client(request), key)
    return json_response(
        {
            "hold_id": hold.id,
            "hold_token": hold.token,
            "expires_at": render.local(hold.expires_at, "UTC"),
            "slot": render.slot(hold.slot, hold.timezone),
        },
        status=201,
    )


async def confirm_hold(request: web.Request) -> web.Response:
    token = bearer(request)
    body = await parse_body(request, schemas.ConfirmRequest)
    domain = request.app[RESERVATIONS]
    done = await domain.confirm(
        request.match_info["hold_id"], token, applicant(body.applicant), _client(request)
    )
    return json_response(
        {"booking": render.booking(done.booking), "cancel_token": done.cancel_token}, status=201
    )


async def delete_hold(request: web.Request) -> web.Response:
    token = bearer(request)
    await request.app[RESERVATIONS].release_hold(request.match_info["hold_id"], token)
    return web.Response(status=204)


async def get_booking(request: web.Request) -> web.Response:
    token = bearer(request)
    booking = await request.app[RESERVATIONS].booking(request.match_info["reference"], token)
    return json_response({"booking": render.booking(booking)})


async def cancel_booking(request: web.Request) -> web.Response:
    token = bearer(request)
    await request.app[RESERVATIONS].cancel(request.match_info["reference"], token)
    return web.Response(status=204)


# Draw -------------------------------------------------------------------------------------


async def create_entry(request: web.Request) -> web.Response:
    body = await parse_body(request, schemas.EntryRequest)
    entry = await request.app[LOTTERY].enter(
        request.match_info["release"],
        body.challenge,
        list(body.nonces),
        applicant(body.applicant),
        _client(request),
    )
    return json_response(
        {"entry_id": entry.id, "entry_token": entry.token, "status": "registered"}, status=201
    )


async def get_entry(request: web.Request) -> web.Response:
    token = bearer(request)
    view = await request.app[LOTTERY].view(
        request.match_info["release"], request.match_info["entry_id"], token
    )
    out: dict[str, object] = {"status": view.status}
    if view.booking is not None:
        out["booking"] = render.booking(view.booking)
        out["cancel_token"] = view.cancel_token
    return json_response(out)


async def delete_entry(request: web.Request) -> web.Response:
    token = bearer(request)
    await request.app[LOTTERY].withdraw(
        request.match_info["release"], request.match_info["entry_id"], token
    )
    return web.Response(status=204)


async def get_draw(request: web.Request) -> web.Response:
    return json_response(await request.app[LOTTERY].record(request.match_info["release"]))
