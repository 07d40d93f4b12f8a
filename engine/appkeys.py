"""Typed keys of the shared state of an app (aiohttp's "No Singletons Please")."""

from __future__ import annotations

from aiohttp import web

from engine.lottery import Lottery
from engine.metrics import Metrics
from engine.recovery import Clock
from engine.reservations import Reservations
from engine.settings import Settings
from engine.singleflight import SingleFlight
from engine.web import Body

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
RESERVATIONS = web.AppKey("reservations", Reservations)
LOTTERY = web.AppKey("lottery", Lottery)
OPENAPI = web.AppKey("openapi", Body)
# Rendered listing bodies: key -> (expires at, by the engine's clock; the body).
BODIES: web.AppKey[dict[tuple[str | None, ...], tuple[float, Body]]] = web.AppKey("bodies")
# Draw records as served, the last read up to a size: a record never changes once written.
DRAW_RECORDS: web.AppKey[dict[str, Body]] = web.AppKey("draw_records")
# Listing refills (and draw record reads) under way, so that concurrent misses share one.
REFILLS: web.AppKey[SingleFlight[tuple[float, Body]]] = web.AppKey("refills")
