"""The Redis side of reservations: one typed method per Lua function.

The Lua files in ``engine/lua`` are loaded once as a Redis Functions library whose name carries
a digest of the code, so two versions of the engine never call each other's functions. Each
method here knows its function's KEYS and ARGV order and decodes its reply; nothing else in the
engine talks Lua. Every call but the library load shares round trips with other requests'
(``pipelining``), and Redis errors are mapped to domain errors in ``_guard``, ``_run`` and
``_raise``, and only there.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterError,
    InvalidResponse,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.autopipeline import AutoPipeline, Command
from engine.errors import StoreUnavailable
from engine.keys import ReleaseKeys

OPERATIONS = (
    "hold",
    "inventory",
    "confirm_begin",
    "confirm_done",
    "confirm_abort",
    "release_hold",
    "settle_confirm",
    "cancel_done",
    "withdraw",
    "rebuild",
    "reconcile",
    "lower_capacity",
    "take_token",
    "issue_challenge",
    "spend_challenge",
    "unlock",
    "reclaim_expired",
)
RECLAIM_LIMIT = 100
# The reconcile recounts live-hold counters from the records only below this many live holds
# (about a millisecond of Redis time); see reconcile.lua.
RECOUNT_LIMIT = 1000
# Error replies that mean "this Redis cannot serve now", not "this call is wrong".
_UNAVAILABLE_REPLIES = frozenset(
    {
        "OOM",
        "BUSY",
        "LOADING",
        "MASTERDOWN",
        "READONLY",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "MISCONF",  # cannot persist, so refuses writes
        "NOREPLICAS",  # min-replicas-to-write not met: refuses writes while a replica is away
        "NOAUTH",  # a password is needed (a setting, or a Redis restarted with one)
        "NOPERM",  # its ACL forbids a command
    }
)

# The same, told by an error reply's message: a Redis at its client limit answers this to a
# new connection, then closes it; a call already sent on it gets it as its reply.
_UNAVAILABLE_MESSAGE = "max number of clients reached"

AnyRedis = Redis | RedisCluster
_UNREACHABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    TimeoutError,
    OSError,
    # redis-py's cluster client: its retries on a moved or down slot ran out, or no node
    # serves a slot. (No node reachable at all is a RedisClusterException: _unreachable.)
    ClusterError,
    SlotNotCoveredError,
    # A cluster's slot on another node since (MOVED, ASK) or moving (TRYAGAIN): the call
    # did not run, and the engine finds the nodes again (engine/autopipeline.py).
    AskError,
    TryAgainError,
    # Not Redis's protocol: something else on its port (the multiplexed connection says
    # the same).
    InvalidResponse,
)


# What redis-py's cluster client says when it cannot learn the slots' nodes (no node
# reachable; a primary down before its replica took over; nodes that disagree meanwhile).
_CLUSTER_DOWN = ("cannot be connected", "slots are not covered", "valid slots cache")


def _unreachable(exc: Exception) -> bool:
    """Redis cannot be reached. redis-py's cluster client says "no node" with the class it
    also raises for a client-side bug (keys of one command in two slots), which must stay
    a 500: for that class, only its message tells them apart."""
    if isinstance(exc, _UNREACHABLE):
        return True
    return isinstance(exc, RedisClusterException) and any(
        words in str(exc) for words in _CLUSTER_DOWN
    )


def _no_function(reply: Any) -> bool:
    return isinstance(reply, ResponseError) and "Function not found" in str(reply)


def library_source() -> tuple[str, str]:
    """The Functions library (``#!lua`` code) and the digest that names its functions."""
    files = importlib.resources.files("engine") / "lua"
    parts = [(files / "lib.lua").read_text()]
    parts += [(files / f"{op}.lua").read_text() for op in OPERATIONS]
    body = "\n".join(parts)
    digest = hashlib.sha256(body.encode()).hexdigest()[:12]
    registrations = "\n".join(
        f"redis.register_function('{op}_{digest}', {op})" for op in OPERATIONS
    )
    return f"#!lua name=guichet_{digest}\n{body}\n{registrations}\n", digest


Call = tuple[str, Sequence[str], Sequence[str | int]]


@dataclass(frozen=True, slots=True)
class Take:
    """One token-bucket take. With ``unspent`` (the address's unspent-challenge set, the
    challenge id, its expiry in ms, how many may be unspent), also records a challenge."""

    key: str
    per_s: float
    burst: int
    cost: int = 1
    unspent: tuple[str, str, int, int] | None = None


@dataclass(frozen=True, slots=True)
class Taken:
    """What a take did: ``ok`` with ``left`` tokens, or ``limited`` (bucket empty) or
    ``stockpile`` (too many unspent challenges) with ``wait_ms`` until it would pass."""

    take: Take
    outcome: Literal["ok", "limited", "stockpile"]
    left: float = 0.0
    wait_ms: int = 0

    @property
    def used(self) -> float:
        """How empty the bucket is after this take: 0 (full) to 1 (empty)."""
        return 1.0 if self.outcome != "ok" else 1.0 - self.left / self.take.burst


@dataclass(frozen=True, slots=True)
class HoldResult:
    outcome: Literal[
        "granted", "replayed", "full", "spent", "no-slot", "client-limit", "reclaiming"
    ]
    hold_id: str = ""
    deadline_ms: int = 0
    token_hash: str = ""


@dataclass(frozen=True, slots=True)
class HoldRecord:
    slot_id: str
    state: Literal["held", "confirming"]
    deadline_ms: int
    token_hash: str


@dataclass(frozen=True, slots=True)
class SlotCounts:
    capacity: int
    booked: int
    held: int

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.booked - self.held)


@dataclass(frozen=True, slots=True)
class Reconciled:
    corrections: int
    stale: bool  # a capacity was lowered since the snapshot: its capacities were not set


class InventoryMissing(Exception):
    """The release's inventory is not in Redis (flushed, restarted): rebuild it."""


class Pipelining(Protocol):
    """What carries the calls: ``engine.multiplex.Multiplexed`` (one connection, plain
    ``redis://``) or ``engine.autopipeline.AutoPipeline`` (redis-py pipelines, any URL)."""

    async def run(self, commands: Sequence[Command]) -> list[Any]: ...

    async def aclose(self) -> None: ...


class Inventory:
    def __init__(
        self,
        redis: AnyRedis,
        timeout_s: float,
        retry_after_s: int,
        pipelining: Pipelining | None = None,
    ) -> None:
        self._redis = redis
        self._timeout_s = timeout_s
        self._retry_after_s = retry_after_s
        self._source, self._digest = library_source()
        self._loaded = False
        # Every call but the library load goes through here: concurrent requests share
        # round trips.
        self.pipelining = pipelining or AutoPipeline(redis, timeout_s)

    async def load(self) -> None:
        """Load the Functions library (idempotent; every worker does it at start)."""
        await self._guard(self._redis.function_load(self._source, replace=True))
        self._loaded = True

    async def _guard(self, aw: Any) -> Any:
        """A redis-py call of its own (the library load), within the timeout."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await aw
        except Exception as exc:
            if _unreachable(exc):
                raise StoreUnavailable(self._retry_after_s, "Redis did not answer") from exc
            if isinstance(exc, ResponseError):  # redis-py raises error replies: OOM, READONLY...
                self._raise(exc)
            raise

    async def _run(self, commands: Sequence[Command]) -> list[Any]:
        # No timeout of our own here: the shared pipeline has one.
        try:
            return await self.pipelining.run(commands)
        except Exception as exc:
            if _unreachable(exc):
                raise StoreUnavailable(self._retry_after_s, "Redis did not answer") from exc
            if isinstance(exc, ResponseError):  # of the whole batch: a connection's set-up
                self._raise(exc)
            raise

    async def _call(self, op: str, keys: Sequence[str], args: Sequence[str | int]) -> list[Any]:
        return (await self._pipeline([(op, keys, args)]))[0]

    async def _pipeline(
        self, calls: Sequence[Call], extra: Sequence[tuple[str, ...]] = ()
    ) -> list[list[Any]]:
        """Run functions (and ``extra`` plain commands, best effort: their replies, errors
        included, are dropped) in one round trip, shared with other requests'. Each
        function is atomic on its own. (On a Redis Cluster an extra command may be another
        node's, which may fail alone: the functions ran.)"""
        commands: list[Command] = [
            ("FCALL", f"{op}_{self._digest}", len(keys), *keys, *args) for op, keys, args in calls
        ]
        replies = (await self._run([*commands, *extra]))[: len(calls)]
        # A Redis restarted without persistence forgets its functions: load them again, and
        # send again the calls that found none (alone: on a cluster, other nodes ran theirs).
        missing = [i for i, r in enumerate(replies) if _no_function(r)]
        if missing:
            await self.load()
            for i, reply in zip(
                missing, await self._run([commands[i] for i in missing]), strict=True
            ):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                self._raise(reply)
        return [list(r) for r in replies]

    async def _command(self, *command: str | int) -> Any:
        """One plain command, in the shared round trip."""
        (reply,) = await self._run([command])
        if isinstance(reply, Exception):
            self._raise(reply)
        return reply

    def _raise(self, error: Exception) -> NoReturn:
        # An error reply's code: redis-py takes it off the message of the errors it maps to a
        # class (OOM, READONLY, NOPERM...) and keeps it as status_code; hiredis leaves it on.
        # A command's reply may be a whole node's failure too (on a cluster, whose nodes
        # each have a pipeline of their own: engine/autopipeline.py).
        code = getattr(error, "status_code", None) or str(error).split(" ", 1)[0]
        if _unreachable(error) or (
            isinstance(error, ResponseError)
            and (code in _UNAVAILABLE_REPLIES or _UNAVAILABLE_MESSAGE in str(error))
        ):
            raise StoreUnavailable(self._retry_after_s, f"Redis: {error}") from error
        raise error

    async def ping(self) -> None:
        await self._command("PING")

    async def hold(
        self,
        release_id: str,
        slot_id: str,
        *,
        now_ms: int,
        hold_id: str,
        token_hash: str,
        deadline_ms: int,
        idem_field: str,
        challenge_id: str,
        challenge_expiry_ms: int,
        client_tag: str,
        max_live_holds: int,
        forget: tuple[str, str] | None = None,
    ) -> HoldResult:
        """Take a place. ``forget`` (a client's unspent-challenge set and this challenge)
        is removed in the same round trip."""
        k = ReleaseKeys.of(release_id)
        call: Call = (
            "hold",
            (k.inv, k.holds, k.confirming, k.hold, k.idem, k.spent, k.clients),
            (
                now_ms,
                slot_id,
                hold_id,
                token_hash,
                deadline_ms,
                idem_field,
                challenge_id,
                challenge_expiry_ms,
                RECLAIM_LIMIT,
                client_tag,
                max_live_holds,
            ),
        )
        extra = [("ZREM", *forget)] if forget else []
        (reply,) = await self._pipeline([call], extra)
        outcome = _text(reply[0])
        if outcome == "rebuild":
            raise InventoryMissing(release_id)
        if outcome in ("granted", "replayed"):
            return HoldResult(outcome, _text(reply[1]), int(reply[2]), _text(reply[3]))  # type: ignore[arg-type]
        return HoldResult(outcome)  # type: ignore[arg-type]

    async def _reclaiming(self, op: str, release_id: str, now_ms: int) -> list[Any]:
        """The reply of ``op``, which first reclaims up to RECLAIM_LIMIT expired holds.
        Raises InventoryMissing."""
        k = ReleaseKeys.of(release_id)
        reply = await self._call(
            op,
            (k.inv, k.holds, k.confirming, k.hold, k.idem, k.clients),
            (now_ms, RECLAIM_LIMIT),
        )
        if _text(reply[0]) == "rebuild":
            raise InventoryMissing(release_id)
        return reply

    async def reclaim(self, release_id: str, now_ms: int) -> int:
        """Give back the places of up to RECLAIM_LIMIT expired holds; how many it did."""
        return int((await self._reclaiming("reclaim_expired", release_id, now_ms))[1])

    async def counts(self, release_id: str, now_ms: int) -> dict[str, SlotCounts]:
        """Per-slot counts after reclaiming expired holds. Raises InventoryMissing."""
        reply = await self._reclaiming("inventory", release_id, now_ms)
        fields = {_text(reply[i]): int(reply[i + 1]) for i in range(1, len(reply), 2)}
        return {
            name[2:]: SlotCounts(
                value, fields.get("b:" + name[2:], 0), fields.get("h:" + name[2:], 0)
            )
            for name, value in fields.items()
            if name.startswith("c:")
        }

    async def lower_capacities(
        self,
        release_id: str,
        now_ms: int,
        changes: Sequence[tuple[str, int, int]],
        fence: str | None = None,
    ) -> dict[str, int]:
        """Lower capacities, given as (slot id, new capacity, bookings PostgreSQL has),
        atomically with the holds; a raise is left alone. Returns each slot whose capacity
        would go below its booked and held places, with that floor; then nothing changed.
        Otherwise the capacity fence gets a new value (``fence``, random unless a test
        gives one). Raises InventoryMissing."""
        k = ReleaseKeys.of(release_id)
        args: list[str | int] = [now_ms, RECLAIM_LIMIT, fence or _new_fence()]
        for slot_id, capacity, booked in changes:
            args += [slot_id, capacity, booked]
        reply = await self._call(
            "lower_capacity",
            (k.inv, k.holds, k.confirming, k.hold, k.idem, k.clients, k.fence),
            args,
        )
        if _text(reply[0]) == "rebuild":
            raise InventoryMissing(release_id)
        return {_text(reply[i]): int(reply[i + 1]) for i in range(1, len(reply), 2)}

    async def spend_challenge(
        self,
        release_id: str,
        challenge_id: str,
        expiry_ms: int,
        now_ms: int,
        forget: tuple[str, str] | None = None,
    ) -> bool:
        """Spend a challenge once (False if spent before or expired). ``forget`` as in
        ``hold``."""
        call: Call = (
            "spend_challenge",
            (ReleaseKeys.of(release_id).spent,),
            (now_ms, challenge_id, expiry_ms),
        )
        (reply,) = await self._pipeline([call], [("ZREM", *forget)] if forget else [])
        return _text(reply[0]) == "ok"

    async def forget_unspent(self, key: str, challenge_id: str) -> None:
        await self._command("ZREM", key, challenge_id)

    async def restore_unspent(self, key: str, challenge_id: str, expiry_ms: int) -> None:
        """Count a challenge among the address's unspent ones again: a hold's round trip
        takes it off whatever the answer, and a refusal that leaves it unspent (the
        address's live holds) must put it back, or each such refusal made room for one
        more challenge than the cap allows. The set lives as long as its last member."""
        replies = await self._run(
            [
                ("ZADD", key, expiry_ms, challenge_id),
                ("PEXPIREAT", key, expiry_ms, "NX"),  # taken off its last member: a new set
                ("PEXPIREAT", key, expiry_ms, "GT"),
            ]
        )
        for reply in replies:
            if isinstance(reply, Exception):
                self._raise(reply)

    async def unspend(self, release_id: str, challenge_id: str) -> None:
        """Give a spent challenge back (its attempt failed for want of a store)."""
        await self._command("ZREM", ReleaseKeys.of(release_id).spent, challenge_id)

    async def exists(self, release_id: str) -> bool:
        return bool(await self._command("EXISTS", ReleaseKeys.of(release_id).inv))

    async def hold_record(self, release_id: str, hold_id: str) -> HoldRecord | None:
        raw = await self._command("HGET", ReleaseKeys.of(release_id).hold, hold_id)
        if raw is None:
            return None
        slot, state, deadline, _idem, token, _client = _text(raw).split("|")
        return HoldRecord(slot, "held" if state == "h" else "confirming", int(deadline), token)

    async def confirm_begin(self, release_id: str, hold_id: str, now_ms: int) -> str | None:
        """Mark the hold confirming; return its slot, or None if it is gone or expired."""
        k = ReleaseKeys.of(release_id)
        reply = await self._call(
            "confirm_begin",
            (k.inv, k.holds, k.confirming, k.hold, k.idem, k.clients, k.confirms),
            (hold_id, now_ms),
        )
        return _text(reply[1]) if _text(reply[0]) == "confirming" else None

    async def confirm_done(self, release_id: str, hold_id: str, slot_id: str, ref: str) -> bool:
        """Count a committed booking. False if the inventory is missing: the rebuild, or
        the reconcile after it, counts the booking from PostgreSQL."""
        k = ReleaseKeys.of(release_id)
        reply = await self._call(
            "confirm_done",
            (k.inv, k.holds, k.confirming, k.hold, k.idem, k.booked, k.clients, k.confirms),
            (hold_id, slot_id, ref),
        )
        return _text(reply[0]) == "done"

    async def confirm_abort(
        self, release_id: str, hold_id: str
    ) -> Literal["held", "confirming", "gone"]:
        """PostgreSQL refused this confirm: the hold is held again, unless another confirm
        of it is still under way ("confirming": that one settles it)."""
        k = ReleaseKeys.of(release_id)
        reply = await self._call(
            "confirm_abort", (k.holds, k.confirming, k.hold, k.confirms), (hold_id,)
        )
        return _text(reply[0])  # type: ignore[return-value]

    async def release_hold(
        self, release_id: str, hold_id: str, now_ms: int
    ) -> Literal["released", "confirming", "gone"]:
        k = ReleaseKeys.of(release_id)
        reply = await self._call(
            "release_hold",
            (k.inv, k.holds, k.confirming, k.hold, k.idem, k.clients),
            (hold_id, now_ms),
        )
        return _text(reply[0])  # type: ignore[return-value]

    async def stale_confirms(self, release_id: str, cutoff_ms: int) -> list[str]:
        """Holds whose confirm began at or before ``cutoff_ms`` and never reported back."""
        k = ReleaseKeys.of(release_id)
        ids = await self._command("ZRANGE", k.confirming, "-inf", cutoff_ms, "BYSCORE")
        return [_text(i) for i in ids]

    async def settle_confirm(
        self, release_id: str, hold_id: str, ref: str | None, cutoff_ms: int
    ) -> str:
        k = ReleaseKeys.of(release_id)
        reply = await self._call(
            "settle_confirm",
            (k.inv, k.holds, k.confirming, k.hold, k.idem, k.booked, k.clients, k.confirms),
            (hold_id, ref or "", cutoff_ms),
        )
        return _text(reply[0])

    async def cancel_done(self, release_id: str, ref: str) -> None:
        k = ReleaseKeys.of(release_id)
        await self._call("cancel_done", (k.inv, k.booked), (ref,))

    async def withdraw(self, release_id: str, slot_id: str, fence: str | None = None) -> str:
        """PostgreSQL is cancelling a booking of the slot and lowering its capacity by one:
        lower Redis's first, with no floor to check (withdraw.lua); ``cancel_done`` follows
        the commit. Sets a new capacity fence (``fence``, random unless a test gives one).
        "withdrawn", or "rebuild" if the inventory is missing (the rebuild reads
        PostgreSQL)."""
        k = ReleaseKeys.of(release_id)
        reply = await self._call("withdraw", (k.inv, k.fence), (slot_id, fence or _new_fence()))
        return _text(reply[0])

    async def booked_refs(self, release_id: str) -> set[str]:
        refs = await self._command("HKEYS", ReleaseKeys.of(release_id).booked)
        return {_text(r) for r in refs}

    async def move_fence(self, release_id: str) -> None:
        """A new capacity fence, for a raise: a write of capacities from a snapshot read
        before it sets none (``reconcile``, ``rebuild``)."""
        await self._command("SET", ReleaseKeys.of(release_id).fence, _new_fence())

    async def fence(self, release_id: str, new: str | None = None) -> str:
        """The release's capacity fence: read with a PostgreSQL snapshot, and given back
        with its write of capacities (``rebuild``, ``reconcile``), which sets none if the
        fence changed in between. A lost fence is set anew (``new``, random unless a test
        gives one): a random value, never a count, so that none comes back after a loss."""
        key = ReleaseKeys.of(release_id).fence
        # Two commands in one round trip, not one atomic step: a value set in between is
        # a lowering that went on while this snapshot's lock was held, so one that rolled
        # back (its call late): the fence read after it is as good (section 8).
        done, value = await self._run([("SET", key, new or _new_fence(), "NX"), ("GET", key)])
        for reply in (done, value):
            if isinstance(reply, Exception):  # a Redis refusing writes: MISCONF, OOM...
                self._raise(reply)
        if value is None:
            raise StoreUnavailable(self._retry_after_s, "Redis kept no capacity fence")
        return _text(value)

    async def rebuild(
        self,
        release_id: str,
        fence: str,
        capacities: Sequence[tuple[str, int]],
        bookings: Sequence[tuple[str, str, str]],
    ) -> Literal["rebuilt", "present", "stale"]:
        """Recreate the inventory if still missing and the fence still where it was."""
        k = ReleaseKeys.of(release_id)
        args: list[str | int] = [fence, len(capacities)]
        for slot_id, capacity in capacities:
            args += [slot_id, capacity]
        for ref, slot_id, _ in bookings:
            args += [ref, slot_id]
        reply = await self._call(
            "rebuild",
            (
                k.inv,
                k.holds,
                k.confirming,
                k.hold,
                k.idem,
                k.booked,
                k.clients,
                k.confirms,
                k.fence,
            ),
            args,
        )
        return _text(reply[0])  # type: ignore[return-value]

    async def reconcile(
        self,
        release_id: str,
        fence: str,
        capacities: Sequence[tuple[str, int]],
        add: Sequence[tuple[str, str, str]],
        remove: Sequence[str],
        recount_limit: int = RECOUNT_LIMIT,
    ) -> Reconciled:
        """Correct the inventory toward PostgreSQL: the capacities only if the fence is still
        where it was; ``add``: bookings (reference, slot, hold) to count, but those whose hold
        is still confirming here, which are that confirm's to count. Live-hold counters are
        recounted only while at most ``recount_limit`` holds live."""
        k = ReleaseKeys.of(release_id)
        args: list[str | int] = [recount_limit, fence, len(capacities)]
        for slot_id, capacity in capacities:
            args += [slot_id, capacity]
        args.append(len(add))
        for ref, slot_id, hold_id in add:
            args += [ref, slot_id, hold_id]
        args += list(remove)
        reply = await self._call("reconcile", (k.inv, k.hold, k.booked, k.clients, k.fence), args)
        if _text(reply[0]) == "rebuild":
            raise InventoryMissing(release_id)
        return Reconciled(int(reply[1]), reply[2] == 1)

    async def take_tokens(self, takes: Sequence[Take], now_us: int | None) -> list[Taken]:
        """Take from several buckets in one round trip. ``now_us`` None means Redis's own
        clock (tests inject one)."""
        clock = "" if now_us is None else now_us
        calls: list[Call] = []
        for t in takes:
            if t.unspent is None:
                calls.append(("take_token", (t.key,), (repr(t.per_s), t.burst, t.cost, clock)))
            else:
                key, challenge_id, expiry_ms, most = t.unspent
                calls.append(
                    (
                        "issue_challenge",
                        (t.key, key),
                        (repr(t.per_s), t.burst, clock, challenge_id, expiry_ms, most),
                    )
                )
        results = []
        for take, reply in zip(takes, await self._pipeline(calls), strict=True):
            outcome = _text(reply[0])
            if outcome == "ok":
                results.append(Taken(take, "ok", left=int(reply[1]) / 1000))
            else:
                results.append(Taken(take, outcome, wait_ms=int(reply[1])))  # type: ignore[arg-type]
        return results

    async def try_lock(self, key: str, ttl_ms: int) -> str | None:
        """A lock that expires after ``ttl_ms``: its owner's token, or None if taken."""
        token = secrets.token_hex(8)
        taken = await self._command("SET", key, token, "NX", "PX", ttl_ms)
        return token if taken is not None else None

    async def unlock(self, key: str, token: str) -> None:
        """Release the lock if ``token`` still owns it: once it expired, another worker
        may hold it, and must keep it."""
        await self._call("unlock", (key,), (token,))


def _new_fence() -> str:
    """A capacity fence: a random 62-bit integer, in decimal."""
    return str(secrets.randbits(62))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
