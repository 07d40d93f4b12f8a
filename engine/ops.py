"""Operations endpoints: liveness, readiness, metrics, the OpenAPI document."""

from __future__ import annotations

import asyncio

from aiohttp import web

from engine.appkeys import METRICS, OPENAPI, RESERVATIONS
from engine.errors import SchemaBehind, StoreUnavailable
from engine.web import cached_json_response, json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    domain = request.app[RESERVATIONS]
    checks = await asyncio.gather(
        domain.store.ping(), domain.inventory.ping(), return_exceptions=True
    )
    status = {
        name: _state(result) for name, result in zip(("postgresql", "redis"), checks, strict=True)
    }
    for result in checks:
        if isinstance(result, BaseException) and not isinstance(result, StoreUnavailable):
            raise result
    if any(result is not None for result in checks):
        detail = "Not ready: " + ", ".join(f"{n} {v}" for n, v in status.items() if v != "ok")
        detail += "".join(f" ({r.detail})" for r in checks if isinstance(r, SchemaBehind))
        error = StoreUnavailable(domain.settings.retry_after_s, detail)
        error.extra.update(status)
        raise error
    return json_response({"status": "ready", **status})


def _state(result: BaseException | None) -> str:
    if result is None:
        return "ok"
    return "schema-behind" if isinstance(result, SchemaBehind) else "unavailable"


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})


async def openapi(request: web.Request) -> web.Response:
    return cached_json_response(request, request.app[OPENAPI])
