"""The sweeper: reclaims expired holds, settles confirms that never reported back,
reconciles Redis toward PostgreSQL, runs the draws that are due, and, once an hour, erases
personal data past its retention. Every worker runs one;
a short Redis lock lets one of them work at a time (each step is idempotent, so an overlap
would only waste work, and a draw runs once whoever runs it).
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
from engine.lottery import Lottery
from engine.reservations import Reservations
from engine.store import Purged


@dataclass(frozen=True, slots=True)
class SweepReport:
    releases: int = 0
    settled: int = 0
    corrections: int = 0
    draws: int = 0
    purged: Purged | None = None  # when the purge ran
    standby: bool = False  # another worker held the sweeper's lock: nothing was visited


async def sweep_once(
    domain: Reservations, *, reconcile: bool, lottery: Lottery | None = None, purge: bool = False
) -> SweepReport:
    """One pass over the active releases, the due draws when ``lottery`` is given, and the
    purge of personal data past its retention when ``purge`` is (and a retention is set).
    Visits none if another worker holds the lock (a draw runs once whoever runs it)."""
    lock_ms = int(max(domain.settings.sweep_interval_s * 5, 5) * 1000)
    try:
        lock = await domain.inventory.try_lock(SWEEPER_LOCK, lock_ms)
    except StoreUnavailable:
        # The lock is in Redis, and Redis is down: the releases wait for it. But the draws
        # need only PostgreSQL, and each runs once whoever runs it (its release row's lock):
        # every worker tries them, so that a draw runs at its time through an outage.
        if lottery is not None:
            with contextlib.suppress(StoreUnavailable):  # its reconcile, after the commit
                await lottery.run_due()
        raise
    if lock is None:
        return SweepReport(standby=True)
    settled = corrections = draws = 0
    # A step that fails does not hold back the others: the draws and the purge need only
    # PostgreSQL, and one release that cannot be swept (a bug, its data) must not keep the
    # others' confirms unsettled. The pass still fails, with the first failure, at the end.
    failure: Exception | None = None
    try:
        releases = await domain.store.active_release_ids(domain.now())
        for release_id in releases:
            try:
                try:
                    await domain.inventory.counts(release_id, domain.now_ms())
                except InventoryMissing:
                    await domain.recovery.rebuild(release_id)
                settled += await domain.recovery.settle_stale_confirms(release_id)
                if reconcile:
                    corrections += await domain.recovery.reconcile(release_id)
            except StoreUnavailable as exc:
                # Redis is down for the next releases too, most likely: each would wait
                # for its timeout. The next pass tries again.
                failure = failure or exc
                break
            except Exception as exc:
                failure = failure or exc
                log.exception("sweep_release_failed", release=release_id)
        try:
            draws = len(await lottery.run_due()) if lottery is not None else 0
            if reconcile:
                measured = await fairness.measure(domain.store, domain.now())
                fairness.publish(domain.metrics, measured)
        except Exception as exc:
            failure = failure or exc
        purged = None
        if purge and domain.settings.retention_days:
            purged = await _purge(domain)
        if failure is not None:
            raise failure
        return SweepReport(len(releases), settled, corrections, draws, purged)
    finally:
        await domain.inventory.unlock(SWEEPER_LOCK, lock)


_PURGE_INTERVAL_S = 3600.0  # personal data is kept for days: an hour late is nothing


async def _purge(domain: Reservations) -> Purged:
    """One bounded purge; a failure is logged and waits for the next hour, like a success
    (the sweeper's other work must not be held up, nor a failing purge retried each pass)."""
    try:
        purged = await domain.store.purge(domain.settings.retention_days)
    except Exception:
        log.exception("purge_failed")
        return Purged(0, 0, more=False)
    if purged.bookings or purged.entries:
        log.info("personal_data_purged", bookings=purged.bookings, entries=purged.entries)
    return purged


async def run(lottery: Lottery, stop: asyncio.Event) -> None:
    """Sweep every ``sweep_interval_s`` until ``stop`` is set; reconcile every
    ``reconcile_interval_s``."""
    domain = lottery.domain
    settings = domain.settings
    next_reconcile = next_purge = time.monotonic()
    while not stop.is_set():
        try:
            due = time.monotonic() >= next_reconcile
            purge = time.monotonic() >= next_purge
            report = await sweep_once(domain, reconcile=due, lottery=lottery, purge=purge)
            domain.metrics.sweeps.labels("standby" if report.standby else "done").inc()
            if report.releases and due:
                next_reconcile = time.monotonic() + settings.reconcile_interval_s
            if report.purged is not None:
                # A backlog is worked through at each pass, a bounded part at a time.
                wait = 0.0 if report.purged.more else _PURGE_INTERVAL_S
                next_purge = time.monotonic() + wait
        except StoreUnavailable as exc:
            domain.metrics.sweeps.labels("skipped").inc()
            log.warning("sweep_skipped", detail=exc.detail)
        except Exception:
            domain.metrics.sweeps.labels("failed").inc()
            log.exception("sweep_failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.sweep_interval_s)
