"""The JSON shapes of successful replies, as API.md states them, for ``/openapi.json``.

The handlers build their replies as plain dictionaries (``engine.render``) and serialise them
with orjson: validating each reply against a model would cost every request. These models
exist for the document only, so that the public site's developers can generate their
clients from it, and so that the tests check every reply against it (``tests/contract.py``
for every reply of every test, ``tests/test_fuzz.py`` through schemathesis).

The document leaves each object open to other fields, as API.md allows new ones (a client
must ignore what it does not know). The tests close them: a field the handlers add must be
named here first, or every test that receives it fails.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field


class Reply(BaseModel):
    pass


# A time in the site's time zone, with its offset (RFC 3339), as ``render.local`` writes it.
Moment = datetime


class Procedure(Reply):
    id: str
    name: str


class Site(Reply):
    id: str
    name: str
    timezone: str
    procedures: list[Procedure]


class Sites(Reply):
    sites: list[Site]


class _Release(Reply):
    id: str
    site: str
    procedure: str
    slots_total: int = Field(ge=0)


class FcfsRelease(_Release):
    mode: Literal["fcfs"]
    opens_at: Moment


class DrawRelease(_Release):
    """``beacon_source``: where the beacon will come from, if the release said so when
    it was published; ``entries_digest``: once registration has closed and the list is
    frozen; ``beacon``: once staff added it, after that."""

    mode: Literal["draw"]
    registration_opens_at: Moment
    registration_closes_at: Moment
    draw_at: Moment
    seed_commitment: str
    entries_digest: str | None = None
    beacon_source: str | None = None
    beacon: str | None = None


# A release by its mode: each mode's fields are then required in the document.
Release = Annotated[FcfsRelease | DrawRelease, Field(discriminator="mode")]


class Releases(Reply):
    releases: list[Release]


class Slot(Reply):
    id: str
    starts_at: Moment
    duration_minutes: int


class FreeSlot(Slot):
    free: int = Field(ge=0)


class Slots(Reply):
    slots: list[FreeSlot]


class Challenge(Reply):
    challenge: str
    algorithm: Literal["sha256-leading-zero-bits"]
    difficulty: int = Field(ge=0)
    puzzles: int = Field(ge=1)
    expires_at: Moment
    session: str


class Hold(Reply):
    hold_id: str
    hold_token: str
    expires_at: Moment
    slot: Slot


class Person(Reply):
    family_name: str
    given_names: str


class Booking(Reply):
    """``cancelled_by``, on a cancelled booking only: the person (themselves, or staff for
    them), or the prefecture, which called the appointment off."""

    reference: str
    status: Literal["confirmed", "cancelled"]
    slot: Slot
    applicant: Person
    cancelled_by: Literal["person", "prefecture"] | None = None


class BookingOnly(Reply):
    booking: Booking


class Confirmed(Reply):
    booking: Booking
    cancel_token: str


class Entry(Reply):
    """``status``: registered, but for a retry of the request that registered the entry,
    answered after the draw: the entry's status then (GET the entry for the rest)."""

    entry_id: str
    entry_token: str
    status: Literal["registered", "won", "not-drawn", "withdrawn"]


class EntryStatus(Reply):
    """``excluded``: withdrawn by the draw (this person had booked otherwise, or is at a
    booking cap), not by its person."""

    status: Literal["registered", "won", "not-drawn", "withdrawn"]
    excluded: bool | None = None
    booking: Booking | None = None
    cancel_token: str | None = None


class DrawPlaces(Reply):
    slot: str
    starts_at: Moment
    count: int


class DrawRecord(Reply):
    """The public record of a draw (docs/draw.md)."""

    version: str
    release: str
    seed_commitment: str
    seed: str
    beacon: str
    # Where the beacon was to come from, as the release said when it was published.
    beacon_source: str | None = None
    entries: list[str]
    entries_digest: str
    places: list[DrawPlaces]
    # Entry digests the draw passed over: booked otherwise, at a cap, or withdrawn by their
    # person after registration closed (docs/draw.md, step 8).
    excluded: list[str]
    allocation: dict[str, str]
    drawn_at: Moment


class SiteSaved(Reply):
    site: Site


class AuditEntry(Reply):
    id: int
    at: Moment
    actor: str
    action: str
    subject: str
    # What the action changed, and the agent of a staff request (README, "Operations").
    detail: dict[str, Any]


class AuditLog(Reply):
    """Newest first; the next page: ``?before=`` the last entry's id."""

    entries: list[AuditEntry]


class IdentityChecked(Reply):
    """Whether the booking was made under the number of the document shown."""

    matches: bool


class StaffSlot(Slot):
    capacity: int = Field(ge=0)
    booked: int = Field(ge=0)


class StaffFcfsRelease(FcfsRelease):
    slots: list[StaffSlot]


class StaffDrawRelease(DrawRelease):
    slots: list[StaffSlot]


class ReleaseSaved(Reply):
    release: Annotated[StaffFcfsRelease | StaffDrawRelease, Field(discriminator="mode")]


class Beacon(Reply):
    beacon: str


class Network(Reply):
    network: str
    bookings: int
    share: float


class Fairness(Reply):
    bookings: int
    networks: int
    busiest_share: float
    busiest: list[Network]


class AgendaRow(Reply):
    starts_at: Moment
    duration_minutes: int
    reference: str
    family_name: str
    given_names: str
    birth_date: date | None  # None (and empty names) once purged, past its retention
    procedure: str
    channel: Literal["online", "staff", "draw"]
    slot_id: str


class Agenda(Reply):
    site: str
    date: date
    bookings: list[AgendaRow]


class Health(Reply):
    status: Literal["ok"]


class Ready(Reply):
    status: Literal["ready"]
    postgresql: Literal["ok"]
    redis: Literal["ok"]
