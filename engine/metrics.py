"""Prometheus metrics of the engine.

Each app owns a ``Metrics`` with its own registry (no global state). When the engine runs
several worker processes, ``guichet serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before any
worker starts: every worker then writes its values to files there, and ``/metrics`` on any
worker aggregates all of them (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self._answered: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._rejected: dict[tuple[str, str], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "guichet_http_requests",
            "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "guichet_http_request_duration_seconds",
            "Time to answer, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.holds = Counter(
            "guichet_holds",
            "Hold attempts that reached the capacity decision, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.confirms = Counter(
            "guichet_confirms", "Confirm attempts, by outcome.", ["outcome"], registry=r
        )
        self.cancellations = Counter(
            "guichet_cancellations", "Bookings cancelled, by channel.", ["actor"], registry=r
        )
        self.rejections = Counter(
            "guichet_rejections",
            "Requests refused, by problem name and, for limits, by level.",
            ["reason", "level"],
            registry=r,
        )
        self.pow_difficulty = Histogram(
            "guichet_pow_difficulty_bits",
            "Difficulty of the challenges issued (bits per puzzle).",
            buckets=tuple(range(0, 33, 2)),
            registry=r,
        )
        self.rebuilds = Counter(
            "guichet_inventory_rebuilds", "Release inventories rebuilt from PostgreSQL.", registry=r
        )
        self.reconcile_corrections = Counter(
            "guichet_reconcile_corrections",
            "Corrections the reconcile made to Redis (0 in steady state).",
            registry=r,
        )
        self.settled_confirms = Counter(
            "guichet_settled_confirms",
            "Confirms that never reported back, settled by the sweeper, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.bookings_online = Gauge(
            "guichet_bookings_online",
            "Confirmed online bookings of appointments still to come.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.bookings_networks = Gauge(
            "guichet_bookings_networks",
            "Client networks (IPv4 /24, IPv6 /64) holding those bookings.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.busiest_network_share = Gauge(
            "guichet_bookings_busiest_network_share",
            "Share of those bookings held by the busiest network (0 to 1).",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.entries = Counter("guichet_draw_entries", "Draw entries registered.", registry=r)
        self.draws = Counter("guichet_draws", "Draws run.", registry=r)
        self.draw_failures = Counter(
            "guichet_draw_failures", "Draw attempts that failed (retried each sweep).", registry=r
        )
        self.places_allocated = Counter(
            "guichet_draw_places_allocated", "Places given to winners by draws.", registry=r
        )
        self.places_carried = Counter(
            "guichet_draw_places_carried",
            "Places allocated by a draw that came from an earlier draw of the procedure "
            "(cancelled or left over).",
            registry=r,
        )
        self.store_errors = Counter(
            "guichet_store_unavailable", "Calls to a store that did not answer in time.", registry=r
        )
        self.redis_writes = Counter(
            "guichet_redis_writes",
            "Writes to Redis: each carries every call queued in one event-loop turn.",
            registry=r,
        )
        self.redis_commands = Counter(
            "guichet_redis_commands",
            "Redis commands sent (divided by guichet_redis_writes: the pipelining factor).",
            registry=r,
        )

    def redis_write(self, commands: int) -> None:
        """One write to Redis carrying ``commands`` commands."""
        self.redis_writes.inc()
        self.redis_commands.inc(commands)

    def rejected(self, name: str, level: str) -> None:
        """Count one refusal (children kept, as in ``answered``)."""
        child = self._rejected.get((name, level))
        if child is None:
            child = self._rejected[(name, level)] = self.rejections.labels(name, level)
        child.inc()

    def answered(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP answer. The labelled children are kept: ``labels()`` costs more
        than the increment, and it ran on every request (BENCHMARKS.md)."""
        key = (route, method, status)
        children = self._answered.get(key)
        if children is None:
            children = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route),
            )
            self._answered[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
