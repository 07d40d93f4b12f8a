"""``guichet demo``: the Préfecture de la Seine-Saint-Denis (Bobigny) and the sous-préfecture
du Raincy, their procedures, and releases of both modes over the next two weeks.

Idempotent: sites are upserted, and releases are only added to a site that has none running.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from engine.models import Procedure, Site
from engine.reservations import Reservations, SlotSpec, new_release

TIMEZONE = "Europe/Paris"
PROCEDURES = (
    Procedure("titre-sejour-renouvellement", "Renouvellement de titre de séjour"),
    Procedure("titre-sejour-premiere-demande", "Première demande de titre de séjour"),
    Procedure("admission-exceptionnelle", "Admission exceptionnelle au séjour"),
    Procedure("naturalisation", "Naturalisation"),
)
SITES = (
    Site("bobigny", "Préfecture de la Seine-Saint-Denis (Bobigny)", TIMEZONE, PROCEDURES),
    Site("le-raincy", "Sous-préfecture du Raincy", TIMEZONE, PROCEDURES),
)


def _weekday_slots(start: datetime, days: int, capacity: int) -> list[SlotSpec]:
    """Mornings 9:00-12:00, every 15 minutes, on working days, in the site's time zone."""
    tz = ZoneInfo(TIMEZONE)
    first = start.astimezone(tz).date() + timedelta(days=1)
    slots = []
    for d in range(days):
        day = first + timedelta(days=d)
        if day.weekday() >= 5:
            continue
        for minutes in range(0, 180, 15):
            starts = datetime.combine(day, time(9), tz) + timedelta(minutes=minutes)
            slots.append(SlotSpec(starts, 15, capacity))
    return slots


async def seed(domain: Reservations, now: datetime | None = None) -> list[str]:
    """Seed the demo; return the ids of the releases created (empty if already seeded)."""
    store = domain.store
    now = (now or datetime.now(UTC)).replace(second=0, microsecond=0)
    created = []
    for site in SITES:
        await store.upsert_site(site)
        if await store.releases(site.id, None, now):
            continue
        capacity = 2 if site.id == "bobigny" else 1
        releases = [
            new_release(
                site.id,
                "titre-sejour-renouvellement",
                "fcfs",
                _weekday_slots(now, 14, capacity),
                opens_at=now - timedelta(minutes=1),
            ),
            new_release(
                site.id,
                "titre-sejour-premiere-demande",
                "fcfs",
                _weekday_slots(now, 7, capacity),
                opens_at=now + timedelta(days=1),
            ),
            new_release(
                site.id,
                "naturalisation",
                "draw",
                _weekday_slots(now + timedelta(days=7), 7, capacity),
                registration_opens_at=now - timedelta(minutes=1),
                registration_closes_at=now + timedelta(days=3),
                draw_at=now + timedelta(days=3, hours=1),
                beacon_source=(
                    "EuroMillions, the draw after registration closes: its five numbers, "
                    "then its two stars, each two digits, separated by spaces"
                ),
            ),
        ]
        for release in releases:
            await domain.publish(release)
            created.append(release.id)
    return created
