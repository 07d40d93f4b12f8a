"""The engine against a Redis Cluster (``redis+cluster://``): three private primaries on
loopback ports, the slots split between them, and the booking flow of API.md through HTTP;
with a replica for each, a primary's failover.

Every Redis function touches one hash tag (``engine/keys.py``), so each call lands on one
node; the releases of a test are spread over the nodes by their ids."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import MovedError, RedisError

from engine.app import create_app, redis_client
from engine.appkeys import RESERVATIONS
from engine.autopipeline import AutoPipeline
from engine.errors import StoreUnavailable
from engine.inventory import Inventory, Take
from engine.keys import ReleaseKeys
from engine.settings import Settings
from engine.sweeper import sweep_once
from tests.api import Api, applicant, ip
from tests.conftest import FakeClock, make_settings
from tests.procs import RedisServer, free_ports, poll

SLOTS = 16384


def node_client(node: RedisServer) -> aioredis.Redis:
    """A client of one node alone, whose every call is bounded in time."""
    return aioredis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5)


async def form_cluster(
    tmp_path: Path, replicas: int = 0, more: dict[str, str] | None = None
) -> list[RedisServer]:
    """Three primaries, the slots split between them, then ``replicas`` replicas of each:
    the primaries first in the list, then the replicas (each primary's in turn). ``more``:
    other options of every node."""
    count = 3 * (1 + replicas)
    ports = free_ports(2 * count)  # the nodes and their cluster buses
    buses = ports[count:]
    options = {
        "cluster-enabled": "yes",
        # A failover after half a second of silence (15 s by default), whatever the
        # replica's lag: the tests kill a primary and wait for its replica.
        "cluster-node-timeout": "500",
        "cluster-replica-validity-factor": "0",
        **(more or {}),
    }
    nodes = [
        RedisServer(
            tmp_path,
            ports[i],
            options={
                **options,
                "cluster-config-file": f"nodes-{i}.conf",
                # The bus defaults to the port + 10 000, past 65 535 for a high free port.
                "cluster-port": str(buses[i]),
            },
        )
        for i in range(count)
    ]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            await node.wait_ready()
        clients = [node_client(n) for n in nodes]
        try:
            step = SLOTS // 3
            for i, client in enumerate(clients):
                if i < 3:
                    last = SLOTS - 1 if i == 2 else (i + 1) * step - 1
                    await client.execute_command("CLUSTER ADDSLOTSRANGE", i * step, last)
                if i:
                    await client.execute_command(
                        "CLUSTER MEET", "127.0.0.1", nodes[0].port, buses[0]
                    )

            async def met() -> bool:
                for client in clients:
                    info = await client.execute_command("CLUSTER INFO")
                    if int(info["cluster_known_nodes"]) != count:
                        return False
                return True

            def describe() -> str:
                return "\n".join(n.describe() for n in nodes)

            await poll(met, describe, within_s=20)
            for i, client in enumerate(clients[3:]):
                primary = await clients[i % 3].execute_command("CLUSTER MYID")
                await client.execute_command("CLUSTER REPLICATE", primary)

            async def formed() -> bool:
                for client in clients:
                    info = await client.execute_command("CLUSTER INFO")
                    if info["cluster_state"] != "ok":
                        return False
                for client in clients[3:]:
                    if (await client.info("replication"))["master_link_status"] != "up":
                        return False
                return True

            await poll(formed, describe, within_s=20)
        finally:
            for client in clients:
                await client.aclose()
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return nodes


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[RedisServer]]:
    nodes = await form_cluster(tmp_path)
    try:
        yield nodes
    finally:
        for node in nodes:
            node.kill()


async def on_each(nodes: list[RedisServer], *command: str) -> list[Any]:
    """``command``'s reply from each node, asked directly (not through the cluster)."""
    replies = []
    for node in nodes:
        client = node_client(node)
        try:
            replies.append(await client.execute_command(*command))
        finally:
            await client.aclose()
    return replies


@pytest.fixture
def settings(cluster: list[RedisServer]) -> Settings:
    return make_settings(redis_url=f"redis+cluster://127.0.0.1:{cluster[0].port}")


async def test_booking_flow_on_a_cluster(api: Api, cluster: list[RedisServer]) -> None:
    await api.site()
    releases = [await api.publish([2, 1]) for _ in range(6)]
    # Ids are random: publish more until the inventories are on two nodes at least.
    while sum(1 for size in await on_each(cluster, "DBSIZE") if size) < 2:
        assert len(releases) < 40, "every release hashed to one node"
        releases.append(await api.publish([2, 1]))

    for n, release in enumerate(releases):
        first, second = (s["id"] for s in release["slots"])
        assert await api.free(release["id"]) == {first: 2, second: 1}
        hold = await api.hold(second)
        assert hold.status == 201, hold.body
        assert (await api.hold(second)).status == 409  # full: one place, held
        done = await api.confirm(hold.body, applicant(n))
        assert done.status == 201, done.body
        assert await api.free(release["id"]) == {first: 2, second: 0}

        reference = done.body["booking"]["reference"]
        cancel = {"Authorization": f"Bearer {done.body['cancel_token']}"}
        gone = await api.call("DELETE", f"/v1/bookings/{reference}", headers=cancel)
        assert gone.status == 204
        assert await api.free(release["id"]) == {first: 2, second: 1}
    # Each Function call went to its node, found in the client's map of the slots: redis-py
    # asked a node for the keys of every one (COMMAND GETKEYS, twice).
    for stats in await on_each(cluster, "INFO", "commandstats"):
        assert "cmdstat_command|getkeys" not in stats, stats
    assert (
        sum(
            stats.get("cmdstat_fcall", {}).get("calls", 0)
            for stats in await on_each(cluster, "INFO", "commandstats")
        )
        > 6 * 6
    )


async def failed(call: Awaitable[list[Any]]) -> bool:
    """Whether the call failed, as a whole or in its one command's reply."""
    try:
        (reply,) = await call
    except (RedisError, TimeoutError):
        return True
    return isinstance(reply, RedisError)


def on_node(index: int, stem: str) -> str:
    """A key of ``stem`` whose slot is on node ``index`` of ``form_cluster``'s."""
    step = SLOTS // 3
    for n in range(100_000):
        key = f"{stem}:{{{n}}}"
        if min(key_slot(key.encode()) // step, 2) == index:
            return key
    raise AssertionError("no key found")


BUSY = """local t = redis.call('TIME') local start = t[1] * 1e6 + t[2]
repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - start > tonumber(ARGV[1])
return 1"""


@contextlib.asynccontextmanager
async def lenient_cluster(
    tmp_path: Path, url_node: int = 0
) -> AsyncIterator[tuple[list[RedisServer], RedisCluster, AutoPipeline]]:
    """Three primaries, each serving its slots whatever becomes of the others
    (``cluster-require-full-coverage no``: a test reads the live nodes while one is down),
    the engine's own client of them (its URL on node ``url_node``) and an AutoPipeline."""
    cluster = await form_cluster(tmp_path, more={"cluster-require-full-coverage": "no"})
    settings = make_settings(redis_url=f"redis+cluster://127.0.0.1:{cluster[url_node].port}")
    redis = redis_client(settings)
    assert isinstance(redis, RedisCluster)
    auto = AutoPipeline(redis, timeout_s=settings.redis_timeout_s)
    try:
        yield cluster, redis, auto
    finally:
        await auto.aclose()
        await redis.aclose()
        for node in cluster:  # SIGKILL: a node a test stopped (SIGSTOP) too
            node.kill()


async def test_a_command_is_not_sent_again_when_another_node_fails(
    tmp_path: Path, clean: None
) -> None:
    """redis-py re-sent a whole pipeline when a node of it failed, commands that another
    node had run or was running included: here an INCR on a busy node, batched with a
    call to a node that restarts, ran twice (a Function would: a challenge spent before its
    entry, a capacity lowered twice). Now what ran, ran once. (The other nodes serve on
    without the lost one's slots, so that the count can be read.)"""
    counted, lost = on_node(1, "counted"), on_node(2, "lost")
    async with lenient_cluster(tmp_path) as (cluster, _, auto):
        busy = node_client(cluster[1])

        async def ran() -> bool:
            return await busy.get(counted) is not None

        try:
            # A pooled connection to each node: the INCR below is sent at once.
            assert await auto.run([("EXISTS", counted), ("EXISTS", lost)]) == [0, 0]
            cluster[2].kill()
            assert await failed(auto.run([("EXISTS", lost)]))  # its connection lost with it
            # Node 1 runs a script for 0.3 s: the INCR waits there while node 2 refuses the
            # batch. Node 2 is back 50 ms on, for redis-py's retry of the batch to reach.
            script = asyncio.ensure_future(busy.eval(BUSY, 0, 300_000))
            await asyncio.sleep(0.05)
            asyncio.get_running_loop().call_later(0.05, cluster[2].start)
            await asyncio.gather(
                auto.run([("INCR", counted)]),
                auto.run([("EXISTS", lost)]),
                return_exceptions=True,
            )
            await script
            await poll(ran, lambda: "\n".join(n.describe() for n in cluster))
            await auto.aclose()  # the batch's work, redis-py's retries included, is over
            assert int(await busy.get(counted)) == 1
        finally:
            await busy.aclose()


async def test_a_node_that_fails_fails_its_own_calls_alone(tmp_path: Path, clean: None) -> None:
    """A batch of calls for several nodes, one of them gone: redis-py's one pipeline failed
    every call of the batch, so that a failover took the calls of every release down with
    the failing node's. Each node's calls are their own pipeline now."""
    kept, lost = on_node(1, "kept"), on_node(2, "lost")
    async with lenient_cluster(tmp_path) as (cluster, _, auto):
        assert await auto.run([("EXISTS", kept), ("EXISTS", lost)]) == [0, 0]
        cluster[2].kill()
        assert await failed(auto.run([("EXISTS", lost)]))  # its connection lost with it
        batches = auto.batches
        served, refused = await asyncio.gather(
            auto.run([("INCR", kept)]), auto.run([("EXISTS", lost)]), return_exceptions=True
        )
    assert auto.batches == batches + 1  # one batch, one pipeline a node
    assert served == [1]
    assert isinstance(refused, list) and isinstance(refused[0], RedisError), refused


async def test_a_node_that_hangs_holds_back_its_own_calls_alone(
    tmp_path: Path, clean: None
) -> None:
    """A node that stops answering (a process hung, a network cut) sends no error: the
    calls for other nodes in its batch waited for it, and failed with it at the deadline.
    Each caller is answered once its own nodes have; the hung node's at the deadline."""
    kept, hung = on_node(1, "kept"), on_node(2, "hung")
    async with lenient_cluster(tmp_path) as (cluster, _, auto):
        assert await auto.run([("EXISTS", kept), ("EXISTS", hung)]) == [0, 0]
        os.kill(cluster[2].pid, signal.SIGSTOP)
        served, waited = await asyncio.gather(
            auto.run([("INCR", kept)]), auto.run([("EXISTS", hung)]), return_exceptions=True
        )
    assert served == [1]
    assert isinstance(waited, TimeoutError), waited


async def test_a_node_that_lost_its_functions_has_its_own_calls_sent_again(
    cluster: list[RedisServer],
) -> None:
    """A node restarted without persistence has lost the Functions library, the others
    kept it: the library is loaded again and that node's calls sent again, and only
    theirs (the calls another node had run were sent again too: a token taken twice)."""
    settings = make_settings(redis_url=f"redis+cluster://127.0.0.1:{cluster[0].port}")
    redis = redis_client(settings)
    inventory = Inventory(redis, settings.redis_timeout_s, settings.retry_after_s)
    try:
        await inventory.load()
        await on_each([cluster[2]], "FUNCTION", "FLUSH")
        takes = [Take(on_node(1, "bucket"), 1.0, 10), Take(on_node(2, "bucket"), 1.0, 10)]
        taken = await inventory.take_tokens(takes, now_us=1_000_000)
        assert [(t.outcome, t.left) for t in taken] == [("ok", 9.0), ("ok", 9.0)]
    finally:
        await inventory.pipelining.aclose()
        await redis.aclose()


@pytest.mark.parametrize("how", ["killed", "hung"])
async def test_a_keyless_call_goes_to_another_node_once_its_node_failed(
    tmp_path: Path, clean: None, how: str
) -> None:
    """A command without a key (the readiness probe's PING) goes to the client's default
    node: with redis-py's retries, which chose another after a failure, off, every PING
    went on to a node that was gone, or hung, and every worker was reported not ready."""
    async with lenient_cluster(tmp_path) as (cluster, redis, auto):
        timeouts = make_settings()
        inventory = Inventory(redis, timeouts.redis_timeout_s, timeouts.retry_after_s, auto)
        await inventory.ping()
        default = redis.get_default_node()
        [gone] = [node for node in cluster if node.port == default.port]
        if how == "killed":
            gone.kill()
        else:
            os.kill(gone.pid, signal.SIGSTOP)
        with pytest.raises(StoreUnavailable):
            await inventory.ping()
        await inventory.ping()
        assert redis.get_default_node().port != gone.port


async def test_a_worker_whose_first_map_asks_a_hung_node_asks_another(
    tmp_path: Path, clean: None
) -> None:
    """A worker's first map of the slots asks the map's first primary (slot 0's) for
    redis-py's table of commands. That node hung: the deadline came first, nothing was
    counted as failed, and every try asked it again, so that every call, on every node,
    was a 503 until it answered. It goes last once it has not answered."""
    kept = on_node(1, "kept")
    async with lenient_cluster(tmp_path, url_node=1) as (cluster, _, auto):
        os.kill(cluster[0].pid, signal.SIGSTOP)
        assert await failed(auto.run([("INCR", kept)]))  # the first map: node 0 hangs
        # redis-py asks the nodes it knows for the slots in a random order: a try that asks
        # the hung node first fails too (one in three), until one asks another first.
        for _ in range(12):
            if not await failed(auto.run([("INCR", kept)])):
                break
        else:
            raise AssertionError("every try asked the hung node")


async def test_calls_for_a_slot_that_moved_leave_the_others_their_replies(
    tmp_path: Path, clean: None
) -> None:
    """A failover asked for (CLUSTER FAILOVER, a maintenance): the old primary answers
    MOVED for its slots. redis-py sent each such call again on its own, and at every fifth
    closed the connections of every node, calls in flight on them included (a review saw
    an INCR that ran told it failed). A moved call is now its caller's error (it did not
    run: a 503), the nodes are looked for again, and the other calls, one in flight on a
    busy node here, get their replies."""
    nodes = await form_cluster(tmp_path, replicas=1)
    settings = make_settings(redis_url=f"redis+cluster://127.0.0.1:{nodes[0].port}")
    redis = redis_client(settings)
    auto = AutoPipeline(redis, timeout_s=settings.redis_timeout_s)
    moved = [on_node(0, f"moved{i}") for i in range(12)]
    counted = on_node(1, "counted")
    busy = node_client(nodes[1])
    replica = node_client(nodes[3])  # node 0's
    old = node_client(nodes[0])

    async def demoted() -> bool:
        return (await old.execute_command("ROLE"))[0] == b"slave"

    async def served() -> bool:
        (reply,) = await auto.run([("EXISTS", moved[0])])
        return reply == 0

    try:
        assert await auto.run([("EXISTS", key) for key in [*moved, counted]]) == [0] * 13
        await replica.execute_command("CLUSTER", "FAILOVER")
        await poll(demoted, lambda: "\n".join(n.describe() for n in nodes))
        # Node 1 runs a script for 0.3 s: the INCR is in flight there meanwhile.
        script = asyncio.ensure_future(busy.eval(BUSY, 0, 300_000))
        await asyncio.sleep(0.05)
        incr, *others = await asyncio.gather(
            auto.run([("INCR", counted)]), *(auto.run([("EXISTS", key)]) for key in moved)
        )
        await script
        assert incr == [1]
        assert all(isinstance(reply, MovedError) for (reply,) in others), others
        await poll(served, lambda: "\n".join(n.describe() for n in nodes))
    finally:
        for client in (busy, replica, old):
            await client.aclose()
        await auto.aclose()
        await redis.aclose()
        for node in nodes:
            node.kill()


async def test_a_cluster_that_lost_everything_is_rebuilt(
    api: Api, cluster: list[RedisServer]
) -> None:
    """Every node flushed, its Functions library included (a restart without persistence):
    the inventories come back from PostgreSQL, the library is loaded on every node, and
    the sweeper's pass finds nothing to correct."""
    await api.site()
    releases = [await api.publish([2]) for _ in range(6)]
    for n, release in enumerate(releases):
        await api.book(release["slots"][0]["id"], applicant(n))
    await on_each(cluster, "FUNCTION", "FLUSH")
    await on_each(cluster, "FLUSHALL")
    for release in releases:
        slot = release["slots"][0]["id"]
        assert await api.free(release["id"]) == {slot: 1}
        hold = await api.hold(slot)
        assert hold.status == 201, hold.body
        assert await api.free(release["id"]) == {slot: 0}
    assert all(await on_each(cluster, "FUNCTION", "LIST"))  # loaded again on every node
    # The sweeper's pass (its lock, settling, reconcile) finds every count right.
    report = await sweep_once(api.client.app[RESERVATIONS], reconcile=True)
    assert (report.releases, report.corrections) == (6, 0)


async def test_a_cluster_that_is_down_is_answered_503(api: Api, cluster: list[RedisServer]) -> None:
    """Every node gone: redis-py's cluster client says so with exceptions of its own (no
    node to ask for the slots map), which must be 503 with Retry-After like a lone Redis's."""
    await api.site()
    release = await api.publish([2])
    slot = release["slots"][0]["id"]
    assert (await api.hold(slot)).status == 201
    for node in cluster:
        node.kill()
    api.client.app[RESERVATIONS].forget(release["id"])  # the listing asks Redis again
    for reply in (
        await api.call("POST", "/v1/challenges", {"release": release["id"]}),
        await api.call("GET", f"/v1/releases/{release['id']}/slots"),
        await api.call("GET", "/readyz"),
    ):
        assert reply.status == 503, reply.body
        assert int(reply.headers["Retry-After"]) >= 1


async def test_a_primary_that_dies_is_replaced_by_its_replica(tmp_path: Path, clean: None) -> None:
    """A primary is killed (SIGKILL) and its replica takes its place: a Redis Cluster
    failover. Until then the engine answers that primary's releases with 503 and
    Retry-After, and nothing else; then it serves them from the new primary, the nodes
    found again after a failed call (redis-py's own retries are off): a place
    booked before the failover stays taken, the last one is held and booked, and the
    sweeper's reconcile finds Redis agreeing with PostgreSQL."""
    nodes = await form_cluster(tmp_path, replicas=1)
    try:
        settings = make_settings(redis_url=f"redis+cluster://127.0.0.1:{nodes[0].port}")
        clock = FakeClock()
        app = create_app(settings, clock=clock, bucket_clock=clock, sweep=False)
        async with TestClient(TestServer(app)) as client:
            api = Api(client, clock)
            await api.site()
            releases = [await api.publish([2]) for _ in range(6)]
            for n, release in enumerate(releases):
                await api.book(release["slots"][0]["id"], applicant(n), ip(n))
            # The primary of the first release's inventory.
            probe = node_client(nodes[0])
            try:
                hashed = await probe.execute_command(
                    "CLUSTER KEYSLOT", ReleaseKeys.of(releases[0]["id"]).inv
                )
            finally:
                await probe.aclose()
            victim = min(hashed // (SLOTS // 3), 2)
            release, slot = releases[0]["id"], releases[0]["slots"][0]["id"]
            nodes[victim].kill()

            statuses = set()

            async def served() -> bool:
                clock.advance(1)  # past the listing's cache
                r = await api.call("GET", f"/v1/releases/{release}/slots")
                statuses.add(r.status)
                if r.status == 503:
                    assert int(r.headers["Retry-After"]) >= 1
                    return False
                assert r.status == 200, r.body
                assert r.body["slots"] == [{**r.body["slots"][0], "id": slot, "free": 1}]
                return True

            await poll(served, lambda: "\n".join(n.describe() for n in nodes), within_s=30)
            assert statuses <= {200, 503}
            replica = node_client(nodes[victim + 3])  # the replicas follow in primary order
            try:
                assert (await replica.execute_command("ROLE"))[0] == b"master"
            finally:
                await replica.aclose()
            survivors = [n for i, n in enumerate(nodes) if i != victim]

            async def healed() -> bool:
                # The other nodes learn of the promotion a little later: until then they
                # answer CLUSTERDOWN (503 here) for the buckets a challenge takes there.
                states = await on_each(survivors, "CLUSTER INFO")
                return all(state["cluster_state"] == "ok" for state in states)

            await poll(healed, lambda: "\n".join(n.describe() for n in nodes), within_s=30)
            hold = await api.hold(slot, ip(100))
            assert hold.status == 201, hold.body
            assert (await api.confirm(hold.body, applicant(100), ip(100))).status == 201
            assert await api.free(release) == {slot: 0}
            assert (await api.hold(slot, ip(101))).status == 409
            report = await sweep_once(app[RESERVATIONS], reconcile=True)
            assert (report.releases, report.corrections) == (6, 0)
    finally:
        for node in nodes:
            node.kill()
