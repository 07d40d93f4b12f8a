"""One pipelined Redis connection per worker, shared by every request in flight.

``engine.autopipeline`` batches concurrent calls into redis-py pipelines, but each batch still
pays redis-py's fixed cost: a pooled connection, a task, a timeout, command objects. Under
open-loop load the batches are small (a request or two per event-loop turn), and that fixed
cost came back as the largest part of a hold (BENCHMARKS.md). Here the batch costs one
``write``: ``run`` packs its commands into the connection's output buffer, one callback per
event-loop turn writes the buffer, and replies, parsed by hiredis as they arrive, go to the
callers in the order they were sent (Redis answers in order on a connection).

Failure is all-or-nothing, as a connection's stream is: if a batch is not fully answered
within ``timeout_s``, or the connection drops, every caller waiting on it fails
(``TimeoutError`` or redis-py's ``ConnectionError``) and the connection is closed. The next
call connects again, also within ``timeout_s``, so a call that must connect first waits at
most twice that; no call is sent before the new connection's AUTH and SELECT. Error replies
are not failures: a command's ``ResponseError`` is its reply, as in a redis-py pipeline with
``raise_on_error=False``. Plain ``redis://`` URLs only; the engine uses
``engine.autopipeline`` for the others (TLS, Unix sockets, Redis Cluster, query options).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError

from engine.autopipeline import Command


@dataclass(slots=True)
class _Caller:
    expected: int
    future: asyncio.Future[list[Any]]
    deadline: float = 0.0  # loop time by which its batch must be answered, once written
    replies: list[Any] = field(default_factory=list)


def pack(commands: Sequence[Command]) -> bytes:
    """Commands in RESP (hiredis packs them in C: 4 times faster than a Python loop)."""
    # hiredis's stub declares a 1-tuple; it takes any length.
    return b"".join([hiredis.pack_command(tuple(command)) for command in commands])  # type: ignore[arg-type]


class _Link(asyncio.Protocol):
    """One TCP connection. Its events reach the Multiplexed only while it is the current
    connection: a connection aborted after a timeout may still report its loss later."""

    def __init__(self, owner: Multiplexed) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ResponseError, protocolError=InvalidResponse)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.owner._link is self:
            self.owner._received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.owner._link is self:
            self.owner._lost()


class Multiplexed:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float,
        on_write: Callable[[int], None] | None = None,
    ) -> None:
        self._address = (host, port)
        self._on_write = on_write  # told the number of commands of each write
        self._hello: list[Command] = []
        if password is not None:
            self._hello.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            self._hello.append(("SELECT", db))
        self._timeout_s = timeout_s
        self._link: _Link | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._closed = False
        self._waiting: deque[_Caller] = deque()
        self._out: list[bytes] = []
        self._unsent: list[_Caller] = []
        self._unsent_commands = 0
        self._scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self.batches = 0  # writes, for tests and the benchmark's profile
        self.commands = 0

    @classmethod
    def from_url(
        cls, url: str, timeout_s: float, on_write: Callable[[int], None] | None = None
    ) -> Multiplexed:
        """From a plain ``redis://[[user]:password@]host[:port][/db]`` URL; ValueError for any
        other (TLS, Unix socket, cluster, options in a query string)."""
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname or parts.query:
            raise ValueError(f"not a plain redis:// URL: {url!r}")
        path = parts.path.strip("/")
        return cls(
            parts.hostname,
            parts.port or 6379,
            db=int(path) if path else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            timeout_s=timeout_s,
            on_write=on_write,
        )

    # Calls ------------------------------------------------------------------------------

    async def run(self, commands: Sequence[Command]) -> list[Any]:
        """The replies to ``commands``, in order (a failed command's reply is its
        ``ResponseError``). Raises TimeoutError or ConnectionError if Redis does not answer:
        within ``timeout_s``, or twice that when the call must connect first."""
        if self._link is None or self._connecting is not None:
            # Nobody sends before the connection has run its AUTH and SELECT.
            await self._connect()
        return await self._send(commands)

    async def _send(self, commands: Sequence[Command]) -> list[Any]:
        loop = asyncio.get_running_loop()
        caller = _Caller(len(commands), loop.create_future())
        self._out.append(pack(commands))
        self._unsent.append(caller)
        self._unsent_commands += len(commands)
        self.commands += len(commands)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await caller.future

    def _flush(self) -> None:
        self._scheduled = False
        if not self._unsent:
            return
        callers, self._unsent = self._unsent, []
        data, self._out = b"".join(self._out), []
        commands, self._unsent_commands = self._unsent_commands, 0
        link = self._link
        if link is None or link.transport is None or link.transport.is_closing():
            _fail(callers, RedisConnectionError("Redis connection lost"))
            return
        self.batches += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        for caller in callers:
            caller.deadline = deadline
        self._waiting.extend(callers)
        link.transport.write(data)
        if self._on_write is not None:
            self._on_write(commands)
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._watch)

    def _watch(self) -> None:
        """At the oldest waiting batch's deadline: fail everything if it is still waiting,
        else come back at the next one's. One timer for the connection, not one per write
        (a thousand of them alive at a thousand writes a second, each firing for nothing)."""
        self._watchdog = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        deadline = self._waiting[0].deadline
        if deadline <= loop.time():
            self._close(TimeoutError(f"Redis did not answer within {self._timeout_s} s"))
        else:
            self._watchdog = loop.call_at(deadline, self._watch)

    # Connection -------------------------------------------------------------------------

    async def _connect(self) -> None:
        if self._closed:
            raise RedisConnectionError("closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        await asyncio.shield(self._connecting)

    def _connected(self, attempt: asyncio.Future[None]) -> None:
        self._connecting = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved here; the callers get it from the shield

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s):
                _transport, link = await loop.create_connection(lambda: _Link(self), *self._address)
                self._link = link
                if self._closed:
                    raise RedisConnectionError("closed")
                if self._hello:
                    for reply in await self._send(self._hello):
                        if isinstance(reply, Exception):
                            raise reply
        except (OSError, TimeoutError) as exc:
            self._close(RedisConnectionError(f"Redis: {exc}"))
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
        except ResponseError as exc:  # AUTH or SELECT refused: a setting is wrong
            self._close(RedisConnectionError("Redis refused the connection"))
            raise RedisConnectionError(f"Redis refused the connection: {exc}") from exc
        except RedisConnectionError:
            self._close(RedisConnectionError("closed"))
            raise

    def _received(self, link: _Link, data: bytes) -> None:
        link.reader.feed(data)
        waiting = self._waiting
        try:
            reply = link.reader.gets()
            while reply is not False:
                caller = waiting[0]
                caller.replies.append(reply)
                if len(caller.replies) == caller.expected:
                    waiting.popleft()
                    if not caller.future.done():  # the caller may have been cancelled
                        caller.future.set_result(caller.replies)
                reply = link.reader.gets()
        except (InvalidResponse, IndexError) as exc:  # garbage, or a reply nobody asked for
            self._close(RedisConnectionError(f"Redis protocol error: {exc!r}"))

    def _lost(self) -> None:
        self._link = None
        self._fail_all(RedisConnectionError("Redis connection lost"))

    def _close(self, error: Exception) -> None:
        link, self._link = self._link, None
        if link is not None and link.transport is not None:
            link.transport.abort()
        self._fail_all(error)

    def _fail_all(self, error: Exception) -> None:
        waiting, self._waiting = list(self._waiting), deque()
        _fail(waiting, error)

    async def aclose(self) -> None:
        self._closed = True
        self._flush()
        self._close(RedisConnectionError("closed"))
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


def _fail(callers: Sequence[_Caller], error: Exception) -> None:
    for caller in callers:
        if not caller.future.done():
            caller.future.set_exception(error)
