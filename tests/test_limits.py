"""Abuse resistance: every limit trips at its level, answers with a correct Retry-After, and
lets the client through again once refilled (time is injected, nobody sleeps)."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import inventory as inventory_module
from engine.app import create_app
from engine.appkeys import RESERVATIONS
from engine.errors import RateLimited
from engine.identity import normalise_email
from engine.limits import Expiring, FoundSpent, Limiter
from engine.settings import Rate
from engine.web import client_address
from tests.api import ADMIN, Api, Reply, applicant, other_than
from tests.conftest import DATABASE_URL, REDIS_URL, FakeClock, make_settings
from tests.test_caches import count_calls


@asynccontextmanager
async def engine(**overrides: Any) -> AsyncIterator[Api]:
    """An app whose buckets start empty of history: each engine has its own clock."""
    r = aioredis.Redis.from_url(REDIS_URL)
    await r.flushdb()
    await r.aclose()
    clock = FakeClock()
    app = create_app(make_settings(**overrides), clock=clock, bucket_clock=clock, sweep=False)
    async with TestClient(TestServer(app)) as client:
        api = Api(client, clock)
        await api.site()
        yield api


@asynccontextmanager
async def held(statement: str, *args: object) -> AsyncIterator[None]:
    """A PostgreSQL lock (``statement``) held by another session until the block ends:
    the engine's statements that need it wait, and run out of time."""
    blocker = await asyncpg.connect(DATABASE_URL)
    try:
        async with blocker.transaction():
            await blocker.execute(statement, *args)
            yield
    finally:
        await blocker.close()


async def challenge(api: Api, release: str, ip: str, session: str | None = None) -> Reply:
    headers = {"X-Forwarded-For": ip}
    if session:
        headers["Guichet-Session"] = session
    return await api.call("POST", "/v1/challenges", {"release": release}, headers)


def limited(reply: Reply, level: str, retry_after: int, status: int = 429) -> None:
    assert reply.status == status, reply.body
    assert reply.body["level"] == level
    assert int(reply.headers["Retry-After"]) == reply.body["retry_after"] == retry_after


async def trips(
    api: Api,
    attempt: Callable[[], Any],
    allowed: int,
    level: str,
    retry_after: int,
    status: int = 429,
) -> None:
    """``allowed`` attempts pass, the next is refused; once refilled, one passes again."""
    for _ in range(allowed):
        r = await attempt()
        assert r.status == 201, r.body
    limited(await attempt(), level, retry_after, status)
    limited(await attempt(), level, retry_after, status)  # the in-process refusal says the same
    api.clock.advance(retry_after)
    assert (await attempt()).status == 201


async def test_address_bucket(clean: None) -> None:
    async with engine(limit_address=Rate(3, 30)) as api:
        release = (await api.publish([1]))["id"]
        await trips(api, lambda: challenge(api, release, "10.0.0.1"), 3, "address", 10)
        assert (await challenge(api, release, "10.0.0.2")).status == 201


async def test_network_bucket_ipv4_24(clean: None) -> None:
    async with engine(limit_net=Rate(4, 8)) as api:
        release = (await api.publish([1]))["id"]
        addresses = iter(f"10.0.7.{i}" for i in range(1, 100))
        await trips(api, lambda: challenge(api, release, next(addresses)), 4, "net", 2)
        assert (await challenge(api, release, "10.0.8.1")).status == 201


async def test_network_buckets_ipv6_64_and_48(clean: None) -> None:
    async with engine(limit_net=Rate(100, 1), limit_net48=Rate(3, 3)) as api:
        release = (await api.publish([1]))["id"]
        # A different /64 each time, all in one /48.
        addresses = iter(f"2001:db8:5:{i:x}::1" for i in range(1, 100))
        await trips(api, lambda: challenge(api, release, next(addresses)), 3, "net48", 1)
        assert (await challenge(api, release, "2001:db8:6::1")).status == 201
    async with engine(limit_net=Rate(2, 2)) as api:
        release = (await api.publish([1]))["id"]
        addresses = iter(f"2001:db8:9:1::{i:x}" for i in range(1, 100))  # one /64
        await trips(api, lambda: challenge(api, release, next(addresses)), 2, "net", 1)


async def test_session_bucket(clean: None) -> None:
    async with engine(limit_session=Rate(2, 20)) as api:
        release = (await api.publish([1]))["id"]
        first = await challenge(api, release, "10.0.0.1")
        session = first.body["session"]
        assert (await challenge(api, release, "10.0.0.1", session)).body["session"] == session
        limited(await challenge(api, release, "10.0.0.1", session), "session", 10)
        # Without the session (or with a forged one), a new session is issued.
        fresh = await challenge(api, release, "10.0.0.1", session[:-2] + "xx")
        assert fresh.status == 201 and fresh.body["session"] != session
        api.clock.advance(10)
        assert (await challenge(api, release, "10.0.0.1", session)).status == 201


async def test_identity_bucket_on_confirm(clean: None) -> None:
    async with engine(limit_identity=Rate(2, 7200)) as api:
        release = await api.publish([1, 1, 1, 1])
        person = applicant()
        holds = [
            (await api.hold(s["id"], f"10.0.1.{i}")).body for i, s in enumerate(release["slots"])
        ]
        assert (await api.confirm(holds[0], person, "10.0.1.0")).status == 201
        again = await api.confirm(holds[1], person, "10.0.1.1")
        assert again.body["type"] == "/problems/identity-already-booked"
        limited(await api.confirm(holds[2], person, "10.0.1.2"), "identity", 3600)
        # Another person is not concerned; the refused hold is still there to confirm.
        assert (await api.confirm(holds[2], applicant(), "10.0.1.2")).status == 201


async def test_replayed_confirms_are_limited(clean: None) -> None:
    """A confirm of a hold Redis no longer has is a PostgreSQL lookup, and any hold id once
    issued can be replayed: it takes the hold's tokens, and the address's as a challenge
    does, but not the global confirm bucket, which replays must not drain, nor the
    identity's, which a replay in a person's name would drain for them."""
    async with engine(limit_identity=Rate(2, 7200), limit_hold=Rate(3, 10800)) as api:
        release = await api.publish([1])
        person = applicant()
        hold = (await api.hold(release["slots"][0]["id"], "10.0.1.1")).body
        booked = await api.confirm(hold, person, "10.0.1.1")
        replays = [await api.confirm(hold, person, "10.0.1.1") for _ in range(2)]
        assert [r.status for r in (booked, *replays)] == [201, 201, 201]
        assert replays[-1].body["booking"] == booked.body["booking"]
        limited(await api.confirm(hold, person, "10.0.1.1"), "hold", 3600)
    async with engine(limit_address=Rate(3, 30)) as api:  # a challenge took one
        release = await api.publish([1])
        hold = (await api.hold(release["slots"][0]["id"], "10.0.2.1")).body
        assert (await api.confirm(hold, applicant(), "10.0.2.1")).status == 201
        for _ in range(2):
            assert (await api.confirm(hold, applicant(), "10.0.2.1")).status == 201
        limited(await api.confirm(hold, applicant(), "10.0.2.1"), "address", 10)
    async with engine(limit_global_confirm=Rate(1, 5)) as api:
        release = await api.publish([1])
        hold = (await api.hold(release["slots"][0]["id"], "10.0.3.1")).body
        person = applicant()
        assert (await api.confirm(hold, person, "10.0.3.1")).status == 201
        assert (await api.confirm(hold, person, "10.0.3.1")).status == 201


async def test_replays_in_a_persons_name_do_not_lock_them_out(clean: None) -> None:
    """A replay (an entry with an expired challenge, a confirm of a hold already booked)
    names whoever the replayer likes, and nothing checks it before the lookup. It took
    that person's identity tokens: someone who knew a document number could, from one
    address and with one old challenge, keep its owner refused (429) at the confirm of
    the place they held, and out of every draw."""
    async with engine(limit_identity=Rate(2, 7200)) as api:
        fcfs = await api.publish([1, 1])
        draw = (await api.publish_draw([1]))["id"]
        victim = applicant()
        named = applicant(id_number=victim["id_number"])
        paid = await api.solved(draw, "10.9.9.9")
        own = (await api.hold(fcfs["slots"][0]["id"], "10.9.9.9")).body
        assert (await api.confirm(own, applicant(), "10.9.9.9")).status == 201
        api.clock.advance(301)  # the challenge expired
        headers = {"X-Forwarded-For": "10.9.9.9"}
        for _ in range(3):
            entry = {**paid, "applicant": named}
            late = await api.call("POST", f"/v1/releases/{draw}/entries", entry, headers)
            assert late.body["type"] == "/problems/challenge-expired", late.body
            assert (await api.confirm(own, named, "10.9.9.9")).status == 201  # its booking
        hold = (await api.hold(fcfs["slots"][1]["id"], "10.0.0.1")).body
        assert (await api.confirm(hold, victim, "10.0.0.1")).status == 201
    # A spent challenge that has not expired, sent again in the person's name to a worker
    # that has not yet seen it spent; a hold expired but not yet reclaimed, confirmed in
    # their name: each found to be a replay once the person's token was taken.
    async with engine(limit_identity=Rate(1, 7200)) as api:
        draw = (await api.publish_draw([1]))["id"]
        victim = applicant()
        named = applicant(id_number=victim["id_number"])
        path, headers = f"/v1/releases/{draw}/entries", {"X-Forwarded-For": "10.9.9.9"}
        paid = await api.solved(draw, "10.9.9.9")
        first = await api.call("POST", path, {**paid, "applicant": applicant()}, headers)
        assert first.status == 201, first.body
        spent = await api.call("POST", path, {**paid, "applicant": named}, headers)
        assert spent.body["type"] == "/problems/challenge-expired", spent.body
        fcfs = await api.publish([1, 1])
        own = (await api.hold(fcfs["slots"][0]["id"], "10.9.9.9")).body
        api.clock.advance(601)  # the hold expired; nothing reclaimed it yet
        late = await api.confirm(own, named, "10.9.9.9")
        assert late.body["type"] == "/problems/hold-expired", late.body
        assert (await api.enter(draw, victim, "10.0.0.1")).status == 201


async def test_confirms_refused_for_an_email_do_not_lock_a_person_out(clean: None) -> None:
    """A confirm refused for its email address (at its cap of active bookings) hands its
    hold back, for the next attempt. It took the person's identity token: with one hold
    and an email at its cap, someone who knew a document number kept its owner refused
    (429 identity) at the confirm of the place they held (an audit did). The email's
    refusal is not the person's: their token goes back."""
    async with engine(limit_identity=Rate(2, 7200), max_active_per_email=1) as api:
        release = await api.publish([1, 1, 1])
        slots = [s["id"] for s in release["slots"]]
        full = "farm@example.org"
        await api.book(slots[0], applicant(email=full), "10.9.9.1")
        victim = applicant()
        named = applicant(id_number=victim["id_number"], email=full)
        attackers = (await api.hold(slots[1], "10.9.9.2")).body
        for _ in range(3):
            refused = await api.confirm(attackers, named, "10.9.9.2")
            assert refused.status == 429 and refused.body["level"] == "email", refused.body
        hold = (await api.hold(slots[2], "10.0.0.1")).body
        assert (await api.confirm(hold, victim, "10.0.0.1")).status == 201


async def test_a_confirm_refused_for_its_place_leaves_the_persons_token(clean: None) -> None:
    """PostgreSQL refusing a confirm's place (its slot full there, Redis not yet told)
    is the place's refusal, not the person's: their token goes back, as for an email."""
    async with engine(limit_identity=Rate(1, 7200)) as api:
        release = await api.publish([1, 1])
        slots = [s["id"] for s in release["slots"]]
        person = applicant()
        hold = (await api.hold(slots[0], "10.0.0.1")).body
        pg = await asyncpg.connect(DATABASE_URL)
        try:  # the place gone in PostgreSQL alone, as a capacity lowered there would be
            await pg.execute("UPDATE slots SET capacity = 0 WHERE id = $1", slots[0])
        finally:
            await pg.close()
        full = await api.confirm(hold, person, "10.0.0.1")
        assert full.status == 409 and full.body["type"] == "/problems/slot-full", full.body
        other = (await api.hold(slots[1], "10.0.0.2")).body
        assert (await api.confirm(other, person, "10.0.0.2")).status == 201


async def test_a_replay_refused_by_its_address_leaves_the_holds_token(clean: None) -> None:
    """A replay takes the hold's bucket with the address's and its networks'. One that
    another bucket refused (another client on the hold's trail, a carrier NAT whose
    address others emptied) kept the hold's token all the same, and the owner's own
    retry was then refused (429) for the hold. It gives the token back now."""
    async with engine(limit_hold=Rate(2, 7200), limit_address=Rate(2, 3600)) as api:
        release = await api.publish([1])
        hold = (await api.hold(release["slots"][0]["id"], "10.0.0.1")).body
        person = applicant()
        assert (await api.confirm(hold, person, "10.0.0.1")).status == 201
        for _ in range(2):  # the other address's bucket, emptied without a refusal
            assert (await challenge(api, release["id"], "10.0.9.1")).status == 201
        limited(await api.confirm(hold, person, "10.0.9.1"), "address", 1800)
        again = await api.confirm(hold, person, "10.0.0.1")
        assert again.status == 201, again.body


async def test_a_hold_refused_at_confirm_cannot_be_tried_in_name_after_name(
    clean: None,
) -> None:
    """A hold whose confirm PostgreSQL refuses (the person already booked) is handed back,
    to be confirmed in the right name. A bot would try name after name, each a PostgreSQL
    transaction: the hold's own bucket bounds the attempts."""
    async with engine(limit_hold=Rate(3, 60)) as api:
        release = await api.publish([1, 1])
        booked = applicant()
        await api.book(release["slots"][0]["id"], booked, "10.0.5.1")
        hold = (await api.hold(release["slots"][1]["id"], "10.0.5.2")).body
        for _ in range(3):
            r = await api.confirm(hold, booked, "10.0.5.2")
            assert r.body["type"] == "/problems/identity-already-booked", r.body
        limited(await api.confirm(hold, applicant(), "10.0.5.2"), "hold", 20)


async def test_a_spent_entry_challenge_replayed_is_limited_as_a_replay(clean: None) -> None:
    """Each replay of a spent draw challenge is a PostgreSQL lookup: the address's bucket
    bounds its replays, as a confirm's, the first included (found spent by Redis). They
    take nothing from the global entry bucket, which a replayed challenge would otherwise
    drain for everyone. An entry refused by a bucket leaves its challenge unspent."""
    async with engine(limit_address=Rate(3, 60), limit_global_confirm=Rate(2, 60)) as api:
        release = (await api.publish_draw([1]))["id"]
        path = f"/v1/releases/{release}/entries"
        paid = await api.solved(release, "10.0.6.1")  # one of the address's three
        headers = {"X-Forwarded-For": "10.0.6.1"}
        first = await api.call("POST", path, {**paid, "applicant": applicant()}, headers)
        assert first.status == 201, first.body
        for _ in range(2):
            again = await api.call("POST", path, {**paid, "applicant": applicant()}, headers)
            assert again.body["type"] == "/problems/challenge-expired", again.body
        replay = await api.call("POST", path, {**paid, "applicant": applicant()}, headers)
        limited(replay, "address", 20)
        assert (await api.enter(release, applicant(), "10.0.7.1")).status == 201
    async with engine(limit_identity=Rate(1, 60)) as api:
        first, second = (await api.publish_draw([1]))["id"], (await api.publish_draw([1]))["id"]
        person = applicant()
        assert (await api.enter(first, person, "10.0.8.1")).status == 201
        paid = await api.solved(second, "10.0.8.1")
        path, headers = f"/v1/releases/{second}/entries", {"X-Forwarded-For": "10.0.8.1"}
        limited(
            await api.call("POST", path, {**paid, "applicant": person}, headers), "identity", 60
        )
        api.clock.advance(60)
        assert (await api.call("POST", path, {**paid, "applicant": person}, headers)).status == 201


async def test_a_wrong_hold_token_is_told_without_a_store_or_the_holds_bucket(
    clean: None, redis: aioredis.Redis
) -> None:
    """A hold's id carries a tag of its token: a confirm or a release with another token is
    refused (401) without a Redis command, and without taking a token of the hold's own
    bucket, which its owner's retries need."""
    async with engine(limit_hold=Rate(2, 60)) as api:
        release = await api.publish([1])
        hold = (await api.hold(release["slots"][0]["id"], "10.0.3.1")).body
        person = applicant()
        assert (await api.confirm(hold, person, "10.0.3.1")).status == 201
        forged = {**hold, "hold_token": other_than(hold["hold_token"])}
        before = await commands(redis)
        for _ in range(5):
            r = await api.confirm(forged, applicant(), "10.0.3.2")
            assert (r.status, r.body["type"]) == (401, "/problems/unauthorized"), r.body
            path = f"/v1/holds/{hold['hold_id']}"
            auth = {"Authorization": f"Bearer {forged['hold_token']}"}
            assert (await api.call("DELETE", path, headers=auth)).status == 401
        assert await commands(redis) == before
        again = await api.confirm(hold, person, "10.0.3.1")  # the owner's retry
        assert again.status == 201, again.body


async def test_a_hold_id_made_before_token_tags_is_checked_against_its_hash(
    clean: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hold ids an older engine made ('.h', no tag of their token: a rolling deploy, and the
    bookings made from them) are checked against the token's stored hash, in Redis while
    the hold lives, in PostgreSQL once it is booked."""
    from engine import reservations, tokens

    def untagged(secret: bytes, purpose: str, prefix: str, length: int, token: str) -> str:
        return tokens.signed_id(secret, purpose, prefix.replace(".k", ".h"), 15)

    async with engine() as api:
        release = await api.publish([1])
        with monkeypatch.context() as patched:
            patched.setattr(reservations, "signed_id", untagged)
            hold = (await api.hold(release["slots"][0]["id"], "10.0.4.1")).body
        assert ".h" in hold["hold_id"]
        wrong = {**hold, "hold_token": other_than(hold["hold_token"])}
        person = applicant()
        for attempt in range(2):  # while held (Redis), then booked (PostgreSQL)
            r = await api.confirm(wrong, person, "10.0.4.1")
            assert (r.status, r.body["type"]) == (401, "/problems/unauthorized"), (attempt, r.body)
            assert (await api.confirm(hold, person, "10.0.4.1")).status == 201


async def test_one_booked_hold_replayed_from_many_networks_is_limited(clean: None) -> None:
    """A hold id is not bound to an address, so a botnet can replay one booked hold from a
    new network each time, in a new name each time: every other bucket is fresh. The hold's
    own bucket bounds the PostgreSQL lookups it costs."""
    async with engine(limit_hold=Rate(4, 80)) as api:
        release = await api.publish([1, 1])
        hold = (await api.hold(release["slots"][0]["id"], "10.0.4.1")).body
        assert (await api.confirm(hold, applicant(), "10.0.4.1")).status == 201
        networks = iter(f"10.{i}.0.1" for i in range(100, 200))
        for _ in range(3):
            assert (await api.confirm(hold, applicant(), next(networks))).status == 201
        limited(await api.confirm(hold, applicant(), next(networks)), "hold", 20)
        limited(await api.confirm(hold, applicant(), next(networks)), "hold", 20)
        # Another booked hold is not concerned.
        other = (await api.hold(release["slots"][1]["id"], "10.0.4.2")).body
        assert (await api.confirm(other, applicant(), "10.0.4.2")).status == 201
        assert (await api.confirm(other, applicant(), next(networks))).status == 201
        api.clock.advance(20)
        assert (await api.confirm(hold, applicant(), next(networks))).status == 201


async def test_lookups_that_find_nothing_are_limited(
    clean: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone can make up booking references, and each lookup was a PostgreSQL query with
    no bucket. Those that find nothing (or take a wrong token) now take the address's and
    its network's lookup buckets; an address that empties one is refused without any
    store call until it refills. Lookups that find the booking take nothing."""
    async with engine(limit_lookup=Rate(3, 60), limit_lookup_net=Rate(100, 60)) as api:
        release = await api.publish([1])
        done = await api.book(release["slots"][0]["id"], applicant(), "10.0.0.1")
        path = f"/v1/bookings/{done['booking']['reference']}"
        own = {"Authorization": f"Bearer {done['cancel_token']}", "X-Forwarded-For": "10.0.0.9"}
        for _ in range(5):
            assert (await api.call("GET", path, headers=own)).status == 200

        def made_up(address: str = "10.0.0.9") -> Awaitable[Reply]:
            headers = {**own, "X-Forwarded-For": address}
            return api.call("GET", "/v1/bookings/AB-CDEF-GHJK", headers=headers)

        for _ in range(2):
            assert (await made_up()).status == 404
        wrong = {**own, "Authorization": f"Bearer {other_than(done['cancel_token'])}"}
        assert (await api.call("DELETE", path, headers=wrong)).status == 401
        limited(await made_up(), "lookup", 20)
        reads = count_calls(monkeypatch, api.client.app[RESERVATIONS].store, "booking")
        limited(await api.call("GET", path, headers=own), "lookup", 20)
        limited(await api.call("DELETE", path, headers=own), "lookup", 20)
        assert reads == [0]  # refused from memory
        assert (await made_up("10.0.0.10")).status == 404  # another address: its own bucket
        api.clock.advance(20)
        assert (await api.call("GET", path, headers=own)).status == 200


async def test_one_guessing_address_does_not_lock_its_network_out(clean: None) -> None:
    """Behind a carrier's NAT, one client guessing references is held to its own
    address's bucket: its refused lookups take nothing from the network's, and the
    others there still read their bookings."""
    async with engine(limit_lookup=Rate(2, 60), limit_lookup_net=Rate(5, 60)) as api:
        release = await api.publish([1])
        done = await api.book(release["slots"][0]["id"], applicant(), "10.0.0.1")
        guess = {"Authorization": "Bearer guess", "X-Forwarded-For": "10.0.0.66"}
        statuses = [
            (await api.call("GET", "/v1/bookings/AB-CDEF-GHJK", headers=guess)).status
            for _ in range(20)
        ]
        assert statuses[:2] == [404, 404] and set(statuses[2:]) == {429}, statuses
        own = {"Authorization": f"Bearer {done['cancel_token']}", "X-Forwarded-For": "10.0.0.7"}
        path = f"/v1/bookings/{done['booking']['reference']}"
        assert (await api.call("GET", path, headers=own)).status == 200


async def test_entry_lookups_that_find_nothing_are_limited_by_network(clean: None) -> None:
    """The same for draw entries, here by network: addresses of one /24 guessing entry
    ids, or entry tokens, share its bucket."""
    async with engine(limit_lookup=Rate(100, 60), limit_lookup_net=Rate(4, 60)) as api:
        release = (await api.publish_draw([1]))["id"]
        entry = (await api.enter(release, applicant(), "10.0.0.1")).body
        path = f"/v1/releases/{release}/entries/{entry['entry_id']}"
        addresses = iter(f"10.0.7.{i}" for i in range(1, 100))

        def look(method: str, entry_path: str, token: str) -> Awaitable[Reply]:
            headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": next(addresses)}
            return api.call(method, entry_path, headers=headers)

        made_up = f"/v1/releases/{release}/entries/e{'a' * 20}"
        assert (await look("GET", made_up, entry["entry_token"])).status == 404
        assert (await look("DELETE", made_up, entry["entry_token"])).status == 404
        for method in ("GET", "DELETE"):
            assert (await look(method, path, other_than(entry["entry_token"]))).status == 401
        limited(await look("GET", made_up, entry["entry_token"]), "lookup-net", 15)
        limited(await look("GET", path, entry["entry_token"]), "lookup-net", 15)
        ok = await api.call(
            "GET",
            path,
            headers={
                "Authorization": f"Bearer {entry['entry_token']}",
                "X-Forwarded-For": "10.0.8.1",
            },
        )
        assert ok.status == 200, ok.body


async def test_global_buckets_shed_load(clean: None) -> None:
    async with engine(limit_global_challenge=Rate(3, 3)) as api:
        release = (await api.publish([1]))["id"]
        addresses = iter(f"10.{i}.0.1" for i in range(1, 100))
        await trips(
            api, lambda: challenge(api, release, next(addresses)), 3, "global", 1, status=503
        )
    async with engine(limit_global_confirm=Rate(1, 5)) as api:
        release = await api.publish([1, 1])
        h1 = (await api.hold(release["slots"][0]["id"], "10.0.0.1")).body
        h2 = (await api.hold(release["slots"][1]["id"], "10.0.0.2")).body
        assert (await api.confirm(h1, applicant(), "10.0.0.1")).status == 201
        limited(await api.confirm(h2, applicant(), "10.0.0.2"), "global", 5, status=503)
        api.clock.advance(5)
        assert (await api.confirm(h2, applicant(), "10.0.0.2")).status == 201


async def test_a_person_told_to_wait_through_a_flood_keeps_their_tokens(clean: None) -> None:
    """The global confirm bucket sheds a flood with 503 and Retry-After. Each such refusal
    took a token of the person's identity and hold buckets as well, which a flood of
    minutes emptied: the person was then refused 429 for an hour's share of their tokens,
    and their hold given away meanwhile. A refused attempt gives them back now."""
    async with engine(
        limit_global_confirm=Rate(1, 5), limit_identity=Rate(2, 7200), limit_hold=Rate(2, 7200)
    ) as api:
        release = await api.publish([1] * 5)
        slots = [s["id"] for s in release["slots"]]
        mine = (await api.hold(slots[0], "10.0.0.1")).body
        person = applicant()
        for n, slot in enumerate(slots[1:], start=2):
            others = (await api.hold(slot, f"10.0.0.{n}")).body
            assert (await api.confirm(others, applicant(), f"10.0.0.{n}")).status == 201
            limited(await api.confirm(mine, person, "10.0.0.1"), "global", 5, status=503)
            api.clock.advance(5)
        assert (await api.confirm(mine, person, "10.0.0.1")).status == 201


async def test_an_entry_refused_or_failed_keeps_the_persons_tokens(clean: None) -> None:
    """As a confirm's: an entry refused by the global entry bucket (503 through a flood),
    or failed for want of PostgreSQL, gives back the person's token, or their retries
    would soon be refused (429) for most of an hour."""
    async with engine(
        limit_global_confirm=Rate(1, 5), limit_identity=Rate(1, 7200), pg_timeout_s=0.3
    ) as api:
        draw = (await api.publish_draw([1]))["id"]
        assert (await api.enter(draw, applicant(), "10.0.0.2")).status == 201  # the token
        person = applicant()
        paid = await api.solved(draw, "10.0.0.1")
        path, headers = f"/v1/releases/{draw}/entries", {"X-Forwarded-For": "10.0.0.1"}
        entry = {**paid, "applicant": person}
        limited(await api.call("POST", path, entry, headers), "global", 5, status=503)
        async with held("LOCK TABLE entries IN ACCESS EXCLUSIVE MODE"):
            for _ in range(2):
                api.clock.advance(5)  # the global bucket has a token again
                slow = await api.call("POST", path, entry, headers)
                assert (slow.status, slow.body.get("level")) == (503, "store"), slow.body
        api.clock.advance(5)
        registered = await api.call("POST", path, entry, headers)
        assert registered.status == 201, registered.body


async def test_a_confirm_postgresql_could_not_decide_costs_no_token(clean: None) -> None:
    """A confirm whose PostgreSQL transaction ran out of time answers 503 with Retry-After,
    and its hold waits, confirming, for the retry. Each retry took the person's tokens: a
    PostgreSQL slow for a minute left them refused (429) until the sweeper gave their hold
    away. An attempt that fails for want of a store gives its tokens back."""
    async with engine(
        limit_identity=Rate(2, 7200), limit_hold=Rate(2, 7200), pg_timeout_s=0.3
    ) as api:
        release = await api.publish([1])
        slot = release["slots"][0]["id"]
        hold = (await api.hold(slot, "10.0.0.1")).body
        person = applicant()
        async with held("SELECT 1 FROM slots WHERE id = $1 FOR UPDATE", slot):
            for _ in range(4):
                refused = await api.confirm(hold, person, "10.0.0.1")
                assert refused.status == 503, refused.body
                assert refused.body["level"] == "store", refused.body
        assert (await api.confirm(hold, person, "10.0.0.1")).status == 201


async def test_a_booked_confirm_retried_through_a_slow_postgresql_keeps_its_tokens(
    clean: None,
) -> None:
    """A person whose confirm committed but whose answer was lost retries it, and the
    retry is a replay answered from PostgreSQL: the one reply that gives them their
    cancel token. Each retry that PostgreSQL could not answer in time took a token of the
    hold's bucket, and a slow minute left them refused (429). It gives it back now."""
    async with engine(limit_hold=Rate(2, 7200), pg_timeout_s=0.3) as api:
        release = await api.publish([1])
        hold = (await api.hold(release["slots"][0]["id"], "10.0.0.1")).body
        person = applicant()
        booked = await api.confirm(hold, person, "10.0.0.1")
        assert booked.status == 201, booked.body
        async with held("LOCK TABLE bookings IN ACCESS EXCLUSIVE MODE"):
            for _ in range(3):
                slow = await api.confirm(hold, person, "10.0.0.1")
                assert (slow.status, slow.body.get("level")) == (503, "store"), slow.body
        again = await api.confirm(hold, person, "10.0.0.1")
        assert again.status == 201, again.body
        assert again.body["cancel_token"] == booked.body["cancel_token"]


async def test_a_booked_hold_given_back_through_a_slow_postgresql_keeps_its_tokens(
    clean: None,
) -> None:
    """Giving a booked hold back looks its booking up (409 hold-confirmed), with a
    confirm replay's buckets: a lookup PostgreSQL could not answer gives the hold's token
    back, as a confirm's does (a review)."""
    async with engine(limit_hold=Rate(2, 7200), pg_timeout_s=0.3) as api:
        release = await api.publish([1])
        hold = (await api.hold(release["slots"][0]["id"], "10.0.0.1")).body
        assert (await api.confirm(hold, applicant(), "10.0.0.1")).status == 201  # one token
        auth = {"Authorization": f"Bearer {hold['hold_token']}", "X-Forwarded-For": "10.0.0.1"}
        path = f"/v1/holds/{hold['hold_id']}"
        async with held("LOCK TABLE bookings IN ACCESS EXCLUSIVE MODE"):
            for _ in range(3):
                slow = await api.call("DELETE", path, headers=auth)
                assert (slow.status, slow.body.get("level")) == (503, "store"), slow.body
        told = await api.call("DELETE", path, headers=auth)  # the second token
        assert told.body["type"] == "/problems/hold-confirmed", told.body


async def test_no_stockpile_of_unspent_challenges(
    clean: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An address holding its most unspent challenges is refused more. The refusal is
    remembered in-process for a second: an address that keeps asking costs Redis (and its
    network's and the global challenge buckets) once a second, not at each request, and a
    person who spends a challenge waits a second at most for the next."""
    async with engine(max_unspent_challenges=2) as api:
        release = await api.publish([5])
        slot = release["slots"][0]["id"]
        paid = [await api.solved(release["id"], "10.0.0.1") for _ in range(2)]
        r = await challenge(api, release["id"], "10.0.0.1")
        assert r.status == 429 and r.body["level"] == "unspent"
        assert int(r.headers["Retry-After"]) == r.body["retry_after"] <= 300
        inventory = api.client.app[RESERVATIONS].inventory
        calls = count_calls(monkeypatch, inventory, "take_tokens")
        for _ in range(5):
            again = await challenge(api, release["id"], "10.0.0.1")
            assert (again.status, again.body["level"]) == (429, "unspent")
        assert calls == [0]
        assert (await challenge(api, release["id"], "10.0.0.2")).status == 201  # its own
        assert (await api.hold(slot, "10.0.0.1", paid=paid[0])).status == 201
        api.clock.advance(1)
        assert (await challenge(api, release["id"], "10.0.0.1")).status == 201
        api.clock.advance(301)  # the other one expired unspent
        assert (await challenge(api, release["id"], "10.0.0.1")).status == 201


async def test_a_client_is_not_refused_for_its_own_expired_hold_behind_a_backlog(
    clean: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hold call reclaims 100 expired holds first. A person whose own hold expired behind
    more of them (a rush's holds expiring together) was refused as still holding one: 429
    for ten minutes. It is 503 with Retry-After 1, until the backlog is given back."""
    async with engine(max_live_holds=1) as api:
        release = await api.publish([3, 3])
        first, second = (s["id"] for s in release["slots"])
        assert (await api.hold(first, "10.0.0.7")).status == 201
        api.clock.advance(601)
        monkeypatch.setattr(inventory_module, "RECLAIM_LIMIT", 0)
        paid = await api.solved(release["id"], "10.0.0.7")
        waiting = await api.hold(second, "10.0.0.7", paid=paid)
        assert (waiting.status, waiting.body.get("level")) == (503, "reclaiming"), waiting.body
        assert waiting.headers["Retry-After"] == "1"
        monkeypatch.setattr(inventory_module, "RECLAIM_LIMIT", 100)
        assert (await api.hold(second, "10.0.0.7", paid=paid)).status == 201


@pytest.mark.parametrize(
    ("holder", "solver", "again", "elsewhere"),
    [
        ("10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2"),
        # A host picks any address of its /64 at will (and a phone's rotate): per address,
        # the caps of one per address would cap nothing there. An IPv6 client is its /64,
        # as an IPv4 client is its address: the cap holds across the /64, and a challenge
        # paid from one of its addresses is good from another.
        ("2001:db8:1:2::1", "2001:db8:1:2::98", "2001:db8:1:2::99", "2001:db8:1:3::1"),
    ],
)
async def test_one_live_hold_per_client(
    clean: None, holder: str, solver: str, again: str, elsewhere: str
) -> None:
    async with engine(max_live_holds=1) as api:
        release = await api.publish([5, 5])
        first = await api.hold(release["slots"][0]["id"], holder)
        assert first.status == 201
        paid = await api.solved(release["id"], solver)
        second = await api.hold(release["slots"][1]["id"], again, paid=paid)
        assert second.status == 429 and second.body["level"] == "holds"
        # Said of the address, not of the person: ``again`` may be someone else's device.
        assert "from your address" in second.body["detail"], second.body
        assert (await api.hold(release["slots"][1]["id"], elsewhere)).status == 201
        auth = {"Authorization": f"Bearer {first.body['hold_token']}"}
        await api.call("DELETE", f"/v1/holds/{first.body['hold_id']}", headers=auth)
        # The refusal left the challenge unspent.
        assert (await api.hold(release["slots"][1]["id"], again, paid=paid)).status == 201


async def test_a_hold_refused_for_the_live_holds_keeps_its_challenge_counted(clean: None) -> None:
    """A hold refused for the address's live hold leaves its challenge unspent, and still
    counted among the address's unspent ones: each such refusal made room for one more
    challenge, and an address kept hundreds of solved challenges, ready for the opening."""
    async with engine(max_live_holds=1, max_unspent_challenges=2) as api:
        release = await api.publish([5, 5])
        first, second = (s["id"] for s in release["slots"])
        assert (await api.hold(first, "10.0.0.1")).status == 201
        kept = [await api.solved(release["id"], "10.0.0.1") for _ in range(2)]
        refused = await api.hold(second, "10.0.0.1", paid=kept[0])
        assert (refused.status, refused.body["level"]) == (429, "holds")
        more = await challenge(api, release["id"], "10.0.0.1")
        assert (more.status, more.body["level"]) == (429, "unspent"), more.body


async def test_a_hold_replayed_under_its_key_with_another_challenge_spends_it(
    clean: None,
) -> None:
    """A hold sent again under its Idempotency-Key is answered with the hold it made,
    whatever challenge it brings. The round trip took that challenge off the address's
    unspent ones but left it unspent: an address kept as many solved challenges as it
    liked past the cap, to use once its hold was given back. It is spent now."""
    async with engine(max_live_holds=1, max_unspent_challenges=2) as api:
        release = await api.publish([5, 5])
        first, second = (s["id"] for s in release["slots"])
        held = await api.hold(first, "10.0.0.1", key="k")
        assert held.status == 201
        kept = [await api.solved(release["id"], "10.0.0.1") for _ in range(2)]
        for paid in kept:
            again = await api.hold(first, "10.0.0.1", paid=paid, key="k")
            assert (again.status, again.body["hold_id"]) == (201, held.body["hold_id"])
        for _ in range(2):  # the address's unspent ones: none left, then these two
            assert (await challenge(api, release["id"], "10.0.0.1")).status == 201
        token = {"Authorization": f"Bearer {held.body['hold_token']}"}
        path = f"/v1/holds/{held.body['hold_id']}"
        assert (await api.call("DELETE", path, headers=token)).status == 204
        for paid in kept:  # not usable past the cap: two more were issued meanwhile
            reused = await api.hold(second, "10.0.0.1", paid=paid)
            assert reused.body["type"] == "/problems/challenge-expired", reused.body


async def cancel(api: Api, booked: dict[str, Any]) -> None:
    r = await api.call(
        "DELETE",
        f"/v1/bookings/{booked['booking']['reference']}",
        headers={"Authorization": f"Bearer {booked['cancel_token']}"},
    )
    assert r.status == 204


async def test_bookings_and_cancellations_per_identity(clean: None) -> None:
    async with engine(max_bookings_per_identity=2, max_cancellations_per_identity=5) as api:
        release = await api.publish([1, 1, 1])
        person = applicant()
        slots = [s["id"] for s in release["slots"]]
        await cancel(api, await api.book(slots[0], person, "10.0.0.1"))
        await cancel(api, await api.book(slots[1], person, "10.0.0.2"))
        hold = (await api.hold(slots[2], "10.0.0.3")).body
        r = await api.confirm(hold, person, "10.0.0.3")
        assert r.status == 429 and r.body["level"] == "identity"
        assert 29 * 86400 < r.body["retry_after"] <= 30 * 86400 + 1
        assert (await api.confirm(hold, applicant(), "10.0.0.3")).status == 201
    async with engine(max_cancellations_per_identity=1) as api:
        release = await api.publish([1, 1])
        person = applicant()
        await cancel(api, await api.book(release["slots"][0]["id"], person, "10.0.0.1"))
        staff = await api.call(
            "POST",
            "/v1/admin/bookings",
            {"slot_id": release["slots"][1]["id"], "applicant": person},
            ADMIN,
        )
        assert staff.status == 429 and staff.body["level"] == "identity"
        assert (await api.free(release["id"]))[release["slots"][1]["id"]] == 1


async def test_a_person_booked_for_the_procedure_is_told_so_before_any_cap(
    clean: None,
) -> None:
    # A cap's 429 told them to come back in weeks, not that they had a booking already.
    async with engine(max_bookings_per_identity=1, max_active_per_email=1) as api:
        release = await api.publish([1, 1])
        person = applicant()
        await api.book(release["slots"][0]["id"], person, "10.0.0.1")
        hold = (await api.hold(release["slots"][1]["id"], "10.0.0.2")).body
        r = await api.confirm(hold, person, "10.0.0.2")
        assert r.status == 409, r.body
        assert r.body["type"] == "/problems/identity-already-booked"


async def test_active_bookings_per_email(clean: None) -> None:
    async with engine(max_active_per_email=2) as api:
        release = await api.publish([1, 1, 1])
        slots = [s["id"] for s in release["slots"]]
        email = "family@example.org"
        await api.book(slots[0], applicant(email=email), "10.0.0.1")
        await api.book(slots[1], applicant(email=email.upper()), "10.0.0.2")
        hold = (await api.hold(slots[2], "10.0.0.3")).body
        r = await api.confirm(hold, applicant(email=email), "10.0.0.3")
        assert r.status == 429 and r.body["level"] == "email"


async def test_one_inbox_written_many_ways_is_one_email_address(clean: None) -> None:
    """A farm with one inbox passed the cap on active bookings per email address with
    "+tags" (delivered to the same inbox almost everywhere) or, at Gmail, dots."""
    async with engine(max_active_per_email=2) as api:
        release = await api.publish([1] * 6)
        slots = iter(s["id"] for s in release["slots"])
        addresses = iter(f"10.0.0.{i}" for i in range(1, 100))

        async def confirm(email: str) -> Reply:
            hold = (await api.hold(next(slots), next(addresses))).body
            return await api.confirm(hold, applicant(email=email), next(addresses))

        for ways in (
            ("farm+1@example.org", "Farm+2@Example.org", "farm@example.org"),
            ("f.arm@gmail.com", "farm+x@googlemail.com", "FA.R.M@gmail.com"),
        ):
            for email in ways[:2]:
                assert (await confirm(email)).status == 201
            refused = await confirm(ways[2])
            assert refused.status == 429 and refused.body["level"] == "email", refused.body


def test_inboxes_are_told_apart_where_providers_tell_them_apart() -> None:
    same = [
        ("Name+tag@Example.org", "name@example.org"),
        ("first.last+booking@gmail.com", "firstlast@gmail.com"),
        ("first.last@googlemail.com", "firstlast@gmail.com"),
        (" name@example.org ", "name@example.org"),
    ]
    for raw, inbox in same:
        assert normalise_email(raw) == inbox, raw
    # Dots count everywhere but at Gmail; a "+" that begins the address is kept.
    assert normalise_email("first.last@example.org") != normalise_email("firstlast@example.org")
    assert normalise_email("+team@example.org") == "+team@example.org"


async def commands(redis: aioredis.Redis) -> int:
    """Commands Redis has served so far, the INFO calls themselves left out."""
    stats = await redis.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")


async def test_refusals_that_cost_no_redis_command(clean: None, redis: aioredis.Redis) -> None:
    async with engine(limit_address=Rate(1, 60)) as api:
        release = await api.publish([1])
        slot = release["slots"][0]["id"]
        paid = await api.solved(release["id"], "10.0.0.1")
        limited(await challenge(api, release["id"], "10.0.0.1"), "address", 60)
        forged = {"challenge": paid["challenge"][:-3] + "AAA", "nonces": paid["nonces"]}
        before = await commands(redis)
        limited(await challenge(api, release["id"], "10.0.0.1"), "address", 60)
        assert (await api.hold(slot, "10.0.0.1", paid=forged)).status == 403
        assert (await api.hold(slot, "10.0.0.2", paid=forged)).status == 403
        assert await commands(redis) == before
        assert (await api.hold(slot, "10.0.0.2", paid=paid)).status == 403  # not its challenge
        assert await commands(redis) == before


async def test_a_network_flood_does_not_cost_a_person_the_attempt_they_paid_for(
    clean: None,
) -> None:
    """The buckets ration challenges. A person who got one before bots on the same network
    (a carrier's NAT, a shared Wi-Fi) emptied its bucket still holds, confirms and enters
    the draw with it: the bots' flood must not take the place that person paid for."""
    async with engine(limit_net=Rate(3, 60)) as api:
        release = await api.publish([1])
        draw = (await api.publish_draw([1]))["id"]
        hold_paid = await api.solved(release["id"], "10.0.5.1")
        entry_paid = await api.solved(draw, "10.0.5.1")
        assert (await challenge(api, release["id"], "10.0.5.2")).status == 201
        limited(await challenge(api, release["id"], "10.0.5.3"), "net", 20)
        limited(await challenge(api, release["id"], "10.0.5.1"), "net", 20)  # in-process
        slot = release["slots"][0]["id"]
        hold = await api.hold(slot, "10.0.5.1", paid=hold_paid)
        assert hold.status == 201, hold.body
        assert (await api.confirm(hold.body, applicant(), "10.0.5.1")).status == 201
        entry = await api.call(
            "POST",
            f"/v1/releases/{draw}/entries",
            {**entry_paid, "applicant": applicant()},
            {"X-Forwarded-For": "10.0.5.1"},
        )
        assert entry.status == 201, entry.body
        # The network's own next attempt is still refused: its challenge is.
        limited(await challenge(api, release["id"], "10.0.5.4"), "net", 20)


async def test_a_spent_hold_challenge_replayed_stops_costing_redis(
    clean: None, redis: aioredis.Redis
) -> None:
    """A hold's challenge is spent once; its retry gets that hold back. Replayed for another
    slot with a new Idempotency-Key each time, each a new request for Redis, it is told
    "spent" three times, then refused in-process without a Redis command. The hold's own
    retry is not affected, before or after: Redis answers it with its hold, never "spent"."""
    async with engine() as api:
        release = await api.publish([3, 3])
        first, second = (s["id"] for s in release["slots"])
        paid = await api.solved(release["id"], "10.0.9.1")
        held = await api.hold(first, "10.0.9.1", paid=paid, key="k-0")
        assert held.status == 201
        assert (await api.hold(second, "10.0.9.1", paid=paid, key="k-1")).status == 410
        again = await api.hold(first, "10.0.9.1", paid=paid, key="k-0")
        assert (again.status, again.body["hold_id"]) == (201, held.body["hold_id"])
        for n in (2, 3):
            assert (await api.hold(second, "10.0.9.1", paid=paid, key=f"k-{n}")).status == 410
        before = await commands(redis)
        for n in (4, 5):
            assert (await api.hold(second, "10.0.9.1", paid=paid, key=f"k-{n}")).status == 410
        assert await commands(redis) == before
        again = await api.hold(first, "10.0.9.1", paid=paid, key="k-0")
        assert (again.status, again.body["hold_id"]) == (201, held.body["hold_id"])


async def test_forwarded_for_is_believed_only_from_trusted_proxies(clean: None) -> None:
    async with engine(limit_address=Rate(2, 60), trusted_proxies=frozenset()) as api:
        release = (await api.publish([1]))["id"]
        spoofed = [await challenge(api, release, f"10.9.9.{i}") for i in range(3)]
        assert [r.status for r in spoofed] == [201, 201, 429]  # all one client: the peer
    async with engine(limit_address=Rate(2, 60)) as api:  # 127.0.0.0/8 trusted
        release = (await api.publish([1]))["id"]
        spread = [await challenge(api, release, f"10.9.9.{i}") for i in range(3)]
        assert [r.status for r in spread] == [201, 201, 201]


def test_client_address_from_headers() -> None:
    from aiohttp.test_utils import make_mocked_request

    trusted = frozenset({ipaddress.ip_network("192.0.2.0/24")})

    def addr(peer: str, xff: str | None) -> str:
        headers = {"X-Forwarded-For": xff} if xff is not None else {}
        request = make_mocked_request("GET", "/", headers=headers)
        request._transport_peername = (peer, 1234)  # type: ignore[attr-defined]
        return client_address(request.clone(remote=peer), trusted)

    assert addr("198.51.100.7", "10.0.0.1") == "198.51.100.7"  # untrusted peer: ignored
    assert addr("192.0.2.1", "10.0.0.1") == "10.0.0.1"
    assert addr("192.0.2.1", "6.6.6.6, 10.0.0.1, 192.0.2.2") == "10.0.0.1"  # last untrusted hop
    long = ", ".join(f"10.0.{i}.1" for i in range(40)) + ", 10.9.9.9"  # past the cached length
    assert addr("192.0.2.1", long) == "10.9.9.9"
    assert addr("198.51.100.7", long) == "198.51.100.7"
    assert addr("192.0.2.1", "garbage") == "192.0.2.1"
    assert addr("192.0.2.1", None) == "192.0.2.1"
    # IPv4 written as IPv6 (a dual-stack socket, a proxy): read as IPv4, so that its /24's
    # buckets are its own, not one IPv6 /64 every such client would share.
    assert addr("::ffff:192.0.2.1", "::ffff:10.0.0.1") == "10.0.0.1"
    assert addr("::ffff:198.51.100.7", "10.0.0.1") == "198.51.100.7"


async def test_a_flood_from_one_network_leaves_others_at_base_difficulty(clean: None) -> None:
    async with engine(
        limit_net=Rate(40, 40),
        limit_global_challenge=Rate(44, 44),
        pow_difficulty=4,
        pow_max_extra_bits=6,
        pow_global_extra_bits=2,
    ) as api:
        release = await api.publish([3])
        flood = [await challenge(api, release["id"], f"10.66.66.{i}") for i in range(1, 41)]
        bits = [r.body["difficulty"] for r in flood]
        assert bits[0] == 4 and bits == sorted(bits) and bits[-1] == 4 + 6 + 2
        assert (await challenge(api, release["id"], "10.66.66.200")).status == 429
        newcomer = await challenge(api, release["id"], "10.77.0.1")
        assert newcomer.body["difficulty"] == 4  # global pressure only adds to the escalated
        assert (await api.hold(release["slots"][0]["id"], "10.77.0.1")).status == 201


async def test_a_refused_challenge_is_not_counted_as_unspent(clean: None) -> None:
    async with engine(limit_net=Rate(1, 10), max_unspent_challenges=1) as api:
        release = (await api.publish([1]))["id"]
        assert (await challenge(api, release, "10.0.0.1")).status == 201
        limited(await challenge(api, release, "10.0.0.2"), "net", 10)
        api.clock.advance(11)
        assert (await challenge(api, release, "10.0.0.2")).status == 201


# The in-process memories of refusals -------------------------------------------------------

_OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "get", "pop", "wait"]),
        st.integers(0, 9),  # the key
        st.integers(1, 50),  # a lifetime, or a wait
    ),
    max_size=200,
)


@settings(max_examples=300)
@given(_OPS, st.integers(1, 12))
def test_an_expiring_map_forgets_only_what_lapsed_or_made_room(
    ops: list[tuple[str, int, int]], cap: int
) -> None:
    """Against a plain dict of (value, end): never a lapsed or a wrong value, never more
    than ``cap`` entries, the entry just put always kept, and with room for every key,
    exactly the dict."""
    kept: Expiring[int, int] = Expiring(cap)
    model: dict[int, tuple[int, float]] = {}
    now = 0.0
    for n, (op, key, span) in enumerate(ops):
        if op == "put":
            kept.put(key, n, now + span, now)
            model[key] = (n, now + span)
            assert kept.get(key, now) == model[key]
        elif op == "pop":
            kept.pop(key)
            model.pop(key, None)
        elif op == "wait":
            now += span
        live = {k: v for k, v in model.items() if v[1] > now}
        got = {k: v for k in range(10) if (v := kept.get(k, now)) is not None}
        assert got.items() <= live.items()
        assert len(kept) <= cap
        if cap >= 10:
            assert got == live


def test_a_flood_of_refusals_keeps_the_memory_bounded_and_the_latest() -> None:
    """Refusals remembered past the cap, each for minutes (an identity's bucket emptied
    name after name): the memory was swept whole at each refusal past 100 000, and kept
    growing, or was cleared whole and forgot every spent challenge it knew."""
    clock = FakeClock()
    limiter = Limiter(make_settings(), None, None, bucket_clock=clock)  # type: ignore[arg-type]
    limiter._blocked = Expiring(1000)
    for i in range(2500):
        limiter._block(f"key-{i}", 360_000, "identity")
    assert len(limiter._blocked) == 1000
    with pytest.raises(RateLimited):
        limiter._refuse_blocked(["key-2499"])
    limiter._refuse_blocked(["key-0"])  # made room
    spent = FoundSpent()
    spent._found = Expiring(1000)
    for i in range(1001):
        spent.add(i, until_ms=600_000 + i, now_ms=0)
    assert spent.times(1000, now_ms=1) == 1
    assert spent.times(999, now_ms=1) == 1  # not cleared with the rest
