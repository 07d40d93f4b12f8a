"""Admin HTTP handlers for the prefecture's staff: sites, releases, counter bookings, agenda.

Every handler first checks the admin bearer token, which names the agent (GUICHET_ADMIN_TOKENS;
GUICHET_ADMIN_TOKEN's is "admin"); with neither configured, every request is refused.
"""

from __future__ import annotations

import csv
import hmac
import io
import json
import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from zoneinfo import ZoneInfo

from aiohttp import web

from engine import fairness, logs, render, schemas
from engine.appkeys import LOTTERY, RESERVATIONS, SETTINGS
from engine.errors import NotAcceptable, NotFound, Unauthorized, ValidationFailed
from engine.handlers import applicant, idempotency_key
from engine.models import Procedure, Release, Site
from engine.reservations import SlotSpec, new_release
from engine.tokens import derived_id, token_hash
from engine.web import bearer, json_response, parse_body, preferred_type

_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")

# The agenda CSV's separators: RFC 4180's comma, and the semicolon that a spreadsheet set to
# French (among others) splits on, where a comma file opens as one column.
_SEPARATORS = {"comma": ",", "semicolon": ";"}
_BOOLEANS = {"true": True, "false": False}

AGENDA_COLUMNS = (
    "starts_at",
    "duration_minutes",
    "reference",
    "family_name",
    "given_names",
    "birth_date",
    "procedure",
    "channel",
    "slot_id",
)


def _limit(request: web.Request) -> int:
    """Staff's bodies may be larger than the public ones: a release of many slots."""
    return request.app[SETTINGS].max_admin_body_bytes


def require_admin(request: web.Request) -> str:
    """The agent the request's bearer token names, also set for the request's log lines
    and audit rows (``logs.agent``); else 401."""
    settings = request.app[SETTINGS]
    presented = token_hash(bearer(request))
    known = settings.admin_agents
    if settings.admin_token is not None:
        known = (("admin", settings.admin_token), *known)
    found = None
    for name, token in known:  # each compared, whichever matches: no timing tells which
        if hmac.compare_digest(presented, token_hash(token)):
            found = name
    if found is None:
        raise Unauthorized("Wrong admin token")
    logs.agent.set(found)
    return found


async def put_site(request: web.Request) -> web.Response:
    require_admin(request)
    site_id = request.match_info["site"]
    body = await parse_body(request, schemas.SiteIn, _limit(request))
    schemas.parse_ident("site", site_id)
    site = Site(
        site_id, body.name, body.timezone, tuple(Procedure(p.id, p.name) for p in body.procedures)
    )
    # The site as stored: a procedure left out but still used by a release is kept.
    stored = await request.app[RESERVATIONS].upsert_site(site)
    return json_response({"site": render.site(stored)})


async def create_release(request: web.Request) -> web.Response:
    require_admin(request)
    body = await parse_body(request, schemas.ReleaseIn, _limit(request))
    key = idempotency_key(request)
    domain = request.app[RESERVATIONS]
    timezone = await domain.store.site_timezone(body.site)
    if timezone is not None:  # else no such site: the store says so
        moments = [(f"slots.{i}.starts_at", s.starts_at) for i, s in enumerate(body.slots)]
        _check_offsets(timezone, [*moments, *_windows(body).items()])
    release_id = None
    if key is not None:
        # The same request again (its answer lost: a 503 after the commit) gets the release
        # it made, instead of a second release of the same appointments. The body is part
        # of the key's scope: a key sent again with other slots publishes those.
        scope = json.dumps(body.model_dump(mode="json"), sort_keys=True)
        release_id = derived_id(request.app[SETTINGS].secret, "release-id", "r", 12, key, scope)
    release = new_release(
        body.site,
        body.procedure,
        body.mode,
        [SlotSpec(s.starts_at, s.duration_minutes, s.capacity) for s in body.slots],
        opens_at=body.opens_at,
        registration_opens_at=body.registration_opens_at,
        registration_closes_at=body.registration_closes_at,
        draw_at=body.draw_at,
        release_id=release_id,
        beacon_source=body.beacon_source,
    )
    await domain.publish(release)
    return _release_reply(await domain.release(release.id), status=201)


def _release_reply(release: Release, status: int = 200) -> web.Response:
    """A release as staff see it, with its ETag (what ``If-Match`` on a PATCH names)."""
    response = json_response({"release": render.release_for_staff(release)}, status=status)
    response.headers["ETag"] = release.etag
    return response


async def get_release(request: web.Request) -> web.Response:
    require_admin(request)
    domain = request.app[RESERVATIONS]
    return _release_reply(await domain.current_release(request.match_info["release"]))


_ETAG = re.compile(r'^(?:W/)?"[\x21\x23-\x7e]*"$')


def if_match(request: web.Request) -> frozenset[str] | None:
    """The ETags of ``If-Match`` (RFC 9110): ``*`` or a list of quoted ones. A weak one
    (``W/"..."``) is kept as it is, so that it matches none: a PATCH needs a strong match."""
    raw = request.headers.getall("If-Match", [])
    if not raw:
        return None
    tags = frozenset(t.strip() for line in raw for t in line.split(","))
    if tags != {"*"} and not all(_ETAG.match(t) for t in tags):
        raise ValidationFailed(
            [{"field": "If-Match", "message": 'must be * or a list of ETags, as "..."'}]
        )
    return tags


async def patch_release(request: web.Request) -> web.Response:
    require_admin(request)
    body = await parse_body(request, schemas.ReleasePatch, _limit(request))
    domain = request.app[RESERVATIONS]
    release = await domain.release(request.match_info["release"])
    windows = _windows(body)
    _check_offsets(release.timezone, windows.items())
    capacities = {s.id: s.capacity for s in body.slots}
    await domain.patch_release(release.id, windows, capacities, if_match(request))
    return _release_reply(await domain.release(release.id))


def _windows(body: schemas.ReleaseIn | schemas.ReleasePatch) -> dict[str, datetime]:
    """The release's windows the body gives, by name."""
    names = ("opens_at", "registration_opens_at", "registration_closes_at", "draw_at")
    return {n: getattr(body, n) for n in names if getattr(body, n) is not None}


def _check_offsets(timezone: str, moments: Iterable[tuple[str, datetime]]) -> None:
    """Refuse a time whose offset is neither UTC's nor the site's at that instant. A tool
    that wrote +01:00 all year moved every summer slot an hour later, and a local time that
    does not exist (the hour skipped in spring) landed on another slot's time, silently:
    the instant was kept as written."""
    zone = ZoneInfo(timezone)
    errors = []
    for field, moment in moments:
        given, site = moment.isoformat()[-6:], moment.astimezone(zone).isoformat()[-6:]
        if given not in (site, "+00:00"):
            errors.append(
                {
                    "field": field,
                    "message": f"has the offset {given}, not {timezone}'s at that time "
                    f"({site}): give the site's local time with its offset, or UTC",
                }
            )
    if errors:
        raise ValidationFailed(errors)


async def put_beacon(request: web.Request) -> web.Response:
    """Add the public beacon value to a draw, after registration closed."""
    require_admin(request)
    body = await parse_body(request, schemas.BeaconIn, _limit(request))
    await request.app[LOTTERY].set_beacon(request.match_info["release"], body.beacon)
    return json_response({"beacon": body.beacon})


async def staff_booking(request: web.Request) -> web.Response:
    require_admin(request)
    body = await parse_body(request, schemas.StaffBookingRequest, _limit(request))
    done = await request.app[RESERVATIONS].staff_book(
        body.slot_id, applicant(body.applicant), idempotency_key(request)
    )
    return json_response(
        {"booking": render.booking(done.booking), "cancel_token": done.cancel_token}, status=201
    )


async def staff_entry(request: web.Request) -> web.Response:
    """Register a person in a draw at the counter or on the phone: no proof of work."""
    require_admin(request)
    body = await parse_body(request, schemas.StaffEntryRequest, _limit(request))
    entry = await request.app[LOTTERY].staff_enter(
        request.match_info["release"], applicant(body.applicant), idempotency_key(request)
    )
    return json_response(
        {"entry_id": entry.id, "entry_token": entry.token, "status": entry.status}, status=201
    )


_AUDIT_TEXT = re.compile(r"^[\x21-\x7e]{1,200}$")
Errors = list[dict[str, str]]


def _text_param(query: Mapping[str, str], name: str, errors: Errors) -> str | None:
    value = query.get(name)
    if value is not None and not _AUDIT_TEXT.match(value):
        errors.append({"field": name, "message": "must be 1 to 200 printable ASCII characters"})
    return value


def _moment_param(query: Mapping[str, str], name: str, errors: Errors) -> datetime | None:
    value = query.get(name)
    if value is None:
        return None
    try:
        return schemas.parse_moment(value)
    except ValueError:
        # A "+" not written %2B arrives as a space.
        errors.append({"field": name, "message": "must be an RFC 3339 time with an offset"})
        return None


def _int_param(
    query: Mapping[str, str], name: str, low: int, high: int, errors: Errors
) -> int | None:
    value = query.get(name)
    if value is None:
        return None
    # Digits first counted, leading zeros off: int() of thousands of them is slow, then
    # refused (ValueError), leading zeros included.
    digits = value.lstrip("0") or "0"
    if value.isascii() and value.isdigit() and len(digits) <= len(str(high)):
        number = int(digits)
        if low <= number <= high:
            return number
    errors.append({"field": name, "message": f"must be a whole number, {low} to {high}"})
    return None


async def audit(request: web.Request) -> web.Response:
    """The audit log, newest first: ``?subject=&agent=&action=&since=&until=`` filter it,
    ``?limit=`` (1 to 1 000, 100 by default) bounds a page, and ``?before=`` the last id
    of a page reads the next one."""
    require_admin(request)
    query = request.query
    errors: Errors = []
    subject, agent, action = (_text_param(query, n, errors) for n in ("subject", "agent", "action"))
    since, until = (_moment_param(query, n, errors) for n in ("since", "until"))
    limit = _int_param(query, "limit", 1, 1000, errors)
    before = _int_param(query, "before", 1, 2**62, errors)
    if errors:
        raise ValidationFailed(errors)
    rows = await request.app[RESERVATIONS].store.audit(
        subject=subject,
        agent=agent,
        action=action,
        since=since,
        until=until,
        before=before,
        limit=limit or 100,
    )
    entries = [
        {
            "id": row["id"],
            "at": render.local(row["at"], "UTC"),
            "actor": row["actor"],
            "action": row["action"],
            "subject": row["subject"],
            "detail": json.loads(row["detail"]),
        }
        for row in rows
    ]
    return json_response({"entries": entries})


async def identity_check(request: web.Request) -> web.Response:
    """Whether a booking was made under the number of the document the person shows."""
    require_admin(request)
    body = await parse_body(request, schemas.IdentityCheck, _limit(request))
    domain = request.app[RESERVATIONS]
    matches = await domain.check_identity(request.match_info["reference"], body.id_number)
    return json_response({"matches": matches})


async def staff_cancel(request: web.Request) -> web.Response:
    """Cancel for the person (``?by=person``, the default) or by the prefecture
    (``?by=prefecture``: the person's caps do not count it); the place goes back
    (``?place=return``, the default) or is taken off its slot (``?place=withdraw``)."""
    require_admin(request)
    by, place = request.query.get("by", "person"), request.query.get("place", "return")
    errors = []
    if by not in ("person", "prefecture"):
        errors.append({"field": "by", "message": "must be person or prefecture"})
    if place not in ("return", "withdraw"):
        errors.append({"field": "place", "message": "must be return or withdraw"})
    elif place == "withdraw" and "by" not in request.query:
        # Mostly the prefecture's doing, which the person's caps must not count: say so.
        errors.append({"field": "by", "message": "say who cancels when withdrawing the place"})
    if errors:
        raise ValidationFailed(errors)
    await request.app[RESERVATIONS].staff_cancel(
        request.match_info["reference"],
        "prefecture" if by == "prefecture" else "person",
        withdraw=place == "withdraw",
    )
    return web.Response(status=204)


async def fairness_report(request: web.Request) -> web.Response:
    """How online bookings of appointments to come spread over client networks."""
    require_admin(request)
    domain = request.app[RESERVATIONS]
    release_id = request.query.get("release")
    if release_id is not None:
        release_id = (await domain.release(release_id)).id
    report = await fairness.measure(domain.store, domain.now(), release_id)
    return json_response(report.render())


async def agenda(request: web.Request) -> web.Response:
    require_admin(request)
    site_id = schemas.parse_ident("site", request.query.get("site", ""))
    text = request.query.get("date", "")
    try:
        # fromisoformat alone takes 20261201 and 2026-W49-2 too.
        day = date.fromisoformat(text) if _DATE.match(text) else None
    except ValueError:
        day = None
    if day is None:
        raise ValidationFailed([{"field": "date", "message": "must be YYYY-MM-DD"}])
    if not schemas.plausible_year(day.year):
        raise ValidationFailed([{"field": "date", "message": schemas.YEARS_MESSAGE}])
    media = preferred_type(request.headers.get("Accept", "*/*"), ("application/json", "text/csv"))
    if media is None:
        raise NotAcceptable("The agenda is served as application/json or text/csv")
    wants_csv = media == "text/csv"
    separator = _SEPARATORS.get(request.query.get("separator", "comma"))
    if separator is None:
        raise ValidationFailed([{"field": "separator", "message": "must be comma or semicolon"}])
    bom = _BOOLEANS.get(request.query.get("bom", "false"))
    if bom is None:
        raise ValidationFailed([{"field": "bom", "message": "must be true or false"}])
    store = request.app[RESERVATIONS].store
    timezone = await store.site_timezone(site_id)
    if timezone is None:
        raise NotFound(f"No site {site_id!r}")
    rows = [
        {
            "starts_at": render.local(row["starts_at"], timezone),
            "duration_minutes": row["duration_minutes"],
            "reference": row["reference"],
            "family_name": row["family_name"],
            "given_names": row["given_names"],
            "birth_date": row["birth_date"] and row["birth_date"].isoformat(),  # None: purged
            "procedure": row["procedure_id"],
            "channel": row["channel"],
            "slot_id": row["slot_id"],
        }
        for row in await store.agenda(site_id, day, timezone)
    ]
    if wants_csv:
        # With a byte-order mark first if asked (an addition to API.md's CSV: a program
        # reading it would take the mark for part of the first column's name). Without
        # one, a spreadsheet opens it in the system's legacy code page: "Éloïse" reads
        # "Ã‰loÃ¯se" at the counter.
        out = io.StringIO()
        if bom:
            out.write("\ufeff")
        writer = csv.DictWriter(out, AGENDA_COLUMNS, delimiter=separator)
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
        return web.Response(
            text=out.getvalue(),
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="agenda-{site_id}-{day}.csv"'},
        )
    return json_response({"site": site_id, "date": day.isoformat(), "bookings": rows})


def _cell(value: object) -> object:
    """Keep a spreadsheet from reading a name such as '=HYPERLINK(...)' as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
