"""The sweeper: reclaims expired holds, settles confirms that never reported back, and
reconciles Redis toward PostgreSQL. Every worker runs one; a short Redis lock lets one of
them work at a time (each step is idempotent, so an overlap would only waste work).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from engine import fairness
from engine.errors import StoreUnavailable
from engine.inventory import InventoryMissing
from engine.keys import SWEEPER_LOCK
from engine.logs import log
from engine.reservations import Reservations


@dataclass(frozen=True, slots=True)
class SweepReport:
    releases: int = 0
    settled: int = 0
    corrections: int = 0


async def sweep_once(domain: Reservations, *, reconcile: bool) -> SweepReport:
    """One pass over the active releases. Visits none if another worker holds the lock."""
    lock_ms = int(max(domain.settings.sweep_interval_s * 5, 5) * 1000)
    if not await domain.inventory.try_lock(SWEEPER_LOCK, lock_ms):
        return SweepReport()
    settled = corrections = 0
    try:
        releases = await domain.store.active_release_ids(domain.now())
        for release_id in releases:
            try:
                await domain.inventory.counts(release_id, domain.now_ms())
            except InventoryMissing:
                await domain.recovery.rebuild(release_id)
            settled += await domain.recovery.settle_stale_confirms(release_id)
            if reconcile:
                corrections += await domain.recovery.reconcile(release_id)
        if reconcile:
            fairness.publish(domain.metrics, await fairness.measure(domain.store, domain.now()))
        return SweepReport(len(releases), settled, corrections)
    finally:
        await domain.inventory.unlock(SWEEPER_LOCK)


async def run(domain: Reservations, stop: asyncio.Event) -> None:
    """Sweep every ``sweep_interval_s`` until ``stop`` is set; reconcile every
    ``reconcile_interval_s``."""
    settings = domain.settings
    next_reconcile = time.monotonic()
    while not stop.is_set():
        try:
            due = time.monotonic() >= next_reconcile
            if (await sweep_once(domain, reconcile=due)).releases and due:
                next_reconcile = time.monotonic() + settings.reconcile_interval_s
        except StoreUnavailable as exc:
            log.warning("sweep_skipped", detail=exc.detail)
        except Exception:
            log.exception("sweep_failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.sweep_interval_s)
