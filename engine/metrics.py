"""Prometheus metrics of the engine.

Each app owns a ``Metrics`` with its own registry (no global state). When the engine runs
several worker processes, ``guichet serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before any
worker starts: every worker then writes its values to files there, and ``/metrics`` on any
worker aggregates all of them (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from bisect import bisect_left
from collections.abc import AsyncIterator, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from engine.logs import log

# One worker's /metrics as several's: its own registry added a ``_created`` series for each
# counter and histogram, which the multiprocess mode does not (an audit). Process-wide.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_DIFFICULTY_BUCKETS = tuple(range(0, 33, 2))
FLUSH_EVERY_S = 1.0


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        # Counts of the hot paths, kept here and added to prometheus-client by ``flush``.
        self._counts: dict[tuple[Counter, tuple[str, ...]], int] = {}
        self._observed: dict[tuple[Histogram, tuple[str, ...]], list[float]] = {}
        self._answers: dict[tuple[str, str, int], list[float]] = {}
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
            "Time to answer, by route and status class (2xx, 4xx, 5xx).",
            ["route", "status_class"],
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
            buckets=_DIFFICULTY_BUCKETS,
            registry=r,
        )
        self._bounds = {self.latency: _LATENCY_BUCKETS, self.pow_difficulty: _DIFFICULTY_BUCKETS}
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
        self.sweeps = Counter(
            "guichet_sweeps",
            "Sweeper passes, by outcome: done, standby (another worker held the lock), "
            "skipped (a store did not answer), failed.",
            ["outcome"],
            registry=r,
        )
        self.purge_failures = Counter(
            "guichet_purge_failures",
            "Hourly purges of personal data past its retention that failed, by kind "
            "(bookings, entries): the data is kept until one succeeds.",
            ["kind"],
            registry=r,
        )
        self.background_restarts = Counter(
            "guichet_background_restarts",
            "Background tasks of a worker (sweeper, schema watch) that ended while it was "
            "serving, and were started again: a bug.",
            ["task"],
            registry=r,
        )
        # Series an alert reads exist from the start, at 0: a counter's first increment
        # is otherwise its first sample, which increase() and rate() cannot see.
        for outcome in ("booked", "dropped", "skipped"):
            self.settled_confirms.labels(outcome)
        for outcome in ("done", "standby", "skipped", "failed"):
            self.sweeps.labels(outcome)
        for kind in ("bookings", "entries"):
            self.purge_failures.labels(kind)
        for task in ("sweeper", "schema"):
            self.background_restarts.labels(task)
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
        # A worker whose event loop is stuck answers nothing, but another worker's /metrics
        # still reads its last beat: the GuichetWorkerStuck alert. One series per worker
        # (``pid``) with several, each gone with its worker (``liveall``).
        self.heartbeat = Gauge(
            "guichet_worker_heartbeat_seconds",
            "When the worker last flushed its counts, as a Unix time: every second while "
            "its event loop turns.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.heartbeat.set_to_current_time()
        self.worker_restarts = worker_restarts(r)
        self.draws_overdue = Gauge(
            "guichet_draws_overdue",
            "Draws due for more than a minute and not run, as the last sweep found them.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.entries = Counter("guichet_draw_entries", "Draw entries registered.", registry=r)
        self.draws = Counter("guichet_draws", "Draws run.", registry=r)
        self.draw_failures = Counter(
            "guichet_draw_failures",
            "Draw attempts that failed, by step: the draw, or the freeze of its entry list "
            "when registration closed (retried each sweep).",
            ["step"],
            registry=r,
        )
        for step in ("draw", "freeze"):  # read by alerts: at 0 from the start
            self.draw_failures.labels(step)
        self.draws_raced = Counter(
            "guichet_draws_raced",
            "Draw attempts rolled back for bookings or confirms that raced them, or by "
            "PostgreSQL (a deadlock, a serialisation failure); each runs again next sweep.",
            registry=r,
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
            "guichet_store_unavailable",
            "Requests refused (503) because Redis or PostgreSQL did not answer in time, or "
            "said it cannot serve now (readiness probes included).",
            registry=r,
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

    def expect_routes(self, routes: Iterable[tuple[str, str, bool]]) -> None:
        """Create at 0, for the alerts (above), each (path, method)'s 500 series, and for
        the routes people book through (``True``), the 503 and latency series."""
        for path, method, booking in routes:
            self.requests.labels(path, method, "500")
            if booking:
                self.requests.labels(path, method, "503")
                self.latency.labels(path, "2xx")

    def redis_write(self, commands: int) -> None:
        """One write to Redis carrying ``commands`` commands."""
        self.redis_writes.inc()
        self.redis_commands.inc(commands)

    def count(self, counter: Counter, *labels: str) -> None:
        """Count one event of a hot path: added to ``counter`` at the next ``flush``."""
        key = (counter, labels)
        self._counts[key] = self._counts.get(key, 0) + 1

    def observe(self, histogram: Histogram, value: float, *labels: str) -> None:
        """Observe one value of a hot path: added to ``histogram`` at the next ``flush``."""
        key = (histogram, labels)
        bounds = self._bounds[histogram]
        pending = self._observed.get(key)
        if pending is None:
            # One count per bucket (the last for values past the top bound), then the sum.
            pending = self._observed[key] = [0.0] * (len(bounds) + 2)
        pending[bisect_left(bounds, value)] += 1
        pending[-1] += value

    def rejected(self, name: str, level: str) -> None:
        self.count(self.rejections, name, level)

    def answered(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP answer: every request calls this, so it is one dictionary lookup."""
        key = (route, method, status)
        pending = self._answers.get(key)
        if pending is None:
            # Answers, then latency as in ``observe``.
            pending = self._answers[key] = [0.0] * (len(_LATENCY_BUCKETS) + 3)
        pending[0] += 1
        pending[1 + bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        pending[-1] += seconds

    def flush(self) -> None:
        """Add what the hot paths counted since the last flush to prometheus-client.

        Each of its updates takes a lock, and in multiprocess mode writes a file: counting
        every request that way was 5 % of a listing (BENCHMARKS.md)."""
        self.heartbeat.set_to_current_time()
        counts, self._counts = self._counts, {}
        observed, self._observed = self._observed, {}
        answers, self._answers = self._answers, {}
        for (counter, labels), n in counts.items():
            (counter.labels(*labels) if labels else counter).inc(n)
        for (histogram, labels), pending in observed.items():
            _add(histogram.labels(*labels) if labels else histogram, pending)
        for (route, method, status), pending in answers.items():
            self.requests.labels(route, method, str(status)).inc(pending[0])
            # By class: in a flood, bots' quick refusals would hide how slow the answers
            # that book are (the GuichetSlowBooking alert reads the 2xx and the 5xx).
            _add(self.latency.labels(route, f"{status // 100}xx"), pending[1:])

    async def flushing(self, _app: object) -> AsyncIterator[None]:
        """The app's ``cleanup_ctx`` step: flush every second, and once at the end."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(FLUSH_EVERY_S)
                try:
                    self.flush()
                except Exception:  # a failed flush must not stop the next ones
                    log.exception("metrics_flush_failed")

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.flush()

    def render(self) -> bytes:
        self.flush()  # this worker's counts are exact; another worker's lag up to a second
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


def worker_restarts(registry: CollectorRegistry | None) -> Counter:
    """Workers that died and were replaced: counted by ``guichet serve``'s supervisor, and
    exported at 0 by every worker from its start, for the alert."""
    return Counter(
        "guichet_worker_restarts",
        "Workers that died and were started again by guichet serve.",
        registry=registry,
    )


def _add(child: Histogram, pending: list[float]) -> None:
    """Add observations to a histogram's values: ``pending`` holds a count per bucket, then
    the sum of the values. prometheus-client has no call for it: its ``observe`` adds 1 to
    one bucket value (they are not cumulative) and the value to the sum."""
    for value, added in zip(child._buckets, pending[:-1], strict=True):
        if added:
            value.inc(added)
    child._sum.inc(pending[-1])
