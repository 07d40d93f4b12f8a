"""The domain's records, as the store returns them and the handlers render them."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal

Mode = Literal["fcfs", "draw"]
# Who cancels: the person (themselves, or staff for them), or the prefecture (sql/013).
CancelledBy = Literal["person", "prefecture"]


@dataclass(frozen=True, slots=True)
class Procedure:
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class Site:
    id: str
    name: str
    timezone: str
    procedures: tuple[Procedure, ...]


@dataclass(frozen=True, slots=True)
class Slot:
    id: str
    starts_at: datetime
    duration_minutes: int
    capacity: int
    booked: int


@dataclass(frozen=True, slots=True)
class Release:
    id: str
    site_id: str
    procedure_id: str
    mode: Mode
    opens_at: datetime | None
    registration_opens_at: datetime | None
    registration_closes_at: datetime | None
    draw_at: datetime | None
    timezone: str
    slots: tuple[Slot, ...]
    seed_commitment: str | None = None
    entries_digest: str | None = None  # a draw's, frozen when registration closed
    beacon: str | None = None  # a draw's, added once its list is frozen
    beacon_source: str | None = None  # a draw's: where its beacon will come from
    _index: dict[str, Slot] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {s.id: s for s in self.slots})

    def slot(self, slot_id: str) -> Slot | None:
        return self._index.get(slot_id)

    @property
    def windows(self) -> tuple[datetime | None, ...]:
        return tuple(getattr(self, name) for name in WINDOWS)

    @property
    def etag(self) -> str:
        return release_etag(self.windows, ((s.id, s.capacity) for s in self.slots))


WINDOWS = ("opens_at", "registration_opens_at", "registration_closes_at", "draw_at")


def release_etag(
    windows: tuple[datetime | None, ...], capacities: Iterable[tuple[str, int]]
) -> str:
    """The strong ETag of what staff may change in a release: its windows and its slots'
    capacities (``WINDOWS`` order). A PATCH or a withdrawing cancel changes it; bookings do
    not, so that a busy release can still be changed with ``If-Match``."""
    text = json.dumps(
        [[w.isoformat() if w else None for w in windows], sorted(capacities)],
        separators=(",", ":"),
    )
    digest = hashlib.sha256(text.encode()).digest()[:12]
    return '"' + base64.urlsafe_b64encode(digest).decode() + '"'


@dataclass(frozen=True, slots=True)
class Booking:
    reference: str
    status: Literal["confirmed", "cancelled"]
    release_id: str
    slot_id: str
    starts_at: datetime
    duration_minutes: int
    family_name: str
    given_names: str
    birth_date: date | None  # None once purged (sql/011_personal_data_purge.sql)
    channel: Literal["online", "staff", "draw"]
    hold_token_hash: bytes | None
    cancel_token_hash: bytes
    mode: Mode
    timezone: str
    # Who cancelled it; None while confirmed, and for cancellations from before sql/013
    # (the person's). Whether its place was taken off its slot with it. Last: book_hold
    # answers the fields before them.
    cancelled_by: CancelledBy | None = None
    place_withdrawn: bool = False


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    release_id: str
    status: Literal["registered", "won", "not-drawn", "withdrawn"]
    token_hash: bytes
    booking_reference: str | None
    # Withdrawn by the draw, not by its person: they had booked the procedure otherwise.
    excluded: bool = False


@dataclass(frozen=True, slots=True)
class DrawOutcome:
    release_id: str
    entries: int
    places: int
    allocated: int
    carried: int
    releases_touched: tuple[str, ...]
