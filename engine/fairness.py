"""Fairness figures: how online bookings spread over client networks.

A bot farm books from a few networks, people from many. The share of the busiest network
is the headline figure (``guichet_bookings_busiest_network_share``); staff read the detail
at ``GET /v1/admin/fairness``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from engine.metrics import Metrics
from engine.store import Store


@dataclass(frozen=True, slots=True)
class Fairness:
    bookings: int
    by_network: list[tuple[str, int]]

    @property
    def busiest_share(self) -> float:
        return self.by_network[0][1] / self.bookings if self.bookings else 0.0

    def render(self, top: int = 10) -> dict[str, object]:
        return {
            "bookings": self.bookings,
            "networks": len(self.by_network),
            "busiest_share": round(self.busiest_share, 4),
            "busiest": [
                {"network": net, "bookings": n, "share": round(n / self.bookings, 4)}
                for net, n in self.by_network[:top]
            ],
        }


async def measure(store: Store, now: datetime, release_id: str | None = None) -> Fairness:
    by_network = await store.bookings_by_network(now, release_id)
    return Fairness(sum(n for _, n in by_network), by_network)


def publish(metrics: Metrics, fairness: Fairness) -> None:
    metrics.bookings_online.set(fairness.bookings)
    metrics.bookings_networks.set(len(fairness.by_network))
    metrics.busiest_network_share.set(fairness.busiest_share)
