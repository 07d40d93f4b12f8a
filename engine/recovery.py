"""Recovery: converge Redis toward PostgreSQL after crashes and losses.

    with_inventory           run an inventory operation; if Redis lost the release, rebuild
                             it from PostgreSQL (under a short lock) and retry once
    settle_stale_confirms    settle confirms that never reported back, from PostgreSQL
    reconcile                correct counts and capacities, and count each correction

Every step is idempotent, so workers and the sweeper may run them concurrently.
docs/consistency.md explains each crash window these close.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from engine.errors import Overloaded
from engine.inventory import Inventory, InventoryMissing
from engine.keys import ReleaseKeys
from engine.logs import log
from engine.metrics import Metrics
from engine.settings import Settings
from engine.store import Store

T = TypeVar("T")
Clock = Callable[[], float]

_REBUILD_LOCK_MS = 5000
_REBUILD_WAIT_S = 0.05
_REBUILD_WAITS = 40


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
            raise Overloaded(
                self.settings.retry_after_s, "The inventory is being rebuilt"
            ) from None

    async def rebuild(self, release_id: str) -> None:
        """Rebuild a release's inventory from PostgreSQL, or wait for the worker doing it."""
        lock = ReleaseKeys.of(release_id).rebuild_lock
        token = await self.inventory.try_lock(lock, _REBUILD_LOCK_MS)
        if token is None:
            # Another worker is rebuilding: wait (bounded) until the inventory is back.
            for _ in range(_REBUILD_WAITS):
                await asyncio.sleep(_REBUILD_WAIT_S)
                if await self.inventory.exists(release_id):
                    return
            return
        try:

            async def rebuild_from(
                capacities: list[tuple[str, int]], bookings: list[tuple[str, str]]
            ) -> int | None:
                if await self.inventory.rebuild(release_id, capacities, bookings):
                    return len(bookings)
                return None

            bookings = await self.store.with_snapshot(release_id, rebuild_from)
            if bookings is not None:
                self.metrics.rebuilds.inc()
                log.warning("inventory_rebuilt", release=release_id, bookings=bookings)
        finally:
            await self.inventory.unlock(lock, token)

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
        A booking PostgreSQL has and Redis lacks is counted; if its confirm is still in
        flight, the place is counted twice for a moment: a place shown taken, never one
        shown free that is not.
        """

        async def correct(capacities: list[tuple[str, int]], active: list[tuple[str, str]]) -> int:
            active_refs = {ref for ref, _ in active}
            add = [(ref, slot) for ref, slot in active if ref not in counted]
            remove = sorted(counted - active_refs)
            return await self.inventory.reconcile(release_id, capacities, add, remove)

        try:
            counted = await self.inventory.booked_refs(release_id)
            corrections = await self.store.with_snapshot(release_id, correct)
        except InventoryMissing:
            await self.rebuild(release_id)
            return 0
        if corrections and correction:
            self.metrics.reconcile_corrections.inc(corrections)
            log.warning("inventory_reconciled", release=release_id, corrections=corrections)
        return corrections
