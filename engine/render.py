"""JSON shapes of the API's resources (API.md), built from domain records."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from engine.models import Booking, Release, Site, Slot


def local(moment: datetime | None, timezone: str) -> str | None:
    """RFC 3339 in the site's time zone, with its offset."""
    return None if moment is None else moment.astimezone(ZoneInfo(timezone)).isoformat()


def site(s: Site) -> dict[str, Any]:
    return {
        "id": s.id,
        "name": s.name,
        "timezone": s.timezone,
        "procedures": [{"id": p.id, "name": p.name} for p in s.procedures],
    }


def release(r: Release) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": r.id,
        "site": r.site_id,
        "procedure": r.procedure_id,
        "mode": r.mode,
    }
    if r.mode == "fcfs":
        out["opens_at"] = local(r.opens_at, r.timezone)
    else:
        out["registration_opens_at"] = local(r.registration_opens_at, r.timezone)
        out["registration_closes_at"] = local(r.registration_closes_at, r.timezone)
        out["draw_at"] = local(r.draw_at, r.timezone)
        out["seed_commitment"] = r.seed_commitment
        if r.entries_digest is not None:
            out["entries_digest"] = r.entries_digest
        if r.beacon_source is not None:
            out["beacon_source"] = r.beacon_source
        if r.beacon is not None:
            out["beacon"] = r.beacon
    out["slots_total"] = sum(s.capacity for s in r.slots)
    return out


def release_for_staff(r: Release) -> dict[str, Any]:
    """A release with every slot and its capacity, as the admin endpoints answer."""
    return {
        **release(r),
        "slots": [
            {**slot(s, r.timezone), "capacity": s.capacity, "booked": s.booked} for s in r.slots
        ],
    }


def slot(s: Slot, timezone: str) -> dict[str, Any]:
    return {
        "id": s.id,
        "starts_at": _start(s.starts_at, timezone),
        "duration_minutes": s.duration_minutes,
    }


@functools.lru_cache(maxsize=4096)
def _start(moment: datetime, timezone: str) -> str | None:
    # A slot's start is rendered in every hold reply: the same few strings, over and over.
    return local(moment, timezone)


def booking(b: Booking) -> dict[str, Any]:
    out = {
        "reference": b.reference,
        "status": b.status,
        "slot": {
            "id": b.slot_id,
            "starts_at": local(b.starts_at, b.timezone),
            "duration_minutes": b.duration_minutes,
        },
        "applicant": {"family_name": b.family_name, "given_names": b.given_names},
    }
    if b.status == "cancelled":
        # So that the site can tell a person their appointment was called off.
        out["cancelled_by"] = b.cancelled_by or "person"
    return out
