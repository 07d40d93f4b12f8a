"""Public HTTP handlers: parse, call the domain, render. Nothing else happens here."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from engine import render, schemas, sessions
from engine.appkeys import BODIES, DRAW_RECORDS, LOTTERY, REFILLS, RESERVATIONS, SETTINGS
from engine.errors import ValidationFailed
from engine.identity import Applicant
from engine.pow import ALGORITHM
from engine.web import (
    Body,
    bearer,
    body_of,
    cached_json_response,
    client_address,
    json_bytes,
    json_response,
    parse_body,
)

_IDEMPOTENCY_KEY_MAX = 200


def _client(request: web.Request) -> str:
    return client_address(request, request.app[SETTINGS].trusted_proxies)


def _refuse_known(request: web.Request) -> None:
    """A client already found over a limit is refused before its body is even read."""
    request.app[RESERVATIONS].limiter.refuse_address(_client(request))


def applicant(a: schemas.Applicant) -> Applicant:
    return Applicant(a.family_name, a.given_names, a.birth_date, a.id_number, a.email)


def _fresh(request: web.Request, key: tuple[str | None, ...]) -> web.Response | None:
    """The cached listing, if still fresh: the poller's path, before any other work."""
    hit = request.app[BODIES].get(key)
    if hit is None or hit[0] <= request.app[RESERVATIONS].clock():
        return None
    return cached_json_response(request, hit[1])


async def _cached_json(
    request: web.Request, key: tuple[str | None, ...], build: Callable[[], Awaitable[Any]]
) -> web.Response:
    """A listing's rendered body, kept ``listing_cache_s``: pollers hammer listings, and
    rendering (a time zone per slot, JSON) costs more than the lookup behind it."""
    cache = request.app[BODIES]
    now = request.app[RESERVATIONS].clock()
    hit = cache.get(key)
    if hit is None or hit[0] <= now:
        hit = await _single_flight(request, key, lambda: _refill(request, key, build, now))
    return cached_json_response(request, hit[1])


async def _single_flight(
    request: web.Request,
    key: tuple[str | None, ...],
    make: Callable[[], Coroutine[Any, Any, tuple[float, Body]]],
) -> tuple[float, Body]:
    """One request makes the body for ``key``; the others in flight wait for it instead of
    each asking the stores again."""
    return await request.app[REFILLS].run(key, make)


async def _refill(
    request: web.Request,
    key: tuple[str | None, ...],
    build: Callable[[], Awaitable[Any]],
    now: float,
) -> tuple[float, Body]:
    cache = request.app[BODIES]
    if len(cache) > 10_000:
        cache.clear()
    body = await body_of(json_bytes(await build()))
    hit = (now + request.app[SETTINGS].listing_cache_s, body)
    cache[key] = hit
    return hit


async def list_sites(request: web.Request) -> web.Response:
    async def build() -> Any:
        return {"sites": [render.site(s) for s in await request.app[RESERVATIONS].sites()]}

    return await _cached_json(request, ("sites",), build)


async def list_releases(request: web.Request) -> web.Response:
    domain = request.app[RESERVATIONS]
    # An empty value filters nothing, as a form's "any" choice sends it (`?site=&procedure=`).
    site = request.query.get("site") or None
    procedure = request.query.get("procedure") or None
    for name, value in (("site", site), ("procedure", procedure)):
        if value is not None:
            schemas.parse_ident(name, value)

    key = ("releases", site, procedure)
    if (fresh := _fresh(request, key)) is not None:
        return fresh
    releases = await domain.releases(site, procedure)  # the worker's list, filtered
    if (site or procedure) and not releases:
        # Nothing to list, as for made-up values: answered, not kept, so that random
        # filters cannot fill the listings' cache (which is emptied when full).
        return json_response({"releases": []})

    async def build() -> Any:
        return {"releases": [render.release(r) for r in releases]}

    return await _cached_json(request, key, build)


async def list_slots(request: web.Request) -> web.Response:
    key = ("slots", request.match_info["release"])
    if (fresh := _fresh(request, key)) is not None:
        return fresh  # only a found release's listing is ever cached
    domain = request.app[RESERVATIONS]
    release = await domain.release(key[1])

    async def build() -> Any:
        counts = await domain.slot_counts(release.id)
        now = domain.now()
        slots = []
        for slot in release.slots:
            if slot.starts_at <= now:
                continue
            count = counts.get(slot.id)
            free = count.free if count is not None else 0
            slots.append({**render.slot(slot, release.timezone), "free": free})
        return {"slots": slots}

    return await _cached_json(request, key, build)


async def create_challenge(request: web.Request) -> web.Response:
    _refuse_known(request)
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


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= _IDEMPOTENCY_KEY_MAX and key.isascii()):
        raise ValidationFailed(
            [{"field": "Idempotency-Key", "message": "must be 1 to 200 ASCII characters"}]
        )
    return key


async def create_hold(request: web.Request) -> web.Response:
    client = _client(request)
    body = await parse_body(request, schemas.HoldRequest)
    key = idempotency_key(request)
    domain = request.app[RESERVATIONS]
    hold = await domain.hold(body.slot_id, body.challenge, list(body.nonces), client, key)
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
    await request.app[RESERVATIONS].release_hold(
        request.match_info["hold_id"], token, _client(request)
    )
    return web.Response(status=204)


async def get_booking(request: web.Request) -> web.Response:
    token = bearer(request)
    booking = await request.app[RESERVATIONS].booking(
        request.match_info["reference"], token, _client(request)
    )
    return json_response({"booking": render.booking(booking)})


async def cancel_booking(request: web.Request) -> web.Response:
    token = bearer(request)
    await request.app[RESERVATIONS].cancel(request.match_info["reference"], token, _client(request))
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
        {"entry_id": entry.id, "entry_token": entry.token, "status": entry.status}, status=201
    )


async def get_entry(request: web.Request) -> web.Response:
    token = bearer(request)
    view = await request.app[LOTTERY].view(
        request.match_info["release"], request.match_info["entry_id"], token, _client(request)
    )
    out: dict[str, object] = {"status": view.status}
    if view.excluded:
        out["excluded"] = True  # withdrawn by the draw, not by this person
    if view.booking is not None:
        out["booking"] = render.booking(view.booking)
        out["cancel_token"] = view.cancel_token
    return json_response(out)


async def delete_entry(request: web.Request) -> web.Response:
    token = bearer(request)
    await request.app[LOTTERY].withdraw(
        request.match_info["release"], request.match_info["entry_id"], token, _client(request)
    )
    return web.Response(status=204)


_DRAW_RECORDS_BYTES = 64 * 1024 * 1024


async def get_draw(request: web.Request) -> web.Response:
    """The draw's public record. It never changes once written, and everyone looks at once
    when it is published, while it lists every entry (megabytes for a large draw): each
    worker reads each once and keeps those read last, up to 64 MiB (a record of 100 000
    entries: about 10 MiB with its gzip form). Any record is public: kept by count (the
    last four), a client asking for five in turn made each request a read of megabytes
    from PostgreSQL, then JSON and gzip, a tenth of a second of the worker's time."""
    release_id = request.match_info["release"]
    kept = request.app[DRAW_RECORDS]  # least recently read first
    body = kept.pop(release_id, None)
    if body is not None:
        kept[release_id] = body
    else:

        async def read() -> tuple[float, Body]:
            record = await body_of(json_bytes(await request.app[LOTTERY].record(release_id)))
            kept[release_id] = record
            size = sum(body.size for body in kept.values())
            while size > _DRAW_RECORDS_BYTES and len(kept) > 1:
                size -= kept.pop(next(iter(kept))).size
            return math.inf, record

        _, body = await _single_flight(request, ("draw", release_id), read)
    return cached_json_response(request, body)
