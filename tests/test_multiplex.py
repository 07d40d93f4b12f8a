"""The multiplexed Redis connection (engine/multiplex.py) against real redis-servers, on both
event loops (the engine serves on uvloop, the in-process tests run on asyncio's)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from engine.multiplex import Multiplexed, pack
from tests.conftest import REDIS_URL
from tests.procs import HOST, Blackhole, RedisServer


@contextlib.asynccontextmanager
async def connected(url: str = REDIS_URL, timeout_s: float = 5.0) -> AsyncIterator[Multiplexed]:
    """A multiplexed connection, closed at the end whatever the test did."""
    redis = Multiplexed.from_url(url, timeout_s=timeout_s)
    try:
        yield redis
    finally:
        await redis.aclose()


HANG = pytest.mark.timeout(30)


# Each scenario runs on both loops, each in a loop of its own.
LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
Run = Callable[[Coroutine[Any, Any, None]], None]


def test_commands_are_packed_as_resp_bulk_strings() -> None:
    assert pack([("SET", "k", 12), ("ECHO", b"\x00\xff")]) == (
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n*2\r\n$4\r\nECHO\r\n$2\r\n\x00\xff\r\n"
    )
    assert pack([("ECHO", "é")]) == b"*2\r\n$4\r\nECHO\r\n$2\r\n\xc3\xa9\r\n"
    with pytest.raises(TypeError):
        pack([("SET", "k", None)])  # type: ignore[list-item]


async def _concurrent_calls_share_writes_and_get_their_own_replies() -> None:
    async with connected() as redis:
        await redis.run([("DEL", "mx:n")])
        before = redis.batches
        replies = await asyncio.gather(
            *(redis.run([("INCR", "mx:n"), ("ECHO", f"caller {i}")]) for i in range(300))
        )
        assert [r[1] for r in replies] == [f"caller {i}".encode() for i in range(300)]
        assert sorted(r[0] for r in replies) == list(range(1, 301))
        assert redis.batches - before == 1  # one write for the whole turn
        # Replies of every shape come back as hiredis parses them.
        await redis.run([("DEL", "mx:h"), ("HSET", "mx:h", "a", "1")])
        assert await redis.run([("HGET", "mx:h", "a"), ("HGET", "mx:h", "b")]) == [b"1", None]
        assert await redis.run([("HGETALL", "mx:h"), ("DEL", "mx:h", "mx:n")]) == [[b"a", b"1"], 2]


@LOOPS
def test_concurrent_calls_share_writes_and_get_their_own_replies(run: Run) -> None:
    run(_concurrent_calls_share_writes_and_get_their_own_replies())


async def _a_failing_command_is_its_callers_alone() -> None:
    async with connected() as redis:
        await redis.run([("SET", "mx:text", "not a number")])
        good, bad, also_good = await asyncio.gather(
            redis.run([("ECHO", "a")]),
            redis.run([("ECHO", "b"), ("INCR", "mx:text")]),
            redis.run([("ECHO", "c")]),
        )
        assert good == [b"a"] and also_good == [b"c"]
        assert bad[0] == b"b" and isinstance(bad[1], ResponseError)
        assert "not an integer" in str(bad[1])
        await redis.run([("DEL", "mx:text")])


@LOOPS
def test_a_failing_command_is_its_callers_alone(run: Run) -> None:
    run(_a_failing_command_is_its_callers_alone())


async def _a_cancelled_caller_leaves_the_others_their_replies() -> None:
    async with connected() as redis:
        await redis.run([("PING",)])
        gone = asyncio.ensure_future(redis.run([("ECHO", "gone")]))
        kept = asyncio.ensure_future(redis.run([("ECHO", "kept")]))
        await asyncio.sleep(0)
        gone.cancel()
        assert await kept == [b"kept"]
        assert await redis.run([("ECHO", "after")]) == [b"after"]  # still in step


@LOOPS
def test_a_cancelled_caller_leaves_the_others_their_replies(run: Run) -> None:
    run(_a_cancelled_caller_leaves_the_others_their_replies())


async def _an_unanswering_redis_fails_every_caller_within_the_timeout() -> None:
    async with Blackhole() as hole:
        redis = Multiplexed(HOST, hole.port, db=3, timeout_s=0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(
            *(redis.run([("PING",)]) for _ in range(20)), return_exceptions=True
        )
        # Connected, but SELECT is never answered: the connection attempt times out.
        assert all(isinstance(r, RedisConnectionError) for r in results), results
        assert loop.time() - started < 3
        await redis.aclose()

        redis = Multiplexed(HOST, hole.port, timeout_s=0.3)  # no SELECT: connects at once
        started = loop.time()
        results = await asyncio.gather(
            *(redis.run([("PING",)]) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert loop.time() - started < 3
        await redis.aclose()


@HANG
@LOOPS
def test_an_unanswering_redis_fails_every_caller_within_the_timeout(run: Run) -> None:
    run(_an_unanswering_redis_fails_every_caller_within_the_timeout())


async def _a_restarted_redis_is_reconnected(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    await server.wait_ready()
    async with connected(server.url, 1.0) as redis:
        assert await redis.run([("SET", "k", "v"), ("GET", "k")]) == [b"OK", b"v"]
        server.kill()
        with pytest.raises((RedisConnectionError, TimeoutError)):
            await redis.run([("GET", "k")])
        with pytest.raises(RedisConnectionError):  # down: refused at connect
            await redis.run([("GET", "k")])
        server.start()
        await server.wait_ready()
        assert await redis.run([("GET", "k")]) == [None]  # back, and empty
        server.kill()


@HANG
@LOOPS
def test_a_restarted_redis_is_reconnected(run: Run, tmp_path: Path) -> None:
    run(_a_restarted_redis_is_reconnected(tmp_path))


async def _password_and_database_from_the_url(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, options={"requirepass": "s3cret"})
    server.start()
    await server.wait_ready()
    try:
        redis = Multiplexed.from_url(f"redis://:s3cret@{HOST}:{server.port}/5", timeout_s=1.0)
        await redis.run([("SET", "in5", "yes")])
        other = Multiplexed.from_url(f"redis://:s3cret@{HOST}:{server.port}/0", timeout_s=1.0)
        assert await other.run([("GET", "in5"), ("EXISTS", "in5")]) == [None, 0]
        await other.aclose()
        assert await redis.run([("GET", "in5")]) == [b"yes"]
        await redis.aclose()

        wrong = Multiplexed.from_url(f"redis://:nope@{HOST}:{server.port}/0", timeout_s=1.0)
        with pytest.raises(RedisConnectionError, match="refused"):
            await wrong.run([("PING",)])
        await wrong.aclose()
    finally:
        server.kill()


@HANG
@LOOPS
def test_password_and_database_from_the_url(run: Run, tmp_path: Path) -> None:
    run(_password_and_database_from_the_url(tmp_path))


async def _calls_made_while_connecting_wait_for_the_select() -> None:
    """A caller arriving after the TCP connection is up but before SELECT is answered must
    not run in database 0."""
    db = int(REDIS_URL.rsplit("/", 1)[1]) or 15
    async with connected(REDIS_URL.rsplit("/", 1)[0] + f"/{db}", 5.0) as redis:
        tasks = []
        for _ in range(40):  # one new caller per event-loop turn, across the connect
            tasks.append(asyncio.ensure_future(redis.run([("CLIENT", "INFO")])))
            await asyncio.sleep(0)
        for (info,) in await asyncio.gather(*tasks):
            assert f" db={db} ".encode() in info, info


@LOOPS
def test_calls_made_while_connecting_wait_for_the_select(run: Run) -> None:
    run(_calls_made_while_connecting_wait_for_the_select())


async def _a_closed_client_refuses_calls() -> None:
    redis = Multiplexed.from_url(REDIS_URL, timeout_s=1.0)
    assert await redis.run([("PING",)]) == [b"PONG"]
    await redis.aclose()
    with pytest.raises(RedisConnectionError):
        await redis.run([("PING",)])


@LOOPS
def test_a_closed_client_refuses_calls(run: Run) -> None:
    run(_a_closed_client_refuses_calls())


def test_only_plain_redis_urls() -> None:
    for url in (
        "rediss://h:6379/0",
        "unix:///tmp/redis.sock",
        "redis+cluster://h:7000",
        "redis://h:6379?db=3",  # options redis-py reads from the query: not here
    ):
        with pytest.raises(ValueError):
            Multiplexed.from_url(url, timeout_s=1.0)
