"""The sweeper: reclaims expired holds, settles confirms that never reported back,
reconciles Redis toward PostgreSQL, runs the draws that are due, and, once an hour, erases
personal data past its retention. Every worker runs one;
a short Redis lock lets one of them work at a time (each step is idempotent, so an overlap
would only waste work, and a draw runs once whoever runs it).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import time
from dataclasses import dataclass

from engine import fairness
from engine.errors import StoreUnavailable
from engine.inventory import RECLAIM_LIMIT, InventoryMissing
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
    # The pass's first failure, if any; ``swept``: it went through every release (so a
    # full reconcile, if asked for, was done).
    failure: Exception | None = None
    swept: bool = True
    # The release the pass stopped at, two in a row having failed: the next pass begins
    # after it, so that the same two do not keep the releases after them from ever being
    # swept.
    stopped_at: str | None = None


# Up to this many calls of RECLAIM_LIMIT holds each, a release, a pass: 100 000 holds.
_RECLAIM_CALLS = 1000


async def _reclaim(domain: Reservations, release_id: str) -> None:
    """Give back the places of the release's expired holds, all of them (to a bound), a
    short call at a time. The hold and listing calls reclaim some too, but only 100 each:
    after a flood of holds expiring together, places stayed taken for as many seconds as
    hundreds of them, and a person asking for one was told the slot was full."""
    now_ms = domain.now_ms()
    for _ in range(_RECLAIM_CALLS):
        if await domain.inventory.reclaim(release_id, now_ms) < RECLAIM_LIMIT:
            return


async def sweep_once(
    domain: Reservations, *, reconcile: bool, lottery: Lottery | None = None, purge: bool = False
) -> SweepReport:
    """``sweep``, raising the pass's first failure, if any, once it is over."""
    report = await sweep(domain, reconcile=reconcile, lottery=lottery, purge=purge)
    if report.failure is not None:
        raise report.failure
    return report


async def sweep(
    domain: Reservations,
    *,
    reconcile: bool,
    lottery: Lottery | None = None,
    purge: bool = False,
    start_after: str | None = None,
) -> SweepReport:
    """One pass over the active releases, the due draws when ``lottery`` is given, and the
    purge of personal data past its retention when ``purge`` is (and a retention is set).
    The releases are gone through in id order, from the one after ``start_after``.
    Visits none if another worker holds the lock (a draw runs once whoever runs it).

    A step that fails does not hold back the others: the draws and the purge need only
    PostgreSQL, and one release that cannot be swept (a bug, its data) must not keep the
    others' confirms unsettled. The report says what was done, and the first failure.
    Nothing is done while PostgreSQL's schema is behind this engine's (``guichet migrate``
    to come): every step would fail on what it does not find."""
    if (behind := domain.store.schema.behind) is not None:
        return SweepReport(failure=behind, swept=False)
    lock_ms = int(max(domain.settings.sweep_interval_s * 5, 5) * 1000)
    try:
        lock = await domain.inventory.try_lock(SWEEPER_LOCK, lock_ms)
    except StoreUnavailable as exc:
        # The lock is in Redis, and Redis is down: the releases wait for it. But the draws
        # need only PostgreSQL, and each runs once whoever runs it (its release row's lock):
        # every worker tries them, so that a draw runs at its time through an outage.
        draws = 0
        if lottery is not None:
            with contextlib.suppress(StoreUnavailable):
                draws = len(await lottery.run_due())
        return SweepReport(draws=draws, failure=exc, swept=False)
    if lock is None:
        return SweepReport(standby=True)
    releases: list[str] = []
    settled = corrections = draws = 0
    failure: Exception | None = None
    swept = False
    purged = None
    stopped_at = None
    try:
        releases = await domain.store.active_release_ids(domain.now())
        first = bisect.bisect_right(releases, start_after) if start_after is not None else 0
        timed_out = False  # the release before this one
        for release_id in releases[first:] + releases[:first]:
            try:
                try:
                    await _reclaim(domain, release_id)
                except InventoryMissing:
                    await domain.recovery.rebuild(release_id)
                settled += await domain.recovery.settle_stale_confirms(release_id)
                if reconcile:
                    corrections += await domain.recovery.reconcile(release_id)
            except StoreUnavailable as exc:
                failure = failure or exc
                if timed_out or not await _stores_answer(domain):
                    # Down for the next releases too, or swamped (two in a row: a Redis a
                    # flood keeps busy still answers a ping): each would wait for its
                    # timeouts, and add to the load. The next pass tries again, from the
                    # release after this one (an audit: two neighbours failing for good
                    # kept every release after them unswept, pass after pass).
                    stopped_at = release_id
                    break
                # This release's alone (a script or a query over its time limit, one shard
                # of a cluster): the releases after it must not wait for it, pass after
                # pass.
                log.warning("sweep_release_failed", release=release_id, detail=exc.detail)
                timed_out = True
            except Exception as exc:
                failure = failure or exc
                log.exception("sweep_release_failed", release=release_id)
            else:
                timed_out = False
        else:
            swept = True
        try:
            draws = len(await lottery.run_due()) if lottery is not None else 0
            if reconcile:
                measured = await fairness.measure(domain.store, domain.now())
                fairness.publish(domain.metrics, measured)
        except Exception as exc:
            failure = failure or exc
        if purge and domain.settings.retention_days:
            purged = await _purge(domain)
    except Exception as exc:  # the releases' list: PostgreSQL
        failure = failure or exc
    finally:
        # The lock lapses by itself: Redis gone meanwhile must not hide the pass's failure.
        with contextlib.suppress(StoreUnavailable):
            await domain.inventory.unlock(SWEEPER_LOCK, lock)
    return SweepReport(
        len(releases),
        settled,
        corrections,
        draws,
        purged,
        failure=failure,
        swept=swept,
        stopped_at=stopped_at,
    )


async def _stores_answer(domain: Reservations) -> bool:
    try:
        await domain.inventory.ping()
        await domain.store.ping()
    except Exception:
        return False
    return True


_PURGE_INTERVAL_S = 3600.0  # personal data is kept for days: an hour late is nothing


async def _purge(domain: Reservations) -> Purged:
    """One bounded purge; a failure is logged, counted (personal data kept past its
    retention, for the alert) and waits for the next hour, like a success (the sweeper's
    other work must not be held up, nor a failing purge retried each pass)."""
    purged = await domain.store.purge(domain.settings.retention_days)
    if purged.bookings or purged.entries:
        log.info("personal_data_purged", bookings=purged.bookings, entries=purged.entries)
    for kind, exc in purged.failures:
        log.exception("purge_failed", exc=exc, kind=kind)
        domain.metrics.purge_failures.labels(kind).inc()
    return dataclasses.replace(purged, more=False) if purged.failures else purged


async def run(lottery: Lottery, stop: asyncio.Event) -> None:
    """Sweep every ``sweep_interval_s`` until ``stop`` is set; reconcile every
    ``reconcile_interval_s``, and purge every hour (at each pass through a backlog). A pass
    that failed moves each of them on only if it did it: the first pass after a Redis outage
    reconciles at once, and a release that keeps failing does not make every pass a full
    one."""
    domain = lottery.domain
    settings = domain.settings
    next_reconcile = next_purge = time.monotonic()
    start_after = None
    while not stop.is_set():
        try:
            due = time.monotonic() >= next_reconcile
            purge = time.monotonic() >= next_purge
            report = await sweep(
                domain, reconcile=due, lottery=lottery, purge=purge, start_after=start_after
            )
            start_after = report.stopped_at
            if report.swept and report.releases and due:
                next_reconcile = time.monotonic() + settings.reconcile_interval_s
            if report.purged is not None:
                # A backlog is worked through at each pass, a bounded part at a time.
                wait = 0.0 if report.purged.more else _PURGE_INTERVAL_S
                next_purge = time.monotonic() + wait
            if isinstance(report.failure, StoreUnavailable):
                domain.metrics.sweeps.labels("skipped").inc()
                log.warning("sweep_skipped", detail=report.failure.detail)
            elif report.failure is not None:
                domain.metrics.sweeps.labels("failed").inc()
                log.exception("sweep_failed", exc=report.failure)
            else:
                domain.metrics.sweeps.labels("standby" if report.standby else "done").inc()
        except Exception:  # a bug in the loop itself
            domain.metrics.sweeps.labels("failed").inc()
            log.exception("sweep_failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.sweep_interval_s)
