"""Peak capacity of the engine on this machine, measured in one run (issue 5, "Benchmarks").

    python loadtests/bench.py [--duration 6] [--warmup 1] [--connections 64]
                              [--open-duration 8] [--no-wrk] [--skip-scaling]
    python loadtests/bench.py --profile hold|slots|confirm [--profile-seconds 12] [--native]

One run measures, each against a bare aiohttp + uvloop ceiling measured in the same run:
  1. the ceiling: a JSON hello-world aiohttp app, one uvloop process, started like the engine,
     measured first, last, and just before and just after each run that has a goal stated as
     a share of it (the listing, the hold, the blocked refusal): that goal's ratio is to the
     mean of those two, because a shared VM's speed drifts within a run (the first and last
     ceilings differed by up to 49 %);
  2. slot listing, GET /v1/releases/{id}/slots (a 120-slot release, the demo's shape, and a
     12-slot one), asked for as a phone's browser does (Accept-Encoding: gzip), and the
     120-slot one again by a client that does not accept gzip;
  3. holds, POST /v1/holds, each with its own pre-solved challenge (1 bit x 1 puzzle) and its
     own client address (X-Forwarded-For from a trusted 127.0.0.1);
  4. the refusal of a blocked client (its address bucket found empty), on POST /v1/challenges
     and on POST /v1/holds, by a second engine whose address limit is tiny (2 per hour);
  5. the refusal of a forged challenge, POST /v1/holds with a tampered signature (403);
  6. confirms, POST /v1/holds/{id}/confirm, of holds taken beforehand, one applicant each;
  7. holds again, open loop at 80 % of their measured peak, right after it (latency from the
     intended send time, so a stalled engine cannot hide its queue), and the ceiling's hello
     world the same way, at the same fractions of its own peak;
  8. the floor of a hold: an aiohttp app that reads the hold's JSON body, makes one Redis
     script call through the engine's multiplexed connection and answers JSON, and nothing
     else (no proof of work, limits or tokens), closed loop and open loop: how far the hold
     goals are from what any hold on this stack can do here;
  9. scaling: slot listing and holds with GUICHET_WORKERS=1, 2 and 4.

Where the CPUs go: the engine (or the hello app) is pinned to core 1, the load generator and
this script to core 0 (sched_setaffinity). Redis and PostgreSQL are the machine's shared
servers and are not pinned: their CPU time is reported per run. The scaling runs pin nothing.
The load generator is wrk (closed loop, Lua script for per-request bodies) when installed,
else this script's own asyncio HTTP/1.1 client (which is slower than wrk: the ceiling it
reports is then the client's, and the report says so). The open-loop run always uses the
asyncio client.

Data: a scratch database ``guichet_bench`` next to GUICHET_DATABASE_URL's (dropped and
migrated again at each run) and Redis database 13 of GUICHET_REDIS_URL's server (flushed at
the start and at the end). The URLs come from the environment or ``.guichet/env.sh``. Sites and
releases are created through the admin API. Challenges are minted with the engine's own
``engine.pow.issue`` and the run's GUICHET_SECRET instead of POST /v1/challenges: a hold
verifies them exactly as it verifies issued ones, and issuing 100 000 through HTTP would
take longer than the benchmark.

Prints a table and writes ``loadtests/reports/bench-<UTC time>.json``. BENCHMARKS.md records
a run. Everything runs on 127.0.0.1; every load loop is bounded in time; every process this
script starts is stopped before it exits.

``--profile SCENARIO`` runs one engine under wrk load instead and samples it with py-spy
(``pip install py-spy``; root or ptrace rights), then prints where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import math
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HOST = "127.0.0.1"
LOAD_CPUS = {0}
ENGINE_CPUS = {1}
BENCH_DB = "guichet_bench"
BENCH_REDIS_DB = 13
READY_S = 20.0
REQUEST_TIMEOUT_S = 5.0
# Generous limits for every measurement but the blocked client's (docs/abuse.md has the
# defaults): the benchmark measures the paths, not the limits.
GENEROUS = {
    "GUICHET_LIMIT_ADDRESS": "1000000/1s",
    "GUICHET_LIMIT_NET": "1000000/1s",
    "GUICHET_LIMIT_NET48": "1000000/1s",
    "GUICHET_LIMIT_SESSION": "1000000/1s",
    "GUICHET_LIMIT_IDENTITY": "1000000/1s",
    "GUICHET_LIMIT_HOLD": "1000000/1s",
    "GUICHET_LIMIT_GLOBAL_CHALLENGE": "1000000/1s",
    "GUICHET_LIMIT_GLOBAL_CONFIRM": "1000000/1s",
    "GUICHET_MAX_LIVE_HOLDS": "100",
    "GUICHET_MAX_UNSPENT_CHALLENGES": "100",
    "GUICHET_MAX_ACTIVE_PER_EMAIL": "1000",
    "GUICHET_POW_DIFFICULTY": "1",
    "GUICHET_POW_PUZZLES": "1",
    "GUICHET_TRUSTED_PROXIES": HOST,
}
# What the issue asks of one worker process, as a share of the ceiling (or an absolute rate).
GOALS = {
    "slots": ("ratio", 0.8),
    "blocked_challenge": ("ratio", 0.6),
    "hold": ("ratio", 0.4),
    "confirm": ("rps", 1000.0),
}
HOLD_P99_GOAL_MS = 50.0
PROFILE_TARGETS = ("hold", "open", "slots", "confirm", "blocked", "forged")
SCENARIOS = ("slots", "hold", "forged", "confirm", "open", "floor", "blocked")
BLOCKED_ADDRESS = "198.51.100.7"  # TEST-NET-2: the client the blocked measurements use
# What a phone's browser asks for: listings are measured as they are sent to it (gzipped).
BROWSER = {"Accept-Encoding": "gzip, deflate, br"}


# Configuration --------------------------------------------------------------------------------


def store_urls() -> tuple[str, str]:
    """GUICHET_DATABASE_URL and GUICHET_REDIS_URL from the environment or .guichet/env.sh."""
    from engine.settings import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL

    found = dict(os.environ)
    env_sh = REPO / ".guichet" / "env.sh"
    if env_sh.exists():
        for line in env_sh.read_text().splitlines():
            m = re.match(r"\s*export\s+([A-Z_]+)=(.*)$", line)
            if m and m.group(1) not in found:
                found[m.group(1)] = m.group(2).strip().strip("'\"")
    return (
        found.get("GUICHET_DATABASE_URL", DEFAULT_DATABASE_URL),
        found.get("GUICHET_REDIS_URL", DEFAULT_REDIS_URL),
    )


def _local_only(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"bench: refusing to run against a store that is not local: {url}")


def bench_urls() -> tuple[str, str, str]:
    """(maintenance DSN, benchmark DSN, benchmark Redis URL)."""
    db_url, redis_url = store_urls()
    for url in (db_url, redis_url):
        _local_only(url)
    if not redis_url.startswith("redis://"):
        raise SystemExit(f"bench: GUICHET_REDIS_URL must be redis://..., not {redis_url}")
    parts = urlsplit(db_url)
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    bench_dsn = urlunsplit(parts._replace(path=f"/{BENCH_DB}"))
    redis = urlunsplit(urlsplit(redis_url)._replace(path=f"/{BENCH_REDIS_DB}"))
    return maintenance, bench_dsn, redis


async def reset_database(maintenance: str, dsn: str) -> None:
    import asyncpg

    from engine.migrate import migrate

    conn = await asyncpg.connect(maintenance, timeout=10)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {BENCH_DB}")
    finally:
        await conn.close()
    await migrate(dsn)


async def flush_redis(url: str) -> int | None:
    """Flush the benchmark's Redis database; return the server's pid (for CPU accounting)."""
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_timeout=5)
    try:
        await client.flushdb(asynchronous=True)
        info = await client.info("server")
        return int(info["process_id"])
    finally:
        await client.aclose()


async def drop_holds(url: str, release_id: str) -> None:
    """Forget a release's Redis state (its holds, spent challenges, counters). The engine
    rebuilds its inventory from PostgreSQL on next use, with no live hold: the next
    measurement does not pay for the holds this one took (the sweeper reads every active
    release's inventory each second, and its cost grows with live holds)."""
    from redis.asyncio import Redis

    from engine.keys import ReleaseKeys

    k = ReleaseKeys.of(release_id)
    client = Redis.from_url(url, socket_timeout=5)
    try:
        # UNLINK frees in the background: a DEL of 20 000 holds blocks the shared Redis ~20 ms.
        await client.unlink(
            k.inv, k.holds, k.confirming, k.confirms, k.hold, k.idem, k.booked, k.spent
        )
    finally:
        await client.aclose()


# Machine and CPU accounting -------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
    versions = {}
    for name in ("aiohttp", "uvloop", "redis", "asyncpg", "pydantic"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[name] = version(name)
    return {
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "loadavg_at_start": os.getloadavg(),
    }


def _proc_cpu_s(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> tuple[int, int]:
    """(resident now, resident at its highest since the process started) of ``pid``, KiB."""
    fields = {"VmRSS:": 0, "VmHWM:": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, *value = line.split()
            if name in fields:
                fields[name] = int(value[0])
    return fields["VmRSS:"], fields["VmHWM:"]


def children(pid: int) -> list[int]:
    """Live children of ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(entry.name))
    return found


def postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
    return pids


def _core_times() -> dict[str, tuple[int, int]]:
    """Per core: (busy, total) jiffies from /proc/stat."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            if re.match(r"cpu\d+ ", line):
                name, *values = line.split()
                nums = [int(v) for v in values]
                idle = nums[3] + nums[4]
                out[name] = (sum(nums) - idle, sum(nums))
    return out


class UsageWatch:
    """CPU used during one measurement, in % of one core: the engine's processes, the load
    generator (wrk, or this process), Redis, PostgreSQL, and how busy each core was; and the
    engine's memory at its end: resident (``rss_mib``, its processes' sum) and the highest
    it has been since the engine started (``rss_peak_mib``, each process's high-water mark,
    summed). With several workers the sums count twice the pages they share with the
    supervisor they were forked from."""

    def __init__(self, engine_pids: list[int], redis_pid: int | None, load_is_child: bool):
        self.engine_pids = engine_pids
        self.redis_pid = redis_pid
        self.load_is_child = load_is_child

    def _sample(self) -> dict[str, Any]:
        own = resource.getrusage(
            resource.RUSAGE_CHILDREN if self.load_is_child else resource.RUSAGE_SELF
        )
        per_pid = {p: _proc_cpu_s(p) for p in self.engine_pids}
        return {
            "t": time.perf_counter(),
            "per_pid": per_pid,
            "engine": sum(per_pid.values()),
            "load": own.ru_utime + own.ru_stime,
            "redis": _proc_cpu_s(self.redis_pid) if self.redis_pid else 0.0,
            "postgres": sum(_proc_cpu_s(p) for p in postgres_pids()),
            "cores": _core_times(),
        }

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> dict[str, Any]:
        after, before = self._sample(), self._before
        wall = max(1e-9, after["t"] - before["t"])
        out: dict[str, Any] = {
            k: round(100 * (after[k] - before[k]) / wall, 1)
            for k in ("engine", "load", "redis", "postgres")
        }
        if len(self.engine_pids) > 1:
            # Each process of the engine (the supervisor first): shows how evenly the workers
            # share the load.
            out["engine_by_process"] = [
                round(100 * (after["per_pid"][p] - before["per_pid"][p]) / wall, 1)
                for p in self.engine_pids
            ]
        for core, (busy, total) in after["cores"].items():
            b0, t0 = before["cores"].get(core, (0, 0))
            out[f"{core}_busy"] = round(100 * (busy - b0) / max(1, total - t0), 1)
        memory = [memory_kib(p) for p in self.engine_pids]
        out["rss_mib"] = round(sum(now for now, _ in memory) / 1024, 1)
        out["rss_peak_mib"] = round(sum(peak for _, peak in memory) / 1024, 1)
        return out


# Processes --------------------------------------------------------------------------------------


def cancel_on_sigterm() -> None:
    """SIGTERM cancels the running task, so its cleanup stops every process it started."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _affinity(cpus: set[int] | None) -> Callable[[], None] | None:
    if cpus is None or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, cpus)


class Server:
    """A server subprocess (the engine, or the hello app) on its own port, pinned to ``cpus``
    (None: not pinned). Its output goes to a log file in the work folder."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        workdir: Path,
        cpus: set[int] | None,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.argv = [*argv]
        self.env = env
        self.logfile = workdir / f"{name}.log"
        self.cpus = cpus
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.logfile.open("ab") as log:
            self.proc = subprocess.Popen(
                [a.replace("{port}", str(self.port)) for a in self.argv],
                cwd=REPO,
                env=self.env | {"GUICHET_PORT": str(self.port), "GUICHET_HOST": HOST},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_affinity(self.cpus),
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        """The process and its workers."""
        return [self.pid, *children(self.pid)]

    def worker_pids(self) -> list[int]:
        kids = children(self.pid)
        return kids or [self.pid]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; workers left behind are killed too."""
        if self.proc is None:
            return
        workers = children(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc = None

    def tail(self) -> str:
        text = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
        return text[-3000:]

    async def wait_ready(self, workers: int = 1) -> None:
        """Poll /healthz (bounded), then wait until all ``workers`` processes exist."""
        import aiohttp

        deadline = time.monotonic() + READY_S
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"bench: {self.name} exited\n{self.tail()}")
            try:
                timeout = aiohttp.ClientTimeout(total=2)
                async with (
                    aiohttp.ClientSession(timeout=timeout) as session,
                    session.get(f"http://{HOST}:{self.port}/healthz") as r,
                ):
                    if r.status == 200 and (workers == 1 or len(children(self.pid)) >= workers):
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {self.name} not ready after {READY_S} s\n{self.tail()}")
            await asyncio.sleep(0.05)


def hello_app() -> Any:
    """The ceiling's app: the smallest JSON aiohttp app (``/`` and ``/healthz``)."""
    from aiohttp import web

    async def hello(_request: web.Request) -> web.Response:
        return web.json_response({"hello": "world"})

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/healthz", hello)
    return app


def listening_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    sock.listen(1024)
    return sock


def serve_app(app: Any, port: int) -> None:
    """Serve ``app`` in this process the way ``engine.serve`` starts a worker: uvloop, no
    access log."""
    import logging

    import uvloop
    from aiohttp import web

    sock = listening_socket(port)
    logging.basicConfig(level=logging.WARNING)
    web.run_app(app, sock=sock, print=None, access_log=None, loop=uvloop.new_event_loop())


# The floor of a hold: what any hold server on this stack must do at least.
FLOOR_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', 10000)
return 1
"""


def floor_app(redis_url: str) -> Any:
    """The least a hold server can do on this stack: the hello world's app, plus a route that
    reads the JSON body, makes one Redis script call (take a place, record the hold) through
    the engine's own multiplexed connection, and answers JSON. No proof of work, limits,
    tokens or checks: its rate is the most any hold on aiohttp and Redis can reach here."""
    from aiohttp import web

    from engine.multiplex import Multiplexed

    redis = Multiplexed.from_url(redis_url, timeout_s=2.0)
    script: list[str] = []

    async def load_script(_app: web.Application) -> None:
        script.extend(await redis.run([("SCRIPT", "LOAD", FLOOR_SCRIPT)]))

    async def hold(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        hold_id = secrets.token_hex(8)
        keys = (f"floor:n:{body['slot_id']}", f"floor:h:{hold_id}")
        [taken] = await redis.run([("EVALSHA", script[0], 2, *keys, 1 << 40, hold_id)])
        return web.json_response({"hold_id": hold_id, "taken": taken}, status=201)

    app = hello_app()
    app.on_startup.append(load_script)
    app.router.add_post("/v1/holds", hold)
    return app


# --gc-log: loaded into each engine process as sitecustomize, it appends one line per garbage
# collection of 1 ms or more ("<generation> <ms>") to a file per process.
_GC_PROBE = """
import gc, os, time
_started = [0.0]
_path = os.path.join(os.environ["BENCH_GC_DIR"], f"gc-{os.getpid()}.txt")
def _probe(phase, info):
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - _started[0]) * 1000
    if ms >= 1.0:
        with open(_path, "a") as f:
            f.write(f"{info['generation']} {ms:.2f}\\n")
gc.callbacks.append(_probe)
"""


def gc_summary(directory: Path, names: dict[int, str]) -> dict[str, dict[str, float]]:
    """Per engine: collections of 1 ms or more, full ones, and the longest pause."""
    out: dict[str, dict[str, float]] = {}
    for path in sorted(directory.glob("gc-*.txt")):
        pid = int(path.stem.removeprefix("gc-"))
        pauses = [line.split() for line in path.read_text().splitlines() if line.strip()]
        full = [float(ms) for gen, ms in pauses if gen == "2"]
        out[f"{names.get(pid, 'engine')} (pid {pid})"] = {
            "over_1ms": len(pauses),
            "full": len(full),
            "full_max_ms": max(full, default=0.0),
            "all_max_ms": max((float(ms) for _, ms in pauses), default=0.0),
            "total_ms": round(sum(float(ms) for _, ms in pauses), 1),
        }
    return out


async def run_bounded(
    argv: Sequence[str],
    timeout_s: float,
    stdout: int = asyncio.subprocess.PIPE,
    stderr: int = asyncio.subprocess.PIPE,
) -> tuple[int | None, bytes, bytes]:
    """Run a tool (wrk, py-spy) to its end, or kill it after ``timeout_s``: its exit code
    and what it printed."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=stdout, stderr=stderr)
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out or b"", err or b""


def engine_env(
    dsn: str, redis: str, secret: str, admin: str, workdir: Path, workers: int, **extra: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUICHET_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(GENEROUS)
    env.update(
        {
            "GUICHET_DATABASE_URL": dsn,
            "GUICHET_REDIS_URL": redis,
            "GUICHET_SECRET": secret,
            "GUICHET_ADMIN_TOKEN": admin,
            "GUICHET_DATA_DIR": str(workdir / "data"),
            "GUICHET_WORKERS": str(workers),
        }
    )
    env.update(extra)
    return env


# A small HTTP/1.1 client: pre-encoded requests, keep-alive, Content-Length replies only -------


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            waiter.set_exception(ConnectionError("a reply without Content-Length"))
            return
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop >= 0 else len(head)])
        total = end + 4 + length
        if len(self.buf) < total:
            return
        status = int(head[9:12])
        body = bytes(self.buf[end + 4 : total])
        del self.buf[:total]
        self.waiter = None
        waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.transport is None:
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _connect(port: int) -> _Conn:
    _transport, conn = await asyncio.get_running_loop().create_connection(_Conn, HOST, port)
    return conn


def raw_request(
    method: str, path: str, port: int, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}"]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Measured:
    tool: str
    connections: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    errors: int = 0  # socket errors and timeouts
    http_errors: int | None = None  # replies >= 400, as the load generator counted them
    statuses: dict[str, int] = field(default_factory=dict)  # when the generator knows them
    exhausted: bool = False  # ran out of unique requests: the number is not valid
    target_rps: float | None = None  # open loop only


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def _measured(
    tool: str,
    connections: int,
    duration_s: float,
    latencies: list[float],
    statuses: Counter[int],
    errors: int,
    **extra: Any,
) -> Measured:
    latencies.sort()
    return Measured(
        tool,
        connections,
        round(duration_s, 3),
        len(latencies),
        round(len(latencies) / duration_s, 1),
        round(_percentile(latencies, 50) * 1000, 2),
        round(_percentile(latencies, 95) * 1000, 2),
        round(_percentile(latencies, 99) * 1000, 2),
        round(latencies[-1] * 1000, 2) if latencies else math.nan,
        errors,
        sum(n for s, n in statuses.items() if s >= 400),
        {str(s): n for s, n in sorted(statuses.items())},
        **extra,
    )


async def closed_loop(
    port: int,
    requests: Sequence[bytes],
    *,
    connections: int,
    duration_s: float,
    warmup_s: float,
    cycle: bool,
    replies: dict[int, tuple[int, bytes]] | None = None,
) -> Measured:
    """``connections`` clients, each sending its next request when the last one is answered.
    Counts what completes in the measured window, after ``warmup_s``. Without ``cycle``, each
    request is sent at most once; ``replies`` (when given) receives every reply by index."""
    conns = [await _connect(port) for _ in range(connections)]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    counter = itertools.count()
    errors = 0
    exhausted = False

    async def client(conn: _Conn) -> None:
        nonlocal errors, exhausted
        while time.perf_counter() < stop_at:
            i = next(counter)
            if i >= len(requests):
                if not cycle:
                    exhausted = True
                    return
                i %= len(requests)
            sent = time.perf_counter()
            try:
                status, body = await conn.request(requests[i])
            except ConnectionError:
                errors += 1
                conn.close()
                conn = await _connect(port)
                continue
            done = time.perf_counter()
            if replies is not None:
                replies[i] = (status, body)
            if sent >= measure_from and done <= stop_at:
                latencies.append(done - sent)
                statuses[status] += 1

    tasks = [asyncio.create_task(client(c)) for c in conns]
    try:
        _done, pending = await asyncio.wait(tasks, timeout=warmup_s + duration_s + 10)
        for task in pending:
            task.cancel()
    finally:
        for conn in conns:
            conn.close()
    window = duration_s
    if exhausted:  # stopped early: rate over the time it actually ran
        window = max(1e-3, time.perf_counter() - measure_from)
    return _measured(
        "asyncio", connections, window, latencies, statuses, errors, exhausted=exhausted
    )


async def open_loop(
    port: int, requests: Sequence[bytes], *, rate: float, duration_s: float, most_conns: int = 512
) -> Measured:
    """Send request k at t0 + k/rate whatever the replies (a connection pool grows up to
    ``most_conns``); latency counts from that intended time, so queueing anywhere shows."""
    pool: asyncio.LifoQueue[_Conn] = asyncio.LifoQueue()
    for _ in range(32):
        pool.put_nowait(await _connect(port))
    opened = 32
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors = 0
    all_conns: list[_Conn] = []

    async def one(raw: bytes, intended: float) -> None:
        nonlocal opened, errors
        if pool.empty() and opened < most_conns:
            opened += 1
            conn = await _connect(port)
            all_conns.append(conn)
        else:
            conn = await pool.get()
        try:
            status, _body = await conn.request(raw)
        except ConnectionError:
            errors += 1
            conn.close()
            pool.put_nowait(await _connect(port))
            return
        latencies.append(time.perf_counter() - intended)
        statuses[status] += 1
        pool.put_nowait(conn)

    n = min(len(requests), int(rate * duration_s))
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter() + 0.05
    k = 0
    while k < n:
        now = time.perf_counter()
        while k < n and t0 + k / rate <= now:
            task = asyncio.create_task(one(requests[k], t0 + k / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        if k < n:
            # At least a millisecond (the loop's timer resolution): what is due is sent in
            # one batch at the next tick, rather than spinning.
            await asyncio.sleep(max(0.001, t0 + k / rate - time.perf_counter()))
    if tasks:
        _done, pending = await asyncio.wait(set(tasks), timeout=10)
        for task in pending:
            task.cancel()
        errors += len(pending)
    while not pool.empty():
        pool.get_nowait().close()
    for conn in all_conns:
        conn.close()
    return _measured(
        "asyncio open loop",
        opened,
        n / rate,
        latencies,
        statuses,
        errors,
        target_rps=round(rate, 1),
        exhausted=len(requests) < rate * duration_s,
    )


# wrk --------------------------------------------------------------------------------------------

_WRK_DONE = r"""
threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function done(summary, latency, requests)
  local wrapped = 0
  for _, t in ipairs(threads) do wrapped = wrapped + (t:get("wrapped") or 0) end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50_us": %.0f, "p95_us": %.0f, ' ..
    '"p99_us": %.0f, "max_us": %.0f, "wrapped": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max,
    wrapped))
end
"""

# Requests from a file of length-prefixed raw requests, thread i taking every nth from i.
_WRK_LIST = (
    _WRK_DONE
    + r"""
local reqs = {}
local n = 0
local i = 0
wrapped = 0
function init(args)
  local nthreads = tonumber(args[2])
  local f = assert(io.open(args[1], "rb"))
  local data = f:read("*a")
  f:close()
  local pos, k = 1, 0
  while pos <= #data do
    local nl = string.find(data, "\n", pos, true)
    local len = tonumber(string.sub(data, pos, nl - 1))
    if k % nthreads == tid then
      n = n + 1
      reqs[n] = string.sub(data, nl + 1, nl + len)
    end
    k = k + 1
    pos = nl + len + 1
  end
end
function request()
  i = i + 1
  if i > n then
    i = 1
    wrapped = wrapped + 1
  end
  return reqs[i]
end
"""
)


class Wrk:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.static = workdir / "wrk-static.lua"
        self.listed = workdir / "wrk-list.lua"
        self.static.write_text(_WRK_DONE)
        self.listed.write_text(_WRK_LIST)
        self._files = itertools.count()

    def _write(self, requests: Sequence[bytes]) -> Path:
        path = self.workdir / f"requests-{next(self._files)}.bin"
        with path.open("wb") as f:
            for raw in requests:
                f.write(b"%d\n" % len(raw))
                f.write(raw)
        return path

    async def _run(
        self,
        port: int,
        path: str,
        requests: Sequence[bytes] | None,
        conns: int,
        secs: int,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        argv = [
            self.binary,
            "-t1",
            f"-c{conns}",
            f"-d{secs}s",
            "--timeout",
            f"{REQUEST_TIMEOUT_S:.0f}s",
            "-s",
            str(self.static if requests is None else self.listed),
            *(f"-H{k}: {v}" for k, v in (headers or {}).items()),
            f"http://{HOST}:{port}{path}",
        ]
        if requests is not None:
            argv += ["--", str(self._write(requests)), "1"]
        _code, out, _ = await run_bounded(argv, secs + 30, stderr=asyncio.subprocess.STDOUT)
        text = out.decode(errors="replace")
        m = re.search(r"^BENCHJSON (.*)$", text, re.M)
        if m is None:
            raise SystemExit(f"bench: wrk gave no result:\n{text}")
        return dict(json.loads(m.group(1)))

    async def measure(
        self,
        port: int,
        *,
        connections: int,
        duration_s: int,
        warmup_s: int,
        path: str = "/",
        headers: dict[str, str] | None = None,
        requests: Sequence[bytes] | None = None,
        warmup_requests: Sequence[bytes] | None = None,
        on_start: Callable[[], None] | None = None,
        unique: bool = False,
    ) -> Measured:
        """One wrk run (after a warm-up run, whose numbers are dropped). ``requests`` None:
        GET ``path`` with ``headers``; else the raw requests, in order, wrapping around
        (reported)."""
        if warmup_s > 0:
            await self._run(port, path, warmup_requests or requests, connections, warmup_s, headers)
        if on_start is not None:
            on_start()
        r = await self._run(port, path, requests, connections, duration_s, headers)
        secs = r["duration_us"] / 1e6
        return Measured(
            "wrk",
            connections,
            round(secs, 3),
            r["requests"],
            round(r["requests"] / secs, 1),
            round(r["p50_us"] / 1000, 2),
            round(r["p95_us"] / 1000, 2),
            round(r["p99_us"] / 1000, 2),
            round(r["max_us"] / 1000, 2),
            errors=r["connect"] + r["read"] + r["write"] + r["timeout"],
            http_errors=r["status"],
            exhausted=unique and r["wrapped"] > 0,
        )


# The engine's own counts ------------------------------------------------------------------------

# Route labels hold braces ("/v1/releases/{release}/slots"): the label set ends at the last one.
_REQUESTS_LINE = re.compile(r"^guichet_http_requests_total\{(.*)\}\s+(\S+)$", re.M)


async def engine_counts(port: int) -> Counter[tuple[str, str, str]]:
    """guichet_http_requests_total by (route, method, status), from /metrics."""
    import aiohttp

    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(f"http://{HOST}:{port}/metrics") as r,
    ):
        text = await r.text()
    counts: Counter[tuple[str, str, str]] = Counter()
    for labels, value in _REQUESTS_LINE.findall(text):
        d = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        counts[(d.get("route", ""), d.get("method", ""), d.get("status", ""))] += int(float(value))
    return counts


# The scenarios ----------------------------------------------------------------------------------


class Minter:
    """Pre-solved challenges and unique client addresses (10.0.0.0/8, one per request)."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self._addresses = itertools.count(1)
        self.expires_ms = int((time.time() + 1800) * 1000)

    def address(self) -> str:
        i = next(self._addresses)
        return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"

    def challenge(self, release: str, address: str) -> tuple[str, list[str]]:
        from engine import pow

        c = pow.issue(self.secret, release, address, 1, 1, self.expires_ms)
        return c.text, pow.solve(c.text, 1, 1)

    def holds(
        self, port: int, release: str, slots: list[str], n: int
    ) -> tuple[list[bytes], list[str]]:
        """``n`` hold requests, each from its own address; and the addresses."""
        out, addresses = [], []
        for i in range(n):
            address = self.address()
            text, nonces = self.challenge(release, address)
            body = json.dumps(
                {"slot_id": slots[i % len(slots)], "challenge": text, "nonces": nonces}
            )
            out.append(
                raw_request("POST", "/v1/holds", port, body.encode(), {"X-Forwarded-For": address})
            )
            addresses.append(address)
        return out, addresses

    def forged(self, port: int, release: str, slots: list[str], n: int) -> list[bytes]:
        """Hold requests whose challenge signature was tampered with (one character)."""
        out = []
        for i in range(n):
            address = self.address()
            text, nonces = self.challenge(release, address)
            at = len(text) - 6
            forged = text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1 :]
            body = json.dumps(
                {"slot_id": slots[i % len(slots)], "challenge": forged, "nonces": nonces}
            )
            out.append(
                raw_request("POST", "/v1/holds", port, body.encode(), {"X-Forwarded-For": address})
            )
        return out


def applicant(i: int, tag: str) -> dict[str, str]:
    """A person of their own for each ``i`` (and run ``tag``): document number and email."""
    return {
        "family_name": f"Banc{i}",
        "given_names": "Aminata",
        "birth_date": "1990-04-01",
        "id_number": f"BX{tag}{i:08d}",
        "email": f"bench{tag.lower()}{i}@example.org",
    }


def confirm_requests(port: int, holds: list[tuple[str, str, str]], tag: str) -> list[bytes]:
    """One confirm per (hold id, hold token, address), each for a different applicant."""
    out = []
    for i, (hold_id, token, address) in enumerate(holds):
        body = json.dumps({"applicant": applicant(i, tag)}).encode()
        out.append(
            raw_request(
                "POST",
                f"/v1/holds/{hold_id}/confirm",
                port,
                body,
                {"Authorization": f"Bearer {token}", "X-Forwarded-For": address},
            )
        )
    return out


async def seed(port: int, admin: str, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """A site, and one fcfs release per shape (slots, capacity), open since an hour ago, its
    slots from the day after tomorrow on (12 a day, 15 minutes each)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {admin}"}
    base = f"http://{HOST}:{port}"
    now = datetime.now(UTC)
    first = (now + timedelta(days=2)).replace(hour=7, minute=0, second=0, microsecond=0)
    async with aiohttp.ClientSession(
        headers=headers, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        site = {
            "name": "Banc d'essai",
            "timezone": "Europe/Paris",
            "procedures": [{"id": "bench", "name": "Bench"}],
        }
        async with session.put(f"{base}/v1/admin/sites/bench", json=site) as r:
            if r.status != 200:
                raise SystemExit(f"bench: PUT site: {r.status} {await r.text()}")
        releases = {}
        for name, (count, capacity) in shapes.items():
            slots = [
                {
                    "starts_at": (
                        first + timedelta(days=k // 12, minutes=15 * (k % 12))
                    ).isoformat(),
                    "duration_minutes": 15,
                    "capacity": capacity,
                }
                for k in range(count)
            ]
            body = {
                "site": "bench",
                "procedure": "bench",
                "mode": "fcfs",
                "opens_at": (now - timedelta(hours=1)).isoformat(),
                "slots": slots,
            }
            async with session.post(f"{base}/v1/admin/releases", json=body) as r:
                if r.status != 201:
                    raise SystemExit(f"bench: POST release: {r.status} {await r.text()}")
                made = (await r.json())["release"]
            releases[name] = {"id": made["id"], "slots": [s["id"] for s in made["slots"]]}
    return releases


async def block_address(port: int, release: str, address: str) -> dict[str, Any]:
    """Ask for challenges from ``address`` until its bucket is found empty (429, address)."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(10):
            async with session.post(
                f"http://{HOST}:{port}/v1/challenges",
                json={"release": release},
                headers={"X-Forwarded-For": address},
            ) as r:
                body = await r.json(content_type=None)
                if r.status == 429:
                    if body.get("level") != "address":
                        raise SystemExit(f"bench: blocked at the wrong level: {body}")
                    return dict(body)
    raise SystemExit("bench: the address was never refused; is GUICHET_LIMIT_ADDRESS tiny?")


# Running ----------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    request: str
    expect: int
    workers: int
    pinned: bool
    measured: Measured
    engine_statuses: dict[str, int]
    cpu: dict[str, Any]
    ratio: float | None = None
    # A goal's ceiling: the mean of the hello world's runs just before and just after it.
    ceiling: float | None = None
    goal: str = ""
    met: bool | None = None
    # The machine's load average after the run: other work on the machine shows here.
    loadavg: tuple[float, float, float] = field(default_factory=os.getloadavg)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="guichet-bench-"))
        wrk_binary = None if args.no_wrk else shutil.which("wrk")
        self.wrk = Wrk(wrk_binary, self.workdir) if wrk_binary else None
        self.maintenance, self.dsn, self.redis = bench_urls()
        self.secret = secrets.token_urlsafe(48)
        self.admin = secrets.token_urlsafe(24)
        self.minter = Minter(self.secret)
        self.tag = "".join(secrets.choice("ABCDEFGHJKMNPQRSTVWXYZ") for _ in range(4))
        self.servers: list[Server] = []
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.redis_pid: int | None = None
        self.hold_rps = 0.0
        self.gc_names: dict[int, str] = {}
        self.gc: dict[str, dict[str, float]] = {}
        self.releases: dict[str, Any] = {}
        self.commit = "unknown"
        self.hello: Server | None = None  # the ceiling's server, up through the pinned runs
        self.pinning = hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2

    # processes

    def _pin_self(self, cpus: set[int] | None) -> None:
        if self.pinning:
            os.sched_setaffinity(0, cpus or set(range(os.cpu_count() or 1)))

    async def start_engine(self, name: str, workers: int, pinned: bool, **extra: str) -> Server:
        env = engine_env(
            self.dsn,
            self.redis,
            self.secret,
            self.admin,
            self.workdir,
            workers,
            **dict(self.args.set),
            **extra,
        )
        if self.args.gc_log:
            probe = self.workdir / "gcprobe"
            probe.mkdir(exist_ok=True)
            (probe / "sitecustomize.py").write_text(_GC_PROBE)
            (self.workdir / "gc").mkdir(exist_ok=True)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(probe), env.get("PYTHONPATH")]))
            env["BENCH_GC_DIR"] = str(self.workdir / "gc")
        server = Server(
            name,
            [sys.executable, "-m", "engine", "serve"],
            env,
            self.workdir,
            ENGINE_CPUS if pinned and self.pinning else None,
        )
        self.servers.append(server)
        server.start()
        await server.wait_ready(workers)
        self.gc_names.update({pid: name for pid in server.pids()})
        return server

    async def start_hello(self) -> Server:
        return await self._start_reference("hello", "--hello-server")

    async def start_floor(self) -> Server:
        return await self._start_reference("floor", "--floor-server", "--redis-url", self.redis)

    async def _start_reference(self, name: str, *args: str) -> Server:
        """One of this script's reference servers, pinned where the engine runs."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUICHET_")}
        server = Server(
            name,
            [sys.executable, str(SCRIPT), *args, "--port", "{port}"],
            env,
            self.workdir,
            ENGINE_CPUS if self.pinning else None,
        )
        self.servers.append(server)
        server.start()
        await server.wait_ready()
        return server

    def stop(self, server: Server) -> None:
        server.stop()
        with contextlib.suppress(ValueError):
            self.servers.remove(server)

    def stop_all(self) -> None:
        for server in list(self.servers):
            self.stop(server)

    # measuring

    async def measure(
        self,
        server: Server,
        key: str,
        label: str,
        request: str,
        expect: int,
        *,
        workers: int = 1,
        pinned: bool = True,
        route: str | None = None,
        path: str = "/",
        headers: dict[str, str] | None = None,
        requests: Sequence[bytes] | None = None,
        warmup_requests: Sequence[bytes] | None = None,
        unique: bool = False,
    ) -> Row:
        a = self.args
        before = await engine_counts(server.port) if route else Counter()
        watch = UsageWatch(server.pids(), self.redis_pid, load_is_child=self.wrk is not None)
        if self.wrk is not None:
            measured = await self.wrk.measure(
                server.port,
                connections=a.connections,
                duration_s=a.duration,
                warmup_s=a.warmup,
                path=path,
                headers=headers,
                requests=requests,
                warmup_requests=warmup_requests,
                on_start=watch.start,
                unique=unique,
            )
        else:
            reqs = (
                list(requests)
                if requests is not None
                else [raw_request("GET", path, server.port, headers=headers)]
            )
            if warmup_requests is not None:
                await closed_loop(
                    server.port,
                    warmup_requests,
                    connections=a.connections,
                    duration_s=a.warmup,
                    warmup_s=0,
                    cycle=not unique,
                )
                warm = 0.0
            else:
                warm = a.warmup
            watch.start()
            measured = await closed_loop(
                server.port,
                reqs,
                connections=a.connections,
                duration_s=a.duration,
                warmup_s=warm,
                cycle=not unique,
            )
        cpu = watch.stop()
        statuses: dict[str, int] = {}
        if route:
            after = await engine_counts(server.port)
            for (r, _m, status), n in (after - before).items():
                if r == route:
                    statuses[status] = statuses.get(status, 0) + n
        row = Row(key, label, request, expect, workers, pinned, measured, statuses, cpu)
        self.rows.append(row)
        self._check(row)
        split = cpu.get("engine_by_process")
        print(
            f"  {label:<44} {measured.rps:>9,.0f} req/s  p99 {measured.p99_ms:>7.2f} ms"
            + (f"  (CPU % by process: {split})" if split else ""),
            flush=True,
        )
        return row

    def _check(self, row: Row) -> None:
        m = row.measured
        wrong = {s: n for s, n in row.engine_statuses.items() if s != str(row.expect)}
        if wrong:
            self.notes.append(f"{row.label}: unexpected statuses at the engine: {wrong}")
        if m.exhausted:
            self.notes.append(
                f"{row.label}: ran out of unique requests (re-sent some): the number is not valid"
            )
        if m.errors:
            self.notes.append(f"{row.label}: {m.errors} socket errors or timeouts")
        if row.expect < 400 and m.http_errors:
            # Rows without the engine's counts (the ceiling, the floor) show failures here.
            self.notes.append(f"{row.label}: {m.http_errors} replies of 400 or more")

    # the run

    async def run(self) -> dict[str, Any]:
        a = self.args
        started = datetime.now(UTC)
        t_start = time.monotonic()
        machine = machine_info()
        self.commit = engine_commit()
        print(
            f"bench: {machine['cpus']} x {machine['cpu_model']}, load generator: "
            f"{'wrk' if self.wrk else 'asyncio client (wrk not found)'}",
            flush=True,
        )
        if not self.pinning:
            self.notes.append("no CPU pinning (needs Linux and 2 cores): everything shares")
        cancel_on_sigterm()
        try:
            await reset_database(self.maintenance, self.dsn)
            self.redis_pid = await flush_redis(self.redis)
            self._pin_self(LOAD_CPUS)
            await self._pinned_runs()
            if not a.skip_scaling:
                self._pin_self(None)
                await self._scaling_runs()
        finally:
            self.stop_all()
            self._pin_self(None)
            with contextlib.suppress(Exception):
                await flush_redis(self.redis)
            if a.gc_log:
                self.gc = gc_summary(self.workdir / "gc", self.gc_names)
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._judge()
        return {
            "date": started.isoformat(timespec="seconds"),
            "command": " ".join(["python", "loadtests/bench.py", *sys.argv[1:]]),
            "wall_s": round(time.monotonic() - t_start, 1),
            "engine_commit": self.commit,
            "machine": machine,
            "load_generator": "wrk " + _wrk_version() if self.wrk else "asyncio (bench.py)",
            "settings": {
                "duration_s": a.duration,
                "warmup_s": a.warmup,
                "connections": a.connections,
                "open_loop_s": a.open_duration,
                "pinning": "engine on cpu1, load generator on cpu0" if self.pinning else "none",
                "engine_env": {**GENEROUS, **dict(a.set)},
                "blocked_engine_env": {"GUICHET_LIMIT_ADDRESS": "2/1h"},
                "database": BENCH_DB,
                "redis_db": BENCH_REDIS_DB,
            },
            "ceiling_rps": self.ceiling,
            "rows": [asdict(r) for r in self.rows],
            "gc_pauses": self.gc,
            "notes": self.notes,
        }

    def _unique_count(self, guess_rps: float, seconds: float) -> int:
        return int(guess_rps * seconds * 1.3) + 500

    async def _pinned_runs(self) -> None:
        print("ceiling", flush=True)
        # The hello world stays up (idle, on the engine's core) to be measured next to each
        # goal's run.
        hello = self.hello = await self.start_hello()
        ceiling = await self.measure(hello, "ceiling", "ceiling: hello world (first)", "GET /", 200)
        if self._wanted("open"):
            # The ceiling in open loop too: what 80 % of a closed-loop peak leaves any
            # aiohttp server on this machine, before the engine's own cost.
            get = raw_request("GET", "/", hello.port)
            await self._open_runs(
                hello,
                "ceiling",
                "ceiling: hello world",
                "GET /",
                200,
                ceiling.measured.rps,
                lambda n: [get] * n,
            )

        engine = await self.start_engine("engine", 1, pinned=True)
        port = engine.port
        rel = await seed(
            port,
            self.admin,
            {
                "list120": (120, 2),
                "list12": (12, 2),
                "hold": (40, 10000),
                "open": (40, 10000),
                "confirm": (40, 10000),
                "forged": (40, 10000),
                **{f"hold_w{w}": (40, 10000) for w in (1, 2, 4)},
            },
        )
        self.releases = rel
        if self._wanted("slots"):
            await self._slot_runs(engine)
        if self._wanted("hold") or self._wanted("open"):
            await self._hold_run(engine)
        if self._wanted("open"):
            # Right after the peak it is a fraction of: the machine's speed drifts.
            await self._open_run(engine)
        if self._wanted("forged"):
            await self._forged_run(engine)
        if self._wanted("confirm"):
            print("confirm", flush=True)
            await self._confirm(engine)
        self.stop(engine)
        if self._wanted("floor"):
            await self._floor_runs()
        if self._wanted("blocked"):
            await self._blocked_runs()

        print("ceiling again", flush=True)
        await self.measure(hello, "ceiling_end", "ceiling: hello world (last)", "GET /", 200)
        self.stop(hello)
        self.hello = None

    async def _goal_run(self, key: str, measure: Callable[[], Awaitable[Row]]) -> Row:
        """``measure()``, flanked by the ceiling if ``key`` has a goal stated as a ratio."""
        if GOALS.get(key, ("", 0.0))[0] == "ratio":
            return await self._flanked(key, measure)
        return await measure()

    async def _flanked(self, key: str, measure: Callable[[], Awaitable[Row]]) -> Row:
        """A goal's run, with the ceiling measured just before it (unless the run before
        was one) and just after: its ratio is to their mean. A shared VM's speed drifts
        within a run (BENCHMARKS.md, "How it measures"), and a goal's ratio must compare the
        engine with the machine as it was at that moment."""
        assert self.hello is not None
        last = self.rows[-1] if self.rows else None
        if last is not None and _is_ceiling(last.key):
            before = last.measured.rps
        else:
            before = await self._ceiling_next_to(f"before {key}")
        row = await measure()
        after = await self._ceiling_next_to(f"after {key}")
        row.ceiling = round((before + after) / 2, 1)
        self.notes.append(
            f"{row.label}: ceiling {before:,.0f} just before, {after:,.0f} just after"
        )
        return row

    async def _ceiling_next_to(self, where: str) -> float:
        assert self.hello is not None
        n = sum(1 for r in self.rows if r.key.startswith("ceiling_next"))
        row = await self.measure(
            self.hello, f"ceiling_next{n + 1}", f"ceiling: hello world ({where})", "GET /", 200
        )
        return row.measured.rps

    def _wanted(self, scenario: str) -> bool:
        return not self.args.only or scenario in self.args.only

    async def _slot_runs(self, engine: Server) -> None:
        rel = self.releases
        slots_route = "/v1/releases/{release}/slots"
        print("slot listing", flush=True)
        for key, label, name, headers in (
            ("slots", "slot listing, 120 slots", "list120", BROWSER),
            ("slots12", "slot listing, 12 slots", "list12", BROWSER),
            ("slots_plain", "slot listing, 120 slots, not gzipped", "list120", None),
        ):
            path = f"/v1/releases/{rel[name]['id']}/slots"
            await self._goal_run(
                key,
                functools.partial(
                    self.measure,
                    engine,
                    key,
                    label,
                    f"GET {slots_route}",
                    200,
                    route=slots_route,
                    path=path,
                    headers=headers,
                ),
            )

    async def _hold_run(self, engine: Server) -> None:
        a, rel, port = self.args, self.releases, engine.port
        print("holds", flush=True)
        guess = a.hold_guess
        warm, _ = self.minter.holds(
            port, rel["hold"]["id"], rel["hold"]["slots"], self._unique_count(guess, a.warmup)
        )
        main, _ = self.minter.holds(
            port, rel["hold"]["id"], rel["hold"]["slots"], self._unique_count(guess, a.duration)
        )
        hold = await self._goal_run(
            "hold",
            lambda: self.measure(
                engine,
                "hold",
                "hold (POST /v1/holds)",
                "POST /v1/holds",
                201,
                route="/v1/holds",
                requests=main,
                warmup_requests=warm,
                unique=True,
            ),
        )
        self.hold_rps = hold.measured.rps
        await drop_holds(self.redis, rel["hold"]["id"])

    async def _forged_run(self, engine: Server) -> None:
        rel, port = self.releases, engine.port
        print("forged challenge", flush=True)
        forged = self.minter.forged(port, rel["forged"]["id"], rel["forged"]["slots"], 2000)
        await self.measure(
            engine,
            "forged",
            "refusal: forged challenge (403)",
            "POST /v1/holds",
            403,
            route="/v1/holds",
            requests=forged,
        )

    async def _open_runs(
        self,
        server: Server,
        key: str,
        label: str,
        request: str,
        expect: int,
        peak: float,
        requests: Callable[[int], Sequence[bytes]],
        route: str | None = None,
        release: str | None = None,
    ) -> None:
        """Open-loop runs of one server at each of ``--open-fractions`` of its closed-loop
        ``peak``; the holds of ``release`` are dropped after each."""
        a = self.args
        # Lower fractions first: each run's holds are dropped, so none pays for another's.
        for fraction in sorted(a.open_fractions):
            percent = round(100 * fraction)
            run_label = f"{label}, open loop at {percent} % of peak"
            print(run_label, flush=True)
            rate = fraction * peak
            reqs = requests(int(rate * a.open_duration) + 10)
            before = await engine_counts(server.port) if route else Counter()
            watch = UsageWatch(server.pids(), self.redis_pid, load_is_child=False)
            watch.start()
            measured = await open_loop(server.port, reqs, rate=rate, duration_s=a.open_duration)
            if release is not None:
                await drop_holds(self.redis, release)
            cpu = watch.stop()
            statuses: dict[str, int] = {}
            if route:
                diff = await engine_counts(server.port) - before
                statuses = {s: n for (r, _m, s), n in diff.items() if r == route}
            row = Row(
                f"{key}_open{percent}", run_label, request, expect, 1, True, measured, statuses, cpu
            )
            self.rows.append(row)
            self._check(row)
            print(
                f"  {row.label:<44} {measured.rps:>9,.0f} req/s  p99 {measured.p99_ms:>7.2f} ms"
                f" (target {rate:,.0f}/s)",
                flush=True,
            )

    async def _open_run(self, engine: Server) -> None:
        rel, port = self.releases["open"], engine.port
        await self._open_runs(
            engine,
            "hold",
            "hold",
            "POST /v1/holds",
            201,
            self.hold_rps,
            lambda n: self.minter.holds(port, rel["id"], rel["slots"], n)[0],
            route="/v1/holds",
            release=rel["id"],
        )

    async def _floor_runs(self) -> None:
        """The floor of a hold (``floor_app``), closed loop, then open loop if wanted."""
        rel = self.releases["open"]
        print("floor of a hold: body, one Redis script call, JSON answer", flush=True)
        floor = await self.start_floor()

        def holds(n: int) -> Sequence[bytes]:
            return self.minter.holds(floor.port, rel["id"], rel["slots"], n)[0]

        # Each hold gets a new id whatever its request: a few thousand requests, re-sent.
        row = await self.measure(
            floor,
            "floor",
            "floor of a hold (aiohttp + 1 Redis call)",
            "POST /v1/holds",
            201,
            requests=holds(4000),
        )
        if self._wanted("open"):
            await self._open_runs(
                floor, "floor", "floor of a hold", "POST /v1/holds", 201, row.measured.rps, holds
            )
        self.stop(floor)

    async def _blocked_runs(self) -> None:
        rel = self.releases
        print("blocked client (second engine: GUICHET_LIMIT_ADDRESS=2/1h)", flush=True)
        blocked = await self.start_engine(
            "engine-blocked", 1, pinned=True, GUICHET_LIMIT_ADDRESS="2/1h"
        )
        address = BLOCKED_ADDRESS
        refusal = await block_address(blocked.port, rel["hold"]["id"], address)
        self.notes.append(
            f"blocked client: {address} refused with {refusal.get('title')!r}, "
            f"retry after {refusal.get('retry_after')} s, before the runs"
        )
        body = json.dumps({"release": rel["hold"]["id"]}).encode()
        await self._goal_run(
            "blocked_challenge",
            lambda: self.measure(
                blocked,
                "blocked_challenge",
                "refusal: blocked client, POST /v1/challenges",
                "POST /v1/challenges",
                429,
                route="/v1/challenges",
                requests=[
                    raw_request(
                        "POST", "/v1/challenges", blocked.port, body, {"X-Forwarded-For": address}
                    )
                ],
            ),
        )
        self.stop(blocked)

    async def _confirm(self, engine: Server) -> None:
        """Take holds (through the API, one address each), then confirm them under load."""
        a = self.args
        rel = self.releases["confirm"]
        n = self._unique_count(a.confirm_guess, a.duration + a.warmup)
        reqs, addresses = self.minter.holds(engine.port, rel["id"], rel["slots"], n)
        replies: dict[int, tuple[int, bytes]] = {}
        t0 = time.monotonic()
        await closed_loop(
            engine.port,
            reqs,
            connections=64,
            duration_s=120,
            warmup_s=0,
            cycle=False,
            replies=replies,
        )
        taken = []
        for i, (status, body) in sorted(replies.items()):
            if status == 201:
                hold = json.loads(body)
                taken.append((hold["hold_id"], hold["hold_token"], addresses[i]))
        self.notes.append(
            f"confirm: {len(taken)} holds taken beforehand in {time.monotonic() - t0:.1f} s"
        )
        if len(taken) < n:
            self.notes.append(f"confirm: only {len(taken)} of {n} holds were granted")
        confirms = confirm_requests(engine.port, taken, self.tag)
        cut = self._unique_count(a.confirm_guess, a.warmup) if a.warmup else 0
        await self.measure(
            engine,
            "confirm",
            "confirm (POST /v1/holds/{id}/confirm)",
            "POST /v1/holds/{hold_id}/confirm",
            201,
            route="/v1/holds/{hold_id}/confirm",
            requests=confirms[cut:],
            warmup_requests=confirms[:cut] or None,
            unique=True,
        )
        await drop_holds(self.redis, rel["id"])

    async def _scaling_runs(self) -> None:
        a = self.args
        print(
            "scaling (nothing pinned: engine, load generator, Redis and PostgreSQL share "
            "both cores)",
            flush=True,
        )
        slots_route = "/v1/releases/{release}/slots"
        rel = self.releases
        for workers in (1, 2, 4):
            engine = await self.start_engine(f"engine-w{workers}", workers, pinned=False)
            path = f"/v1/releases/{rel['list120']['id']}/slots"
            await self.measure(
                engine,
                f"scale_slots_w{workers}",
                f"slot listing, 120 slots, {workers} worker(s)",
                f"GET {slots_route}",
                200,
                workers=workers,
                pinned=False,
                route=slots_route,
                path=path,
                headers=BROWSER,
            )
            guess = max(a.hold_guess, self.hold_rps * 2.5)
            r = rel[f"hold_w{workers}"]
            warm, _ = self.minter.holds(
                engine.port, r["id"], r["slots"], self._unique_count(guess, a.warmup)
            )
            main, _ = self.minter.holds(
                engine.port, r["id"], r["slots"], self._unique_count(guess, a.duration)
            )
            await self.measure(
                engine,
                f"scale_hold_w{workers}",
                f"hold, {workers} worker(s)",
                "POST /v1/holds",
                201,
                workers=workers,
                pinned=False,
                route="/v1/holds",
                requests=main,
                warmup_requests=warm,
                unique=True,
            )
            await drop_holds(self.redis, r["id"])
            self.stop(engine)

    def _judge(self) -> None:
        rows = {r.key: r for r in self.rows}
        # A goal's ratio is to the ceiling measured next to it (``_flanked``); the other rows'
        # to the mean of every closed-loop ceiling of the run (their spread says how much the
        # machine drifted during the run).
        ceilings = [r.measured.rps for r in self.rows if _is_ceiling(r.key)]
        ceiling = sum(ceilings) / len(ceilings) if ceilings else math.nan
        self.ceiling = round(ceiling, 1)
        if len(ceilings) >= 2:
            spread = (max(ceilings) - min(ceilings)) / ceiling
            self.notes.append(
                f"ceiling: {len(ceilings)} runs, {min(ceilings):,.0f} to {max(ceilings):,.0f} "
                f"req/s, mean {ceiling:,.0f} (spread {100 * spread:.0f} %)"
            )
        for row in self.rows:
            if row.pinned and not row.key.startswith("ceiling") and "_open" not in row.key:
                row.ratio = round(row.measured.rps / (row.ceiling or ceiling), 3)
            goal = GOALS.get(row.key)
            if goal is None:
                continue
            kind, value = goal
            if kind == "ratio":
                row.goal = f">= {value:.1f} x ceiling"
                row.met = row.ratio is not None and row.ratio >= value
            else:
                row.goal = f">= {value:,.0f} req/s"
                row.met = row.measured.rps >= value
        if "hold_open80" in rows:
            open80 = rows["hold_open80"]
            open80.goal = f"p99 < {HOLD_P99_GOAL_MS:.0f} ms"
            open80.met = open80.measured.p99_ms < HOLD_P99_GOAL_MS
            hello80 = rows.get("ceiling_open80")
            if hello80 is not None and hello80.measured.p99_ms >= HOLD_P99_GOAL_MS:
                self.notes.append(
                    f"the hello world's own p99 at 80 % of its peak was "
                    f"{hello80.measured.p99_ms:,.1f} ms: in this run the machine let no aiohttp "
                    f"server meet the hold's p99 goal"
                )
        for row in self.rows:
            total = sum(row.engine_statuses.values())
            wrong = total - row.engine_statuses.get(str(row.expect), 0) + row.measured.errors
            if row.met is not None and (row.measured.exhausted or not total or wrong > total / 100):
                # A rate that counts re-sent requests, answers other than the path's or
                # failed connections (over 1 %: cheap refusals padding a hold's rate), or
                # answers the engine did not count (its metrics unread), proves nothing.
                row.met = False
        if self.wrk is None:
            self.notes.append(
                "wrk not found: this script's asyncio client generated the load. It drove the "
                "hello ceiling about as hard as wrk here, but check the generator's CPU (gen "
                "%, cpu0_busy): a saturated generator understates the ceiling"
            )


def _is_ceiling(key: str) -> bool:
    """A closed-loop run of the hello world (the ceiling's open-loop runs are not)."""
    return key.startswith("ceiling") and "_open" not in key


def engine_commit() -> str:
    """The commit the engine was measured at, with "+changes" if the tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "engine", "sql"],  # a new migration counts
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("+changes" if dirty else "") if head else "unknown"


def _wrk_version() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        return ""
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).split("[")[0].replace("wrk", "").strip()


def _verdict(row: dict[str, Any]) -> str:
    if row["measured"].get("exhausted"):
        return "NOT valid: ran out of unique requests"
    return "met" if row["met"] else "NOT met"


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print()
    print(
        f"guichet benchmark, {report['date']}, {m['cpus']} x {m['cpu_model']}, "
        f"{m['memory_gib']} GiB, Python {m['python']}"
    )
    print(
        f"load generator: {report['load_generator']}; {report['settings']['pinning']}; "
        f"{report['settings']['connections']} connections, "
        f"{report['settings']['duration_s']} s per run after {report['settings']['warmup_s']} s "
        f"of warm-up; whole run {report['wall_s']} s; engine at commit {report['engine_commit']}"
    )
    header = (
        f"{'scenario':<46} {'w':>1} {'req/s':>9} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'x ceil':>6} {'eng %':>5} {'gen %':>5} {'redis%':>6} {'pg %':>5} "
        f"{'RSS MiB':>7}  goal"
    )
    print()
    print(header)
    print("-" * len(header) + "-" * 20)
    for r in report["rows"]:
        mm = r["measured"]
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else ""
        goal = ""
        if r["goal"]:
            goal = f"{r['goal']}: {_verdict(r)}"
        rate = f"{mm['rps']:>9,.0f}"
        if mm.get("target_rps"):
            goal = f"(target {mm['target_rps']:,.0f}/s) " + goal
        cpu = r["cpu"]
        if cpu.get("engine_by_process"):
            workers = cpu["engine_by_process"][1:]  # the supervisor comes first
            goal = "CPU % by worker: " + "/".join(f"{w:.0f}" for w in workers)
        print(
            f"{r['label']:<46} {r['workers']:>1} {rate} {mm['p50_ms']:>7.2f} {mm['p95_ms']:>7.2f} "
            f"{mm['p99_ms']:>7.2f} {ratio:>6} {cpu.get('engine', 0):>5.0f} "
            f"{cpu.get('load', 0):>5.0f} {cpu.get('redis', 0):>6.0f} "
            f"{cpu.get('postgres', 0):>5.0f} {cpu.get('rss_mib', 0):>7.0f}  {goal}"
        )
    print(
        f"\ngoals of one worker process (a ratio is to the ceiling measured next to it; "
        f"the run's mean: {report['ceiling_rps']:,.0f} req/s):"
    )
    for r in report["rows"]:
        if r["goal"]:
            mm = r["measured"]
            got = ""
            if "ceiling" in r["goal"]:
                got = f"{r['ratio']:.2f} x {r.get('ceiling') or report['ceiling_rps']:,.0f}"
            if "req/s" in r["goal"]:
                got = f"{mm['rps']:,.0f} req/s"
            if "p99" in r["goal"]:
                got = f"p99 {mm['p99_ms']:.1f} ms at {mm['rps']:,.0f} req/s"
            print(f"  {r['label']:<44} {r['goal']:<20} {got:<32} {_verdict(r)}")
    if report.get("gc_pauses"):
        print("\ngarbage collections of 1 ms or more, by engine process:")
        for name, g in report["gc_pauses"].items():
            print(
                f"  {name:<32} {g['over_1ms']:>5.0f} collections, {g['full']:>3.0f} full "
                f"(longest {g['full_max_ms']:.1f} ms), longest of all {g['all_max_ms']:.1f} ms, "
                f"{g['total_ms']:.0f} ms in all"
            )
    if report["notes"]:
        print()
        for note in report["notes"]:
            print(f"note: {note}")


def write_report(report: dict[str, Any], name: str) -> Path:
    out = REPO / "loadtests" / "reports"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"{name}-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


# Profiling --------------------------------------------------------------------------------------

# Where a sample's innermost frame lives, first match wins (py-spy prints short file names).
_CATEGORIES = (
    ("engine/logs.py", "logging (engine.logs)"),
    ("logging/", "logging (stdlib)"),
    ("pydantic", "pydantic validation"),
    ("engine/schemas.py", "pydantic validation"),
    ("json/", "JSON (stdlib json)"),
    ("redis/", "redis-py"),
    ("asyncpg", "asyncpg"),
    ("prometheus_client", "prometheus metrics"),
    ("engine/pow.py", "PoW / HMAC verify"),
    ("hmac.py", "HMAC (tokens, PoW)"),
    ("secrets.py", "random ids (secrets)"),
    ("random.py", "random ids (secrets)"),
    ("ipaddress.py", "ipaddress"),
    ("zoneinfo", "dates and time zones"),
    ("datetime", "dates and time zones"),
    ("aiohttp/", "aiohttp"),
    ("multidict", "aiohttp"),
    ("yarl", "aiohttp"),
    ("asyncio/", "asyncio (stdlib)"),
    ("uvloop", "uvloop"),
    ("engine/", "engine (own code)"),
)


def _file_of(frame: str) -> str:
    m = re.search(r"\(([^()]*)\)\s*$", frame)
    return m.group(1) if m else frame


def _function_of(frame: str) -> str:
    return frame.rsplit(" (", 1)[0] + " (" + _file_of(frame).rsplit(":", 1)[0] + ")"


def analyse_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self time by category and by function, and inclusive time by function, from py-spy's
    raw (collapsed) output."""
    total = 0
    by_category: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        leaf = frames[-1]
        self_time[_function_of(leaf)] += n
        for frame in reversed(frames):
            path = _file_of(frame)
            hit = next((c for pat, c in _CATEGORIES if pat in path), None)
            if hit is not None:
                by_category[hit] += n
                break
        else:
            by_category["other"] += n
        for fn in {_function_of(f) for f in frames}:
            inclusive[fn] += n

    def pct(c: Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, round(100 * v / max(1, total), 1)) for name, v in c.most_common(k)]

    return {
        "samples": total,
        "by_category": pct(by_category, 40),
        "self": pct(self_time, top),
        "inclusive": pct(inclusive, top * 2),
    }


def _py_spy() -> str:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("bench: --profile needs py-spy (pip install py-spy)")
    return spy


async def profile(args: argparse.Namespace) -> None:
    bench = Bench(args)
    if bench.wrk is None:
        raise SystemExit("bench: --profile needs wrk")
    spy = _py_spy()
    secs = args.profile_seconds
    cancel_on_sigterm()
    out_dir = REPO / "loadtests" / "reports"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    raw = out_dir / f"pyspy-{args.profile}-{stamp}.txt"
    try:
        await reset_database(bench.maintenance, bench.dsn)
        bench.redis_pid = await flush_redis(bench.redis)
        bench._pin_self(LOAD_CPUS)
        extra = {"GUICHET_LIMIT_ADDRESS": "2/1h"} if args.profile == "blocked" else {}
        engine = await bench.start_engine("engine-profile", 1, pinned=True, **extra)
        rel = await seed(
            engine.port, bench.admin, {"r": (120 if args.profile == "slots" else 40, 10000)}
        )
        release = rel["r"]
        path = "/"
        requests: list[bytes] | None = None
        if args.profile == "slots":
            path = f"/v1/releases/{release['id']}/slots"
        elif args.profile in ("hold", "open"):
            requests, _ = bench.minter.holds(
                engine.port, release["id"], release["slots"], int(args.hold_guess * (secs + 4))
            )
        elif args.profile == "forged":
            requests = bench.minter.forged(engine.port, release["id"], release["slots"], 2000)
        elif args.profile == "blocked":
            await block_address(engine.port, release["id"], BLOCKED_ADDRESS)
            body = json.dumps({"release": release["id"]}).encode()
            requests = [
                raw_request(
                    "POST",
                    "/v1/challenges",
                    engine.port,
                    body,
                    {"X-Forwarded-For": BLOCKED_ADDRESS},
                )
            ]
        else:
            n = int(args.confirm_guess * (secs + 4))
            reqs, addresses = bench.minter.holds(engine.port, release["id"], release["slots"], n)
            replies: dict[int, tuple[int, bytes]] = {}
            await closed_loop(
                engine.port,
                reqs,
                connections=64,
                duration_s=120,
                warmup_s=0,
                cycle=False,
                replies=replies,
            )
            taken = [
                (json.loads(b)["hold_id"], json.loads(b)["hold_token"], addresses[i])
                for i, (s, b) in sorted(replies.items())
                if s == 201
            ]
            requests = confirm_requests(engine.port, taken, bench.tag)
        spy_argv = [
            spy,
            "record",
            "--pid",
            str(engine.pid),
            "--duration",
            str(secs),
            "--rate",
            str(args.profile_rate),
            "--format",
            "raw",
            "--nolineno",
            "--output",
            str(raw),
        ]
        if args.native:
            spy_argv.append("--native")

        async def record() -> None:
            await asyncio.sleep(1.5)
            code, _out, err = await run_bounded(
                spy_argv, secs + 30, stdout=asyncio.subprocess.DEVNULL
            )
            if code != 0:
                print(err.decode(errors="replace"), file=sys.stderr)

        if args.profile == "open":
            assert requests is not None
            driver = open_loop(engine.port, requests, rate=args.open_rate, duration_s=secs + 3)
        else:
            driver = bench.wrk.measure(
                engine.port,
                connections=args.connections,
                duration_s=secs + 3,
                warmup_s=0,
                path=path,
                headers=BROWSER if args.profile == "slots" else None,
                requests=requests,
            )
        load, _ = await asyncio.gather(driver, record())
    finally:
        bench.stop_all()
        bench._pin_self(None)
        with contextlib.suppress(Exception):
            await flush_redis(bench.redis)
        shutil.rmtree(bench.workdir, ignore_errors=True)
    print(
        f"\nunder py-spy ({args.profile_rate} Hz): {load.rps:,.0f} req/s, p99 {load.p99_ms} ms, "
        f"{load.http_errors} replies >= 400, exhausted={load.exhausted}"
    )
    result = analyse_profile(raw)
    print(f"{result['samples']} samples of the worker while busy (idle samples are not taken)")
    for title, key in (
        ("self time by category", "by_category"),
        ("self time by function", "self"),
        ("inclusive time by function", "inclusive"),
    ):
        print(f"\n{title}:")
        for name, share in result[key]:
            print(f"  {share:5.1f} %  {name}")
    result["load"] = asdict(load)
    result["raw"] = str(raw)
    path_json = write_report(result, f"pyspy-{args.profile}")
    print(f"\nraw stacks: {raw}\nsummary: {path_json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=6, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up before each")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--open-duration",
        type=float,
        default=8.0,
        help="seconds of the open-loop run at 80 %% of the hold peak",
    )
    parser.add_argument(
        "--hold-guess",
        type=float,
        default=12000.0,
        help="most holds per second expected (sizes the unique requests)",
    )
    parser.add_argument(
        "--confirm-guess",
        type=float,
        default=4000.0,
        help="most confirms per second expected (sizes the holds taken)",
    )
    parser.add_argument("--no-wrk", action="store_true", help="use the asyncio client")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument(
        "--open-fractions",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[0.8],
        help="fractions of the hold peak for the open-loop runs (default 0.8, the goal's)",
    )
    parser.add_argument(
        "--gc-log",
        action="store_true",
        help="record each engine process's garbage-collection pauses (1 ms or more)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="GUICHET_NAME=VALUE",
        type=lambda text: tuple(text.split("=", 1)),
        help="an engine setting for every engine the run starts (repeatable)",
    )
    parser.add_argument(
        "--only",
        type=lambda text: set(text.split(",")),
        default=set(),
        help="comma-separated subset of: " + ", ".join(SCENARIOS) + " (the ceiling always runs)",
    )
    parser.add_argument("--profile", choices=PROFILE_TARGETS)
    parser.add_argument("--profile-seconds", type=int, default=12)
    parser.add_argument(
        "--open-rate", type=float, default=1600, help="holds per second for --profile open"
    )
    parser.add_argument("--profile-rate", type=int, default=200)
    parser.add_argument("--native", action="store_true", help="py-spy --native")
    parser.add_argument("--hello-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hello_server:
        serve_app(hello_app(), args.port)
        return
    if args.floor_server:
        serve_app(floor_app(args.redis_url), args.port)
        return
    from engine.settings import unknown_variables

    unknown = [n for n, _ in args.set if not n.startswith("GUICHET_") or unknown_variables({n: ""})]
    if unknown:
        parser.error(f"--set names what is not an engine setting: {', '.join(unknown)}")
    import uvloop

    try:
        if args.profile:
            uvloop.run(profile(args))
            return
        report = uvloop.run(Bench(args).run())
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise SystemExit("bench: interrupted (the processes it started are stopped)") from None
    print_table(report)
    print(f"\nreport: {write_report(report, 'bench')}")


if __name__ == "__main__":
    main()
