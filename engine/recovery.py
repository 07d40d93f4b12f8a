"""Recovery: converge Redis toward PostgreSQL after crashes and losses.

    with_inventory           run an inventory operation; if Redis lost the release, rebuild
                             it from PostgreSQL (under a short lock) and retry once
    settle_stale_confirms    settle confirms that never reported back, from PostgreSQL
    reconcile                correct counts and capacities, and count each correction
    from_snapshot            write PostgreSQL's capacities to Redis, fenced against a
                             capacity lowered meanwhile (every such write goes through it)

Every step is idempotent, so workers and the sweeper may run them concurrently.
docs/consistency.md explains each crash window these close.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from engine.errors import StoreUnavailable
from engine.inventory import Inventory, InventoryMissing, Reconciled
from engine.keys import ReleaseKeys
from engine.logs import log
from engine.metrics import Metrics
from engine.settings import Settings
from engine.store import Store

T = TypeVar("T")
Clock = Callable[[], float]
Capacities = list[tuple[str, int]]
Bookings = list[tuple[str, str, str]]  # reference, slot, the hold it confirmed (or '')

_REBUILD_LOCK_MS = 5000
_REBUILD_WAIT_S = 0.05
_REBUILD_WAIT_FOR_S = 2.0  # how long a request waits for another worker's rebuild
# A build within this long of a release's first build (PostgreSQL records when) raced it:
# its publish was building it when a poller or the sweeper found it missing (between
# PostgreSQL's commit and Redis's write), and both built it. Far longer than a publish's
# build takes (its timeouts: 5 s and 1 s). A first build is never a loss, however late: a
# release published while Redis did not answer is built once it is back.
_FIRST_BUILD_S = 30.0


class Recovery:
    def __init__(
        self, settings: Settings, store: Store, inventory: Inventory, metrics: Metrics, clock: Clock
    ) -> None:
        self.settings = settings
        self.store = store
        self.inventory = inventory
        self.metrics = metrics
        self.clock = clock

    async def with_inventory(self, release_id: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op``; if the release's inventory is gone from Redis, rebuild it and retry."""
        try:
            return await op()
        except InventoryMissing:
            await self.rebuild(release_id)
        try:
            return await op()
        except InventoryMissing:
            raise StoreUnavailable(
                self.settings.retry_after_s, "The inventory is being rebuilt"
            ) from None

    async def rebuild(self, release_id: str) -> None:
        """Rebuild a release's inventory from PostgreSQL, or wait for the worker doing it."""
        lock = ReleaseKeys.of(release_id).rebuild_lock
        token = await self.inventory.try_lock(lock, _REBUILD_LOCK_MS)
        if token is None:
            # Another worker is rebuilding: wait until the inventory is back, for a bounded
            # time (a count of waits would not be: each check is a Redis call, up to its
            # timeout when Redis is slow).
            deadline = time.monotonic() + _REBUILD_WAIT_FOR_S
            while time.monotonic() < deadline:
                await asyncio.sleep(_REBUILD_WAIT_S)
                if await self.inventory.exists(release_id):
                    return
            return
        try:
            rebuild_from = functools.partial(self.inventory.rebuild, release_id)
            outcome = await self.from_snapshot(release_id, rebuild_from)
            if outcome == "stale":
                # A capacity was lowered while this read: the next call reads again.
                log.warning("inventory_rebuild_stale", release=release_id)
            elif outcome == "rebuilt":
                if await self._first_build(release_id):
                    # Built for the first time, not lost: no alert (GuichetInventoryRebuilt).
                    log.info("inventory_built", release=release_id)
                else:
                    self.metrics.rebuilds.inc()
                    log.warning("inventory_rebuilt", release=release_id)
        finally:
            await self.inventory.unlock(lock, token)

    async def _first_build(self, release_id: str) -> bool:
        """Whether this was the inventory's first build (recorded now), or raced it; when
        PostgreSQL cannot say, not (a rebuild is counted, not hidden)."""
        try:
            return await self.store.built(release_id, _FIRST_BUILD_S)
        except StoreUnavailable:
            return False

    async def from_snapshot(
        self, release_id: str, write: Callable[[str, Capacities, Bookings], Awaitable[T]]
    ) -> T:
        """Run ``write`` (a write of capacities and bookings to Redis) on PostgreSQL's
        snapshot of the release, and the capacity fence read with it.

        The snapshot is read under the shared capacity lock, so no capacity change commits
        while ``write`` runs (``Store.with_snapshot``). But a Redis call this worker gave up on
        (its timeout) may still reach Redis after the lock is gone, and after a capacity was
        lowered: the fence has moved by then, and Redis sets none of this snapshot's
        capacities (docs/consistency.md, section 8). The fence is read under the lock, so
        a lowering that moved it before had committed before the snapshot was read."""

        async def fenced(capacities: Capacities, bookings: Bookings) -> T:
            fence = await self.inventory.fence(release_id)
            return await write(fence, capacities, bookings)

        return await self.store.with_snapshot(release_id, fenced)

    async def settle_stale_confirms(self, release_id: str) -> int:
        """Settle confirms that began more than ``confirm_grace_s`` ago and never reported."""
        cutoff = int(self.clock() * 1000) - int(self.settings.confirm_grace_s * 1000)
        stale = await self.inventory.stale_confirms(release_id, cutoff)
        if not stale:
            return 0
        booked = await self.store.bookings_by_holds(stale)
        for hold_id in stale:
            outcome = await self.inventory.settle_confirm(
                release_id, hold_id, booked.get(hold_id), cutoff
            )
            self.metrics.settled_confirms.labels(outcome).inc()
            log.warning("confirm_settled", hold=hold_id, outcome=outcome)
        return len(stale)

    async def reconcile(self, release_id: str, *, correction: bool = True) -> int:
        """Correct Redis toward PostgreSQL; return the number of corrections.

        Redis is read before PostgreSQL: a booking Redis counts was committed before that
        read, so if PostgreSQL no longer has it active it was cancelled and may be uncounted.
        A booking PostgreSQL has and Redis lacks is counted, unless its hold is still
        confirming: that confirm is at work (a rush makes its worker late to report), and
        counts it, or the settle does, past the grace; the hold counts the place meanwhile.
        Counted here too, the place would be counted twice, and each confirm at work
        counted as a correction, for the alert.
        """

        async def correct(fence: str, capacities: Capacities, active: Bookings) -> Reconciled:
            active_refs = {ref for ref, _, _ in active}
            add = [(ref, slot, hold) for ref, slot, hold in active if ref not in counted]
            remove = sorted(counted - active_refs)
            return await self.inventory.reconcile(release_id, fence, capacities, add, remove)

        try:
            counted = await self.inventory.booked_refs(release_id)
            done = await self.from_snapshot(release_id, correct)
        except InventoryMissing:
            await self.rebuild(release_id)
            return 0
        if done.stale:
            log.warning("capacities_stale", release=release_id)
        corrections = done.corrections
        if corrections and correction:
            self.metrics.reconcile_corrections.inc(corrections)
            log.warning("inventory_reconciled", release=release_id, corrections=corrections)
        return corrections
