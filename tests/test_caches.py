"""The in-process caches refill in a single flight: when an entry expires under load, one
request reads the stores and the others in flight wait for it (BENCHMARKS.md measured the
stampedes this prevents). The stores are real; the test counts the calls that reach them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from engine.appkeys import RESERVATIONS
from tests.api import Api


def count_calls(monkeypatch: pytest.MonkeyPatch, target: Any, name: str) -> list[int]:
    """Wrap the coroutine method ``target.name`` to count its calls: ``[calls]``."""
    calls = [0]
    real = getattr(target, name)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return await real(*args, **kwargs)

    monkeypatch.setattr(target, name, counted)
    return calls


async def test_an_expired_release_is_read_once_for_all_waiting_requests(
    api: Api, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await api.site()
    release = await api.publish([3, 3])
    domain = client.app[RESERVATIONS]
    reads = count_calls(monkeypatch, domain.store, "release")
    api.clock.advance(domain.settings.release_cache_s + 1)
    found = await asyncio.gather(*(domain.release(release["id"]) for _ in range(50)))
    assert {r.id for r in found} == {release["id"]}
    assert reads == [1]


async def test_an_expired_listing_is_rebuilt_once_for_all_waiting_requests(
    api: Api, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await api.site()
    release = await api.publish([3, 3])
    domain = client.app[RESERVATIONS]
    path = f"/v1/releases/{release['id']}/slots"
    assert (await api.call("GET", path)).status == 200
    counts = count_calls(monkeypatch, domain.inventory, "counts")
    api.clock.advance(domain.settings.listing_cache_s + domain.settings.release_cache_s + 1)
    replies = await asyncio.gather(*(api.call("GET", path) for _ in range(30)))
    assert {r.status for r in replies} == {200}
    assert len({str(r.body) for r in replies}) == 1
    assert counts == [1]
