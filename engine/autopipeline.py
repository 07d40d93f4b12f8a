"""Automatic pipelining: the Redis calls of concurrent requests share one round trip.

Under load, hundreds of requests wait on Redis at once, and redis-py's per-call cost (taking a
pooled connection, packing, a timeout, one write and one read system call) dominates the
hold path (BENCHMARKS.md). ``AutoPipeline.run`` queues a request's commands; once per turn of
the event loop, everything queued in that turn goes out as one non-transactional redis-py
pipeline, and each caller gets back the replies to its own commands, in order.

Nothing about atomicity changes: each command (each Redis Function) was already atomic on its
own, and a caller's commands still reach Redis in the order it gave them, next to each other.
A batch that fails as a whole (connection lost, timeout) fails every caller in it, exactly as
if each had sent its own pipeline at that moment.

On a Redis Cluster, whose client never re-sends a command (engine/app.py), a batch is one
pipeline for each node, sent at once, and each caller is answered once its own nodes have
answered: a node that fails or hangs fails its own commands (each gets the node's error as
its reply, or the deadline's) and no other (redis-py's one pipeline failed them all, and a
failover took every release's calls down with the failing node's). Each command goes to
the node of its first key by the client's own map of the slots (redis-py asked a node for
the keys of every FCALL, two round trips each, all to one node whose loss failed calls on
every node). After a node failed or hung, or a slot moved (MOVED), the client finds the
nodes again, in the background and at most once a second (redis-py did so only in its
retries, now off), and a keyless command (PING) goes to another node from then on. A call
to a slot that is moving (ASK, TRYAGAIN: a resharding) did not run, and is a 503 until the
slot has moved.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    MaxConnectionsError,
    MovedError,
    RedisClusterException,
    SlotNotCoveredError,
)

Command = tuple[str | int | float | bytes, ...]
_Waiter = tuple[Sequence[Command], asyncio.Future[list[Any]]]
# A cluster node that did not answer, or a map of the slots that is out of date.
_NODES_CHANGED = (*RedisCluster.ERRORS_ALLOW_RETRY, RedisClusterException)
_REFRESH_EVERY_S = 1.0  # the least time between two searches for a cluster's nodes


class AutoPipeline:
    """Coalesce concurrent ``run`` calls into one pipeline per event-loop turn.

    ``max_commands`` bounds one pipeline; a turn that queued more sends several. The timeout
    bounds each pipeline from the moment it is sent, connection wait included.
    """

    def __init__(
        self,
        redis: Redis | RedisCluster,
        timeout_s: float,
        max_commands: int = 512,
        on_write: Callable[[int], None] | None = None,
    ) -> None:
        self._redis = redis
        self._cluster = redis if isinstance(redis, RedisCluster) else None
        self._refreshing: asyncio.Task[None] | None = None
        self._failed: set[str] = set()  # nodes that failed since the last search
        self._closed = False
        self._mapping = 0  # batches making the client's first map of the slots
        self._refreshed_at = float("-inf")
        self._timeout_s = timeout_s
        self._max_commands = max_commands
        self._on_write = on_write  # told the number of commands of each batch
        self._queue: list[_Waiter] = []
        self._queued_commands = 0
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()
        self.batches = 0  # batches sent (a pipeline, or one a node), for tests and profiles
        self.commands = 0

    async def run(self, commands: Sequence[Command]) -> list[Any]:
        """The replies to ``commands``, in order. A command that failed gets its exception
        as its reply; a batch that failed as a whole raises here (redis-py's error, or
        TimeoutError)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._queue.append((commands, future))
        self._queued_commands += len(commands)
        if self._queued_commands >= self._max_commands:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        if not self._queue:
            return
        batch, self._queue, self._queued_commands = self._queue, [], 0
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Waiter]) -> None:
        self.batches += 1
        # The callers hear of the deadline from a timer, not from the batch's cancellation:
        # Python 3.11's asyncio.wait_for, in redis-py's send, drops a cancellation that lands
        # as the write completes, and the batch then ran on to the socket's own timeout, or
        # through a cluster client's retries for seconds, every caller waiting on it.
        # The deadline covers the pipeline's opening too (a cluster client's first map).
        task = asyncio.current_task()
        assert task is not None
        waiting: dict[str, ClusterNode] = {}  # a cluster's nodes not yet answered
        expiry = asyncio.get_running_loop().call_later(
            self._timeout_s, self._expire, batch, task, waiting
        )
        commands = [command for waiter, _ in batch for command in waiter]
        self.commands += len(commands)
        if self._on_write is not None:
            self._on_write(len(commands))
        try:
            if self._cluster is not None:
                await self._send_by_node(self._cluster, batch, commands, waiting)
                return
            async with self._redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # every caller must hear of it, even of a cancellation
            failure = exc if isinstance(exc, Exception) else TimeoutError("cancelled")
            _fail(batch, failure)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            expiry.cancel()
        start = 0
        for waiter, future in batch:
            end = start + len(waiter)
            if not future.done():  # the caller may have been cancelled meanwhile
                future.set_result(replies[start:end])
            start = end

    async def _send_by_node(
        self,
        cluster: RedisCluster,
        batch: list[_Waiter],
        commands: list[Command],
        waiting: dict[str, ClusterNode],
    ) -> None:
        """One pipeline for each node, at once; each caller answered once its commands'
        nodes have. ``waiting``: the nodes not yet answered (read at the deadline)."""
        self._mapping += 1
        try:
            await cluster.initialize()  # the first map of the slots (then, nothing to do)
        except Exception:
            self._first_map_failed(cluster)
            raise
        finally:
            self._mapping -= 1
        replies: list[list[Any]] = [[None] * len(waiter) for waiter, _ in batch]
        unanswered = [len(waiter) for waiter, _ in batch]
        places = [(w, c) for w, (waiter, _) in enumerate(batch) for c in range(len(waiter))]
        for w, (waiter, future) in enumerate(batch):
            if not waiter and not future.done():
                future.set_result(replies[w])  # nothing to send: answered at once

        def answer(at: list[int], outcome: list[Any] | BaseException) -> None:
            for n, i in enumerate(at):
                w, c = places[i]
                replies[w][c] = outcome[n] if isinstance(outcome, list) else outcome
                unanswered[w] -= 1
                future = batch[w][1]
                if unanswered[w] == 0 and not future.done():
                    future.set_result(replies[w])

        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        for i, command in enumerate(commands):
            try:
                node = _node_of(cluster, command)
            except RedisClusterException as exc:  # a slot the map has no node for
                self._search(cluster)
                answer([i], exc)
                continue
            by_node.setdefault(node.name, (node, []))[1].append(i)

        async def on_node(node: ClusterNode, at: list[int]) -> None:
            try:
                outcome: list[Any] | BaseException = await _on_node(
                    cluster, node, [commands[i] for i in at]
                )
            except Exception as exc:
                outcome = exc
            failures = [outcome] if isinstance(outcome, BaseException) else outcome
            if any(_node_lost(r) for r in failures):
                self._node_failed(cluster, node)
            elif any(isinstance(r, MovedError) for r in failures):
                self._search(cluster)  # the slot's node changed: those commands did not run
            waiting.pop(node.name, None)
            answer(at, outcome)

        waiting.update((name, node) for name, (node, _) in by_node.items())
        await asyncio.gather(*(on_node(node, at) for node, at in by_node.values()))

    def _first_map_failed(self, cluster: RedisCluster) -> None:
        """The first map asks the map's first primary for redis-py's table of commands:
        if that node is down or hung, every try failed the same way. It goes last."""
        if (asked := getattr(cluster.commands_parser, "node", None)) is not None:
            self._node_failed(cluster, asked)

    def _node_failed(self, cluster: RedisCluster, node: ClusterNode) -> None:
        """A node failed or hung: it goes last in the client's lists (the first primary
        is the default node of keyless commands, and the one asked for redis-py's table of
        commands), the default node is another, and the nodes are looked for again (a
        failover gives its slots to its replica)."""
        self._failed.add(node.name)
        cluster.nodes_manager.move_node_to_end_of_cached_nodes(node.name)
        _new_default(cluster, self._failed)
        self._search(cluster)

    def _search(self, cluster: RedisCluster) -> None:
        """Find the nodes again, in the background, at most once a second."""
        loop = asyncio.get_running_loop()
        if (
            not self._closed
            and (self._refreshing is None or self._refreshing.done())
            and loop.time() >= self._refreshed_at + _REFRESH_EVERY_S
        ):
            self._refreshed_at = loop.time()
            self._refreshing = loop.create_task(self._refresh(cluster))

    async def _refresh(self, cluster: RedisCluster) -> None:
        # Each node it asks has its own timeouts; a few of them in all.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(4 * self._timeout_s):
                await cluster.nodes_manager.initialize()
        # The search makes the first primary the default node again, a failed one (still a
        # primary until its replica takes over) possibly; those that failed since it began
        # too. They are forgotten from now on: the next failure tells again.
        failed, self._failed = self._failed, set()
        _new_default(cluster, failed)

    def _expire(
        self, batch: list[_Waiter], task: asyncio.Task[Any], waiting: dict[str, ClusterNode]
    ) -> None:
        if self._cluster is not None:
            for node in list(waiting.values()):  # hung: failed before its callers hear of it
                self._node_failed(self._cluster, node)
            if not waiting and self._mapping:  # still making the first map: a node hangs
                self._first_map_failed(self._cluster)
        _fail(batch, TimeoutError(f"Redis did not answer within {self._timeout_s} s"))
        task.cancel()  # ends the batch's work, unless redis-py loses this too

    async def aclose(self) -> None:
        """Wait for the pipelines in flight: each is cancelled at its deadline, but may run
        on if redis-py loses the cancellation (the caller bounds this wait too)."""
        self._flush()
        self._closed = True  # no search begins from now on
        try:
            if self._sending:
                await asyncio.wait(set(self._sending))
        finally:  # also if this wait is cut short (a batch whose cancellation was lost)
            if self._refreshing is not None:
                self._refreshing.cancel()
                await asyncio.wait({self._refreshing})


def _fail(batch: list[_Waiter], failure: BaseException) -> None:
    for _, future in batch:
        if not future.done():  # answered, or its caller cancelled
            future.set_exception(failure)


def _new_default(cluster: RedisCluster, failed: set[str]) -> None:
    """A default node that has not failed, if there is one."""
    default = cluster.get_default_node()
    if default is None or default.name not in failed:
        return
    for node in cluster.get_primaries():
        if node.name not in failed:
            cluster.set_default_node(node)
            return


def _node_lost(reply: Any) -> bool:
    """A node that did not answer (not a client's own pool, full)."""
    return isinstance(reply, _NODES_CHANGED) and not isinstance(reply, MaxConnectionsError)


def _node_of(cluster: RedisCluster, command: Command) -> ClusterNode:
    """The node of a Function call's first key, or of a plain command's (its first
    argument); a command without a key goes to the client's default node."""
    key: Any  # str, bytes or a number: redis-py encodes each as it sends it
    if command[0] == "FCALL":
        key = command[3] if command[2] else None
    else:
        key = command[1] if len(command) > 1 else None
    node = cluster.get_default_node() if key is None else cluster.get_node_from_key(key)
    if node is None:  # no node known (the client's first map failed)
        raise SlotNotCoveredError("no node of the Redis Cluster is known")
    return node


async def _on_node(cluster: RedisCluster, node: ClusterNode, commands: list[Command]) -> list[Any]:
    async with cluster.pipeline(transaction=False) as pipe:
        for command in commands:
            pipe.execute_command(*command, target_nodes=node)
        # A command whose slot moved (MOVED, ASK, TRYAGAIN: it did not run) is its caller's
        # 503, not re-sent: redis-py sends each on its own, and at every fifth closes the
        # connections of every node, batches in flight on them included (a call that ran,
        # told it failed).
        return await pipe.execute(raise_on_error=False, allow_redirections=False)
