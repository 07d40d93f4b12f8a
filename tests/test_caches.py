"""The in-process caches refill in a single flight: when an entry expires under load, one
request reads the stores and the others in flight wait for it (BENCHMARKS.md measured the
stampedes this prevents). The stores are real; the test counts the calls that reach them."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from engine import logs
from engine.app import create_app
from engine.appkeys import BODIES, RESERVATIONS
from engine.singleflight import SingleFlight
from engine.web import accepts_gzip, body_of
from tests.api import Api
from tests.conftest import FakeClock, make_settings


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


async def test_a_shared_read_is_no_one_callers_work() -> None:
    """A read started by a staff agent's request serves everyone: its log lines must not
    name that agent, nor that request."""
    flight: SingleFlight[tuple[str, str | None]] = SingleFlight()

    async def read() -> tuple[str, str | None]:
        await asyncio.sleep(0)
        return logs.request_id.get(), logs.agent.get()

    async def staff_request() -> tuple[str, str | None]:
        logs.request_id.set("r-staff")
        logs.agent.set("camille")
        return await flight.run("release", read)

    assert await asyncio.gather(staff_request(), flight.run("release", read)) == [
        ("-", None),
        ("-", None),
    ]
    assert logs.agent.get() is None


async def test_a_release_another_worker_published_is_found_at_once(
    api: Api, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker knows the release ids it read (``release_cache_s``): an id it does not know
    reads them again, at most every quarter of a second, so a release another worker just
    published is not 404 for seconds, and random ids cost one query per quarter second."""
    await api.site()
    app = create_app(make_settings(), clock=clock, sweep=False)
    async with TestClient(TestServer(app)) as other_client:
        other = Api(other_client, clock)
        assert (await other.call("GET", "/v1/releases/r000000000000/slots")).status == 404
        release = await api.publish([2])  # by this worker; the other read the ids just now
        path = f"/v1/releases/{release['id']}/slots"
        assert (await other.call("GET", path)).status == 404  # the list read this instant
        clock.advance(0.3)
        assert (await other.call("GET", path)).status == 200
        reads = count_calls(monkeypatch, other_client.app[RESERVATIONS].store, "release_ids")
        for n in range(20):
            r = await other.call("GET", f"/v1/releases/r{n:012d}/slots")
            assert r.status == 404
        assert reads == [0]  # the same instant: no read again


async def test_release_filters_of_made_up_values_cost_no_query_and_keep_no_body(
    api: Api, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone can list releases by site and procedure: each made-up value was a new cache
    entry and a PostgreSQL query, and 10 000 of them emptied every cached listing. The
    releases are read once per listing_cache_s and filtered in the worker; an empty
    filtered listing is answered without being kept."""
    await api.site()
    await api.publish([2])
    domain = client.app[RESERVATIONS]
    reads = count_calls(monkeypatch, domain.store, "releases")
    everything = await api.call("GET", "/v1/releases")
    [listed] = everything.body["releases"]
    mine = await api.call("GET", "/v1/releases?site=bobigny&procedure=renouvellement")
    assert mine.body["releases"] == [listed]
    for n in range(50):
        made_up = await api.call("GET", f"/v1/releases?site=s{n}&procedure=renouvellement")
        assert (made_up.status, made_up.body) == (200, {"releases": []})
    assert reads == [1]
    assert set(client.app[BODIES]) == {
        ("releases", None, None),
        ("releases", "bobigny", "renouvellement"),
    }


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


async def test_listings_are_gzipped_for_clients_that_accept_it(
    api: Api, client: TestClient
) -> None:
    """Compressed once per refill, sent to whoever asks: 120 slots are 14 kB as JSON."""
    await api.site()
    release = await api.publish([2] * 120)
    url = client.make_url(f"/v1/releases/{release['id']}/slots")
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(url, headers={"Accept-Encoding": "gzip, deflate, br"}) as r:
            assert r.status == 200, await r.text()
            assert (r.headers["Content-Encoding"], r.headers["Vary"]) == ("gzip", "Accept-Encoding")
            assert r.headers["Content-Type"] == "application/json; charset=utf-8"
            zipped = await r.read()
        async with raw.get(url, headers={"Accept-Encoding": "identity"}) as r:
            assert "Content-Encoding" not in r.headers
            assert r.headers["Vary"] == "Accept-Encoding"
            plain = await r.read()
    assert gzip.decompress(zipped) == plain
    assert len(json.loads(plain)["slots"]) == 120
    assert len(zipped) * 5 < len(plain)


@pytest.mark.parametrize(
    ("header", "gzipped"),
    [
        ("gzip, deflate, br", True),
        ("br;q=1.0, gzip;q=0.8, *;q=0.1", True),
        ("GZIP", True),
        ("x-gzip", True),
        ("*", True),
        ("deflate, *;q=0.5", True),
        ("", False),
        ("identity", False),
        ("deflate, br", False),
        ("gzip;q=0", False),
        ("gzip;q=0.0, *", False),  # gzip named with weight 0: refused, whatever * says
        ("*;q=0", False),
        ("gzip;q=oops", False),
        ("gzip, " + "x" * 300, False),  # longer than any browser's: not read, plain JSON
    ],
)
def test_accept_encoding(header: str, gzipped: bool) -> None:
    assert accepts_gzip(header) is gzipped


async def test_bodies_are_compressed_once_large_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not under 1 kB; on the event loop's thread up to 64 kB; a draw record in a thread."""
    threads: list[int] = []
    compress = gzip.compress

    def spied(data: bytes, *args: Any, **kwargs: Any) -> bytes:
        threads.append(threading.get_ident())
        return compress(data, *args, **kwargs)

    monkeypatch.setattr(gzip, "compress", spied)
    assert (await body_of(b'{"slots":[]}')).gzipped is None
    assert threads == []
    listing = json.dumps({"slots": [{"n": i, "free": 3} for i in range(200)]}).encode()
    assert gzip.decompress((await body_of(listing)).gzipped or b"") == listing
    record = json.dumps({"entries": [{"n": i, "status": "lost"} for i in range(5000)]}).encode()
    assert len(record) > 64 * 1024
    assert gzip.decompress((await body_of(record)).gzipped or b"") == record
    assert threads[0] == threading.get_ident() != threads[1]
