"""Automatic pipelining against a real Redis: concurrent calls share round trips, each caller
gets its own replies, one caller's error stays its own, and a dead Redis fails every caller
in bounded time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from engine.autopipeline import AutoPipeline
from engine.errors import StoreUnavailable
from engine.inventory import Inventory
from tests.procs import HOST, Blackhole


async def test_concurrent_calls_share_round_trips(redis: aioredis.Redis) -> None:
    await redis.delete("ap:n")
    auto = AutoPipeline(redis, timeout_s=5.0)
    replies = await asyncio.gather(
        *(auto.run([("INCR", "ap:n"), ("ECHO", f"caller {i}")]) for i in range(300))
    )
    # Each caller sees its own ECHO, and its INCR right before it.
    assert [r[1] for r in replies] == [f"caller {i}".encode() for i in range(300)]
    assert sorted(r[0] for r in replies) == list(range(1, 301))
    assert auto.commands == 600
    assert auto.batches <= 3  # one per event-loop turn, split at 512 commands
    await redis.delete("ap:n")


async def test_a_failing_command_is_its_callers_alone(redis: aioredis.Redis) -> None:
    await redis.set("ap:text", "not a number")
    auto = AutoPipeline(redis, timeout_s=5.0)
    good, bad, also_good = await asyncio.gather(
        auto.run([("ECHO", "a")]),
        auto.run([("ECHO", "b"), ("INCR", "ap:text")]),
        auto.run([("ECHO", "c")]),
    )
    assert auto.batches == 1
    assert good == [b"a"] and also_good == [b"c"]
    assert bad[0] == b"b" and isinstance(bad[1], Exception)
    assert "not an integer" in str(bad[1])
    await redis.delete("ap:text")


async def test_a_cancelled_caller_leaves_the_others_their_replies(redis: aioredis.Redis) -> None:
    auto = AutoPipeline(redis, timeout_s=5.0)
    gone = asyncio.ensure_future(auto.run([("ECHO", "gone")]))
    kept = asyncio.ensure_future(auto.run([("ECHO", "kept")]))
    await asyncio.sleep(0)  # both queued, not yet sent
    gone.cancel()
    assert await kept == [b"kept"]
    assert gone.cancelled()


@pytest.mark.timeout(30)
async def test_an_unanswering_redis_fails_every_caller_within_the_timeout() -> None:
    async with Blackhole() as hole:
        redis = aioredis.Redis.from_url(f"redis://{HOST}:{hole.port}/0", socket_timeout=10)
        inventory = Inventory(redis, timeout_s=0.3, retry_after_s=2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(
            *(inventory.exists(f"r{i}") for i in range(20)), return_exceptions=True
        )
        waited = loop.time() - started
        await redis.aclose()
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    assert all(r.retry_after == 2 for r in results if isinstance(r, StoreUnavailable))
    # Bounded by the inventory's timeout, not by redis-py's 10 s socket timeout.
    assert waited < 5


class _DeafPipeline(aioredis.client.Pipeline):
    """Loses every cancellation until its work is done, as Python 3.11's asyncio.wait_for
    in redis-py's send loses one that lands as the write completes."""

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        work = asyncio.ensure_future(super().execute(raise_on_error))
        while True:
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                assert current is not None
                current.uncancel()


class _DeafRedis(aioredis.Redis):
    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        return _DeafPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


@pytest.mark.timeout(30)
async def test_callers_hear_of_the_deadline_even_if_the_batch_runs_on() -> None:
    async with Blackhole() as hole:
        redis = _DeafRedis.from_url(f"redis://{HOST}:{hole.port}/0", socket_timeout=2)
        auto = AutoPipeline(redis, timeout_s=0.3)
        results = await asyncio.gather(
            *(auto.run([("ECHO", f"caller {i}")]) for i in range(5)), return_exceptions=True
        )
        # Answered at the deadline, while the batch still waits on redis-py's 2 s socket
        # timeout: before, they waited with it.
        still_running = len(auto._sending)
        await auto.aclose()
        await redis.aclose()
    assert all(isinstance(r, TimeoutError) for r in results), results
    assert "within 0.3 s" in str(results[0])
    assert still_running == 1
