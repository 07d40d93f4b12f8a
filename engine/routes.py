"""The route table: what the app serves and what ``/openapi.json`` describes, from one list."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from pydantic import BaseModel

from engine import admin, handlers, ops, replies, schemas

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    ok: int = 200
    body: type[BaseModel] | None = None
    errors: tuple[str, ...] = ()
    auth: str | None = None  # "admin", "hold", "cancel"
    reply: type[BaseModel] | None = None  # the JSON body of ``ok`` (engine/replies.py)
    # Refused with 503 "overloaded" past ``max_in_flight``; not the probes and the metrics,
    # which must answer most when the worker is busiest (nor staff: ``sheds``).
    shed: bool = True
    # Refused with 503 while PostgreSQL's schema is behind this engine's (SchemaState);
    # not the probes, the metrics and this contract, which do not read it.
    schema: bool = True

    @property
    def checks_query(self) -> bool:
        """Refuses a query parameter it does not take (``web.check_query``): the API's
        routes, not the probes and the metrics, which monitoring may call as it likes."""
        return self.path.startswith("/v1/")

    @property
    def sheds(self) -> bool:
        """Refused past ``max_in_flight``. Never staff's: the counter serves people in
        person during the rush, and a request without the token costs its check, as a 503
        would."""
        return self.shed and self.auth != "admin"


_STORE = ("overloaded",)
_ATTEMPT = ("validation-error", "rate-limited", "overloaded")
# By reference: lookups that find nothing are limited (Limiter.lookup_missed).
_LOOKUP = ("rate-limited", "overloaded")

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/sites",
        handlers.list_sites,
        "Sites and their procedures",
        errors=_STORE,
        reply=replies.Sites,
    ),
    Route(
        "GET",
        "/v1/releases",
        handlers.list_releases,
        "Releases whose slots have not all started",
        errors=("validation-error", *_STORE),
        reply=replies.Releases,
    ),
    Route(
        "GET",
        "/v1/releases/{release}/slots",
        handlers.list_slots,
        "Slots of a release with their free places",
        errors=("not-found", *_STORE),
        reply=replies.Slots,
    ),
    Route(
        "POST",
        "/v1/challenges",
        handlers.create_challenge,
        "Get a proof-of-work challenge",
        201,
        schemas.ChallengeRequest,
        ("not-found", "not-open", *_ATTEMPT),
        reply=replies.Challenge,
    ),
    Route(
        "POST",
        "/v1/holds",
        handlers.create_hold,
        "Hold a place (first come, first served)",
        201,
        schemas.HoldRequest,
        ("pow-invalid", "not-found", "slot-full", "not-open", "challenge-expired", *_ATTEMPT),
        reply=replies.Hold,
    ),
    Route(
        "POST",
        "/v1/holds/{hold_id}/confirm",
        handlers.confirm_hold,
        "Confirm a hold as a booking in the applicant's name",
        201,
        schemas.ConfirmRequest,
        # slot-full: a place PostgreSQL no longer has (docs/consistency.md, section 8).
        (
            "unauthorized",
            "not-found",
            "hold-expired",
            "identity-already-booked",
            "slot-full",
            *_ATTEMPT,
        ),
        auth="hold",
        reply=replies.Confirmed,
    ),
    Route(
        "DELETE",
        "/v1/holds/{hold_id}",
        handlers.delete_hold,
        "Give a hold back",
        204,
        errors=(
            "unauthorized",
            "not-found",
            "hold-expired",
            "hold-confirming",
            "hold-confirmed",
            "rate-limited",
            *_STORE,
        ),
        auth="hold",
    ),
    Route(
        "GET",
        "/v1/bookings/{reference}",
        handlers.get_booking,
        "Read a booking",
        errors=("unauthorized", "not-found", *_LOOKUP),
        auth="cancel",
        reply=replies.BookingOnly,
    ),
    Route(
        "DELETE",
        "/v1/bookings/{reference}",
        handlers.cancel_booking,
        "Cancel a booking",
        204,
        errors=("unauthorized", "not-found", "not-open", *_LOOKUP),
        auth="cancel",
    ),
    Route(
        "PUT",
        "/v1/admin/sites/{site}",
        admin.put_site,
        "Create or replace a site",
        body=schemas.SiteIn,
        errors=("unauthorized", "validation-error", *_STORE),
        auth="admin",
        reply=replies.SiteSaved,
    ),
    Route(
        "POST",
        "/v1/admin/releases",
        admin.create_release,
        "Publish a release",
        201,
        schemas.ReleaseIn,
        ("unauthorized", "validation-error", "not-found", *_STORE),
        auth="admin",
        reply=replies.ReleaseSaved,
    ),
    Route(
        "GET",
        "/v1/admin/releases/{release}",
        admin.get_release,
        "A release as PostgreSQL has it now, with each slot's capacity and bookings, and its ETag",
        errors=("unauthorized", "not-found", *_STORE),
        auth="admin",
        reply=replies.ReleaseSaved,
    ),
    Route(
        "PATCH",
        "/v1/admin/releases/{release}",
        admin.patch_release,
        "Change windows not yet started, and capacities",
        body=schemas.ReleasePatch,
        errors=("unauthorized", "validation-error", "not-found", "precondition-failed", *_STORE),
        auth="admin",
        reply=replies.ReleaseSaved,
    ),
    Route(
        "POST",
        "/v1/admin/bookings",
        admin.staff_booking,
        "Book at the counter",
        201,
        schemas.StaffBookingRequest,
        (
            "unauthorized",
            "validation-error",
            "not-found",
            "slot-full",
            "not-open",
            "hold-expired",
            "identity-already-booked",
            "rate-limited",  # the caps on a person's and an address's bookings
            *_STORE,
        ),
        auth="admin",
        reply=replies.Confirmed,
    ),
    Route(
        "POST",
        "/v1/admin/releases/{release}/entries",
        admin.staff_entry,
        "Register a person in a draw at the counter or on the phone (no proof of work)",
        201,
        schemas.StaffEntryRequest,
        (
            "unauthorized",
            "validation-error",
            "not-found",
            "not-open",
            "identity-already-booked",
            *_STORE,
        ),
        auth="admin",
        reply=replies.Entry,
    ),
    Route(
        "DELETE",
        "/v1/admin/bookings/{reference}",
        admin.staff_cancel,
        "Cancel a booking for a person at the counter or on the phone, or by the prefecture",
        204,
        errors=(
            "unauthorized",
            "validation-error",
            "not-found",
            "not-open",
            "cancelled-otherwise",
            *_STORE,
        ),
        auth="admin",
    ),
    Route(
        "GET",
        "/v1/admin/audit",
        admin.audit,
        "What staff and the public did, newest first (the audit log)",
        errors=("unauthorized", "validation-error", *_STORE),
        auth="admin",
        reply=replies.AuditLog,
    ),
    Route(
        "POST",
        "/v1/admin/bookings/{reference}/identity-check",
        admin.identity_check,
        "Check at the counter that a booking was made under the number of the document shown",
        200,
        schemas.IdentityCheck,
        ("unauthorized", "validation-error", "not-found", *_STORE),
        auth="admin",
        reply=replies.IdentityChecked,
    ),
    Route(
        "GET",
        "/v1/admin/agenda",
        admin.agenda,
        "A site's confirmed bookings of one day",
        errors=("unauthorized", "validation-error", "not-found", "not-acceptable", *_STORE),
        auth="admin",
        reply=replies.Agenda,
    ),
    Route(
        "POST",
        "/v1/releases/{release}/entries",
        handlers.create_entry,
        "Register for a draw",
        201,
        schemas.EntryRequest,
        (
            "pow-invalid",
            "not-found",
            "not-open",
            "identity-already-booked",
            "challenge-expired",
            *_ATTEMPT,
        ),
        reply=replies.Entry,
    ),
    Route(
        "GET",
        "/v1/releases/{release}/entries/{entry_id}",
        handlers.get_entry,
        "An entry's status, and its booking once won",
        errors=("unauthorized", "not-found", *_LOOKUP),
        auth="entry",
        reply=replies.EntryStatus,
    ),
    Route(
        "DELETE",
        "/v1/releases/{release}/entries/{entry_id}",
        handlers.delete_entry,
        "Withdraw an entry before the draw",
        204,
        errors=("unauthorized", "not-found", "not-open", *_LOOKUP),
        auth="entry",
    ),
    Route(
        "GET",
        "/v1/releases/{release}/draw",
        handlers.get_draw,
        "The public record of a draw, to re-check it",
        errors=("not-found", "not-open", *_STORE),
        reply=replies.DrawRecord,
    ),
    Route(
        "PUT",
        "/v1/admin/releases/{release}/beacon",
        admin.put_beacon,
        "Add a public beacon value to a draw after registration closed",
        body=schemas.BeaconIn,
        errors=("unauthorized", "validation-error", "not-found", "not-open", *_STORE),
        auth="admin",
        reply=replies.Beacon,
    ),
    Route(
        "GET",
        "/v1/admin/fairness",
        admin.fairness_report,
        "How online bookings spread over client networks",
        errors=("unauthorized", "not-found", *_STORE),
        auth="admin",
        reply=replies.Fairness,
    ),
    Route(
        "GET",
        "/healthz",
        ops.healthz,
        "The process runs",
        reply=replies.Health,
        shed=False,
        schema=False,
    ),
    Route(
        "GET",
        "/readyz",
        ops.readyz,
        "PostgreSQL and Redis answer",
        errors=_STORE,
        reply=replies.Ready,
        shed=False,
        schema=False,
    ),
    Route(
        "GET",
        "/metrics",
        ops.metrics,
        "Prometheus metrics of the whole engine",
        shed=False,
        schema=False,
    ),
    Route(
        "GET",
        "/openapi.json",
        ops.openapi,
        "This contract as OpenAPI 3.1",
        errors=("overloaded",),  # shed past the in-flight cap, as every public route is
        schema=False,
    ),
)
