"""Several engine processes, as ``guichet serve`` runs them: separate processes share the
work through Redis and PostgreSQL only; one supervisor's workers each get connections, report
their metrics as one engine, and stop on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from engine import sweeper
from engine.app import create_app
from engine.pow import solve
from engine.serve import BACKLOG, backlog_cap, restart_pause
from tests.api import ADMIN, ADMIN_TOKEN, applicant
from tests.conftest import DATABASE_URL, REDIS_URL, make_settings
from tests.procs import (
    Engine,
    RedisServer,
    alive,
    children,
    exists,
    poll,
    running,
    unread,
)

SECRET = "workers-test-secret-" + "y" * 32
StartEngine = Callable[[str, dict[str, str]], Awaitable[Engine]]
CLIENT = {"X-Forwarded-For": "10.1.2.3"}
# Bound on an app's shutdown, which takes milliseconds: past it, the shutdown hangs.
HANG_S = 5.0


def engine_env(workers: int) -> dict[str, str]:
    return {
        "GUICHET_DATABASE_URL": DATABASE_URL,
        "GUICHET_REDIS_URL": REDIS_URL,
        "GUICHET_SECRET": SECRET,
        "GUICHET_ADMIN_TOKEN": ADMIN_TOKEN,
        "GUICHET_TRUSTED_PROXIES": "127.0.0.1",
        "GUICHET_POW_DIFFICULTY": "4",
        "GUICHET_POW_PUZZLES": "2",
        "GUICHET_WORKERS": str(workers),
    }


@pytest.fixture
async def start_engine(tmp_path: Path) -> AsyncIterator[StartEngine]:
    """Start ``python -m engine serve`` processes; every one is stopped at teardown, and its
    output printed (pytest shows it when the test failed)."""
    started: list[Engine] = []

    async def start(name: str, env: dict[str, str]) -> Engine:
        engine = Engine(tmp_path, name, env)
        started.append(engine)
        engine.start()
        await engine.wait_ready()
        return engine

    try:
        yield start
    finally:
        for engine in started:
            engine.stop()
            print(engine.describe())


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with session.request(method, url, json=body, headers=headers) as r:
        if "json" in r.headers.get("Content-Type", ""):
            return r.status, await r.json(content_type=None)
        return r.status, await r.text()


async def test_a_challenge_from_one_process_pays_for_a_hold_on_another(
    clean: None, start_engine: StartEngine
) -> None:
    a = await start_engine("a", engine_env(workers=1))
    b = await start_engine("b", engine_env(workers=1))
    async with aiohttp.ClientSession() as s:
        status, body = await call(
            s,
            "PUT",
            f"{a.base_url}/v1/admin/sites/bobigny",
            {
                "name": "Bobigny",
                "timezone": "Europe/Paris",
                "procedures": [{"id": "titre", "name": "Titre"}],
            },
            ADMIN,
        )
        assert status == 200, body
        now = datetime.now(UTC)
        status, body = await call(
            s,
            "POST",
            f"{a.base_url}/v1/admin/releases",
            {
                "site": "bobigny",
                "procedure": "titre",
                "mode": "fcfs",
                "opens_at": (now - timedelta(minutes=1)).isoformat(),
                "slots": [
                    {
                        "starts_at": (now + timedelta(days=2)).isoformat(),
                        "duration_minutes": 15,
                        "capacity": 2,
                    }
                ],
            },
            ADMIN,
        )
        assert status == 201, body
        release = body["release"]["id"]
        slot = body["release"]["slots"][0]["id"]

        status, challenge = await call(
            s, "POST", f"{a.base_url}/v1/challenges", {"release": release}, CLIENT
        )
        assert status == 201, challenge
        paid = {
            "slot_id": slot,
            "challenge": challenge["challenge"],
            "nonces": solve(challenge["challenge"], challenge["difficulty"], challenge["puzzles"]),
        }
        status, hold = await call(s, "POST", f"{b.base_url}/v1/holds", paid, CLIENT)
        assert status == 201, hold
        # The challenge lives in the shared Redis: the same request retried on A gets B's
        # hold back (a lost reply is safe to retry), and nothing more.
        status, again = await call(s, "POST", f"{a.base_url}/v1/holds", paid, CLIENT)
        assert status == 201 and again["hold_id"] == hold["hold_id"], again

        token = {"Authorization": f"Bearer {hold['hold_token']}", **CLIENT}
        person = applicant()
        status, done = await call(
            s,
            "POST",
            f"{a.base_url}/v1/holds/{hold['hold_id']}/confirm",
            {"applicant": person},
            token,
        )
        assert status == 201, done
        assert done["booking"]["status"] == "confirmed"
        assert done["booking"]["slot"]["id"] == slot

        cancel = {"Authorization": f"Bearer {done['cancel_token']}"}
        reference = done["booking"]["reference"]
        status, read = await call(s, "GET", f"{b.base_url}/v1/bookings/{reference}", None, cancel)
        assert status == 200 and read["booking"] == done["booking"], read
        # Spent on B means spent for A too, once its hold is gone.
        status, again = await call(s, "POST", f"{a.base_url}/v1/holds", paid, CLIENT)
        assert status == 410 and again["type"] == "/problems/challenge-expired", again
        # B never listed this release, so its listing is fresh: one place left.
        status, listing = await call(s, "GET", f"{b.base_url}/v1/releases/{release}/slots")
        assert status == 200, listing
        assert [x["free"] for x in listing["slots"]] == [1]


COUNTED = "/openapi.json"  # a route only the metrics test calls


def counted_total(metrics_text: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "guichet_http_requests_total" and sample.labels["route"] == COUNTED:
                total += sample.value
    return total


def samples(metrics_text: str, name: str) -> dict[str, float]:
    """The samples of ``name``, by their ``pid`` label ('' without one)."""
    return {
        sample.labels.get("pid", ""): sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == name
    }


def socket_owner(server_port: int, client_port: int, pids: set[int]) -> int | None:
    """The process holding the server side of the loopback connection from
    ``client_port``: its socket inode from /proc/net/tcp, then the process with that fd."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                local, remote = fields[1], fields[2]
                if (
                    int(local.rsplit(":", 1)[1], 16) == server_port
                    and int(remote.rsplit(":", 1)[1], 16) == client_port
                ):
                    inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
    return None


class KeptAlive:
    """One keep-alive HTTP/1.1 connection, spoken by hand so that its local port is known
    (which tells, through ``socket_owner``, which worker accepted it)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.port = int(writer.get_extra_info("sockname")[1])

    @classmethod
    async def open(cls, host: str, port: int) -> KeptAlive:
        return cls(*await asyncio.open_connection(host, port))

    async def get(self, path: str) -> tuple[int, str]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: engine\r\n\r\n".encode())
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, (await self.reader.readexactly(length)).decode()

    def close(self) -> None:
        self.writer.close()


async def test_workers_share_connections_and_report_metrics_as_one_engine(
    clean: None, start_engine: StartEngine, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {**engine_env(workers=2), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    supervisor = await start_engine("supervisor", env)

    async def two_workers() -> bool:
        return len(children(supervisor.pid)) == 2

    await poll(two_workers, supervisor.describe)
    workers = children(supervisor.pid)
    counted = f"{supervisor.base_url}{COUNTED}"

    async with contextlib.AsyncExitStack() as stack:
        # A new connection for every request: any worker may answer.
        fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        await stack.enter_async_context(fresh)
        # Kept-alive connections, each answered by the worker that accepted it. The kernel
        # spreads them over the workers' own sockets (SO_REUSEPORT): both get some.
        host, port = supervisor.base_url.removeprefix("http://").rsplit(":", 1)
        pinned: dict[int, list[KeptAlive]] = {pid: [] for pid in workers}
        for _ in range(24):
            conn = await KeptAlive.open(host, int(port))
            stack.callback(conn.close)
            assert (await conn.get("/healthz"))[0] == 200
            owner = socket_owner(int(port), conn.port, workers)
            assert owner in workers, f"connection from port {conn.port} held by {owner}"
            pinned[owner].append(conn)
        assert all(pinned.values()), {pid: len(c) for pid, c in pinned.items()}

        sent = 0
        for _ in range(4):
            assert (await call(fresh, "GET", counted))[0] == 200
            sent += 1
        for conns in pinned.values():
            for _ in range(3):
                assert (await conns[0].get(COUNTED))[0] == 200
                sent += 1
        # Each worker answers /metrics for the whole engine, whichever served what: its own
        # counts at once, the other's once that worker has flushed them (every second).
        seen: dict[int, float] = {}

        async def all_counted() -> bool:
            for pid, conns in pinned.items():
                status, text = await conns[0].get("/metrics")
                assert status == 200, text
                seen[pid] = counted_total(text)
            return all(total == sent for total in seen.values())

        await poll(all_counted, lambda: f"sent {sent}, workers report {seen}")

        # A worker that dies is replaced, and its successor gets connections of its own.
        dead = min(workers)
        os.kill(dead, signal.SIGKILL)

        async def replaced() -> bool:
            now = children(supervisor.pid)
            return len(now) == 2 and dead not in now

        await poll(replaced, supervisor.describe)
        successor = (children(supervisor.pid) - workers).pop()
        owners = set()
        for _ in range(24):
            conn = await KeptAlive.open(host, int(port))
            stack.callback(conn.close)
            assert (await conn.get("/healthz"))[0] == 200
            owners.add(socket_owner(int(port), conn.port, children(supervisor.pid)))
        assert successor in owners, (successor, owners)
        workers = children(supervisor.pid)

        # The death is counted (by the supervisor), and each worker alive has a heartbeat,
        # the dead one's gone with it.
        status, text = await call(fresh, "GET", f"{supervisor.base_url}/metrics")
        assert status == 200, text
        assert samples(text, "guichet_worker_restarts_total") == {"": 1.0}, text
        assert set(samples(text, "guichet_worker_heartbeat_seconds")) == {
            str(pid) for pid in workers
        }

        # A worker whose event loop is stuck (stopped here) answers nothing, but the other's
        # /metrics shows its heartbeat falling behind: what GuichetWorkerStuck reads.
        stuck = min(workers)
        os.kill(stuck, signal.SIGSTOP)
        try:
            late: dict[str, float] = {}

            async def falls_behind() -> bool:
                scraper = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True),
                    timeout=aiohttp.ClientTimeout(total=1),
                )
                async with scraper:
                    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                        _, text = await call(scraper, "GET", f"{supervisor.base_url}/metrics")
                        late.update(samples(text, "guichet_worker_heartbeat_seconds"))
                others = [v for pid, v in late.items() if pid != str(stuck)]
                return str(stuck) in late and bool(others) and max(others) - late[str(stuck)] > 3

            # A scrape sent to the stopped worker waits out its 1 s, and the kernel sends
            # each new connection to either worker: the 3 s lag is seen some seconds on.
            await poll(falls_behind, lambda: f"heartbeats {late}", within_s=30)
        finally:
            os.kill(stuck, signal.SIGCONT)

    supervisor.send(signal.SIGTERM)
    try:
        code = supervisor.wait()
    except subprocess.TimeoutExpired:
        pytest.fail(
            "still running after SIGTERM: a worker's shutdown hung (see "
            f"test_shutdown_finishes_wherever_it_lands_in_a_sweep)\n{supervisor.describe()}"
        )
    assert code == 0, supervisor.describe()
    assert not any(alive(pid) for pid in workers), supervisor.describe()


async def test_a_request_in_flight_is_answered_when_every_process_is_told_to_stop(
    clean: None, start_engine: StartEngine
) -> None:
    """systemd stops a unit by signalling each of its processes; the supervisor then
    signals its workers too. aiohttp took a worker's second SIGTERM as a second stop,
    which cancelled the requests in flight (the client's connection reset) and the
    stores' close. A worker drains on the first signal now, and ignores the next."""
    supervisor = await start_engine("drain", engine_env(workers=2))
    blocker = await asyncpg.connect(DATABASE_URL)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE sites IN ACCESS EXCLUSIVE MODE")
        url = f"{supervisor.base_url}/v1/admin/agenda?site=nowhere&date=2026-12-01"
        async with aiohttp.ClientSession() as session:
            asking = asyncio.ensure_future(call(session, "GET", url, headers=ADMIN))
            waits = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation IS NOT NULL"

            async def waiting() -> bool:
                return bool(await blocker.fetchval(waits))

            await poll(waiting, lambda: "the request never reached PostgreSQL")
            for pid in [*children(supervisor.pid), supervisor.pid]:  # as systemd does
                os.kill(pid, signal.SIGTERM)
            await asyncio.sleep(0.5)  # the supervisor's own SIGTERM reaches the workers
            await tx.rollback()
            status, body = await asking
        assert status == 404, body  # answered: no such site
    finally:
        await blocker.close()
    assert supervisor.wait() == 0, supervisor.describe()


async def test_a_previous_runs_metrics_are_not_added_in(
    clean: None, start_engine: StartEngine, tmp_path: Path
) -> None:
    """An operator's PROMETHEUS_MULTIPROC_DIR keeps the files of the engine's previous run:
    its counts would be added in again, and its workers' heartbeats, frozen, read as
    workers stuck. They are cleared at start, with one worker as with several."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    stale = metrics_dir / "gauge_liveall_999999.db"
    stale.write_bytes(b"\0" * 8)
    env = {**engine_env(workers=1), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    await start_engine("single", env)
    assert not stale.exists()


async def test_shutdown_finishes_wherever_it_lands_in_a_sweep(clean: None) -> None:
    """Stopping an app (a worker on SIGTERM) cancels its sweeper and waits for it. With
    sweeps back to back, the stop lands mid-sweep, at a different point each round."""
    for attempt in range(40):
        app = create_app(make_settings(sweep_interval_s=0.0), sweep=True)
        client = TestClient(TestServer(app))
        await client.start_server()
        for _ in range(attempt % 8):
            await asyncio.sleep(0)
        closing = asyncio.ensure_future(client.close())
        finished, _ = await asyncio.wait({closing}, timeout=HANG_S)
        if not finished:
            await _cancel_sweepers_until(closing)
        assert finished, f"round {attempt}: the shutdown never finished"


async def _cancel_sweepers_until(closing: asyncio.Future[None]) -> None:
    """Unblock a hung shutdown (so that its resources are still released): cancel the
    sweeper again until a cancellation takes."""
    for _ in range(100):
        for task in asyncio.all_tasks():
            if getattr(task.get_coro(), "cr_code", None) is sweeper.run.__code__:
                task.cancel()
        await asyncio.wait({closing}, timeout=0.1)
        if closing.done():
            return
    raise AssertionError("the sweeper survived 100 cancellations")


async def test_a_second_engine_cannot_take_the_port(
    clean: None, start_engine: StartEngine, tmp_path: Path
) -> None:
    """Workers bind with SO_REUSEPORT, which would let a second engine on the same port
    silently share the connections: the supervisor checks the port is free first."""
    first = await start_engine("first", engine_env(workers=2))
    for workers in (1, 2):
        second = Engine(tmp_path, f"second-{workers}", engine_env(workers=workers))
        second._env["GUICHET_PORT"] = str(first.port)
        second.start()
        try:
            assert second.wait() == 1, second.describe()
        finally:
            second.stop()
        assert "cannot listen on" in second.describe()
    async with aiohttp.ClientSession() as session:
        assert (await call(session, "GET", f"{first.base_url}/healthz"))[0] == 200


async def _pid_namespace() -> list[str]:
    """A command that runs another as PID 1 of a PID namespace of its own (unshare leaves
    SIGTERM to it); the test is skipped where none can be made."""
    pid_namespace = ["unshare", "--pid", "--fork", "--kill-child"]
    if not (shutil.which("unshare") and shutil.which("nsenter")):
        pytest.skip("unshare or nsenter is not installed (util-linux)")
    code, said = await _run(*pid_namespace, "true")
    if code:
        pytest.skip(f"no PID namespace can be made here: {said}")
    return pid_namespace


async def test_an_orphan_the_supervisor_reaps_is_not_taken_for_a_worker(
    clean: None, tmp_path: Path
) -> None:
    """As PID 1 (a container without an init) the supervisor is given every orphan of its
    PID namespace. It took each one it reaped for a worker that died: a restart counted and
    a surplus worker started."""
    pid_namespace = await _pid_namespace()
    engine = Engine(tmp_path, "pid-1", engine_env(workers=2), wrapper=pid_namespace)
    engine.start()
    try:
        await engine.wait_ready()
        (supervisor,) = children(engine.pid)
        await poll(lambda: _count(children(supervisor), 2), engine.describe)
        workers = children(supervisor)
        # A shell in the namespace starts a sleep and exits: the sleep is the supervisor's.
        enter = ["nsenter", "--target", str(supervisor), "--pid", "--"]
        assert await _run(*enter, "sh", "-c", "sleep 60 >/dev/null 2>&1 & exit 0") == (0, "")
        (orphan,) = children(supervisor) - workers
        os.kill(orphan, signal.SIGTERM)
        await poll(lambda: _reaped(orphan), engine.describe)  # by the supervisor
        assert children(supervisor) == workers
    finally:
        # unshare leaves SIGTERM to its child, the supervisor; stop() kills what remains.
        for pid in children(engine.pid):
            os.kill(pid, signal.SIGTERM)
        engine.stop()
    # Said before anything else once a worker is reaped, so before the stop: the orphan.
    assert "died" not in engine.describe(), engine.describe()


async def test_aiohttp_waits_twice_its_shutdown_timeout_for_a_request() -> None:
    """engine/serve.py gives aiohttp half of the drain as its shutdown_timeout, because
    aiohttp (from 3.10) waits that long for a request in flight, fails its body's reads,
    and waits as long again before it cancels it: a request ending between the two is
    answered. Should aiohttp wait once, this fails, and the drain would be halved."""
    timeout_s = 1.0
    started = asyncio.Event()

    async def slow(_request: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(1.5 * timeout_s)  # past the first wait, within the second
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/", slow)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:
        asking = asyncio.ensure_future(call(session, "GET", f"http://127.0.0.1:{port}/"))
        await asyncio.wait_for(started.wait(), HANG_S)
        await runner.cleanup()
        assert await asking == (200, "done")


@pytest.mark.parametrize("workers", [1, 2])
async def test_each_worker_listens_with_the_engines_backlog(
    start_engine: StartEngine, workers: int
) -> None:
    """aiohttp's site calls listen() again, with its own backlog (128) unless told: the
    engine's 1024 was silently replaced, and a burst of connections past 128 waited on
    the clients' SYN retries."""
    if not shutil.which("ss"):
        pytest.skip("ss is not installed (iproute2)")
    engine = await start_engine(f"backlog-{workers}", engine_env(workers))
    cap = int(await asyncio.to_thread(Path("/proc/sys/net/core/somaxconn").read_text))
    if cap <= 128:
        pytest.skip(f"net.core.somaxconn is {cap}: aiohttp's default backlog would pass too")
    ss = await asyncio.create_subprocess_exec(
        "ss", "-Hltn", f"sport = :{engine.port}", stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(ss.communicate(), 10)
    # A listening socket's Send-Q is its backlog; the supervisor's own socket only binds.
    backlogs = [int(line.split()[2]) for line in out.decode().splitlines()]
    assert backlogs == [min(BACKLOG, cap)] * workers, out


def test_a_kernel_cap_below_the_backlog_is_found(tmp_path: Path) -> None:
    """Linux lowers a listen() backlog to net.core.somaxconn silently: the engine warns
    (``backlog_capped``) where it is below its own."""
    somaxconn = tmp_path / "somaxconn"
    for value, found in (("128\n", 128), (f"{BACKLOG - 1}\n", BACKLOG - 1), (f"{BACKLOG}", None)):
        somaxconn.write_text(value)
        assert backlog_cap(somaxconn) == found
    somaxconn.unlink()
    assert backlog_cap(somaxconn) is None  # not Linux: nothing to say


async def test_a_stop_that_lands_as_a_redis_call_of_the_start_up_ends_is_kept(
    clean: None, tmp_path: Path
) -> None:
    """aiohttp's run_app stopped a worker by cancelling its task. On Python 3.11,
    asyncio.wait_for (redis-py's send) drops a cancellation that comes once the call it
    waits on is done: a SIGTERM landing there in the start-up was lost, the worker went on
    to serve, deaf to every later SIGTERM (seen in CI, where the test starts two workers
    and stops them while one still starts). Here the worker's first Redis call (redis-py's
    handshake) is answered while the worker is stopped, and the SIGTERM is handled in the
    same turn of its loop as the answer: the cancellation came in the next call's send.
    From the handshake's send to the SIGCONT, the steps must stay within load()'s 1 s
    limit (they take a tenth of it); on a machine too slow for that, the old code would
    pass too."""
    async with running(RedisServer(tmp_path)) as redis:
        os.kill(redis.pid, signal.SIGSTOP)
        env = engine_env(workers=1) | {"GUICHET_REDIS_URL": redis.url}
        engine = Engine(tmp_path, "stop-in-start-up", env)
        engine.start()
        try:
            # The engine connected to Redis and sent its first call, unread there.
            await poll(lambda: _unread_at(redis.port), engine.describe)
            os.kill(engine.pid, signal.SIGSTOP)
            os.kill(redis.pid, signal.SIGCONT)
            # Redis answered: the answer waits, unread, in the engine's socket.
            await poll(lambda: _unread_at(redis.port, far=True), engine.describe)
            os.kill(engine.pid, signal.SIGTERM)  # pending while the engine is stopped
            os.kill(engine.pid, signal.SIGCONT)
            code = engine.wait()
        finally:
            os.kill(redis.pid, signal.SIGCONT)
            engine.stop()
    said = engine.describe()
    assert code == 0, said
    assert "worker_stopped" in said, said


async def _unread_at(port: int, *, far: bool = False) -> bool:
    """Bytes wait unread at the end of a connection on ``port`` (``far``: at its other end)."""
    return any(n and ends[far] == port for ends, n in unread().items())


# Run by the engine's Python before its own code (PYTHONPATH): a worker's import of the
# app fails (the supervisor never imports it).
_BROKEN_APP = """
import sys


class BreakTheApp:
    def find_spec(self, name, path=None, target=None):
        if name == "engine.app":
            raise RuntimeError("the app is broken for the test")
        return None


sys.meta_path.insert(0, BreakTheApp())
"""


async def test_a_worker_that_fails_says_why(clean: None, tmp_path: Path) -> None:
    """A forked worker's error ended it with nothing said but the supervisor's "worker
    died"."""
    (tmp_path / "sitecustomize.py").write_text(_BROKEN_APP)
    env = engine_env(workers=2) | {"PYTHONPATH": str(tmp_path)}
    engine = Engine(tmp_path, "broken", env)
    engine.start()
    try:
        await poll(lambda: _said(engine, "died; starting another"), engine.describe)
    finally:
        engine.stop()
    said = engine.describe()
    assert "worker_failed" in said, said
    assert "RuntimeError: the app is broken for the test" in said, said


async def _said(engine: Engine, text: str) -> bool:
    return text in engine.describe()


# Run by the engine's Python before its own code (PYTHONPATH): it holds the start in the
# import of engine.settings, which every command makes first, and says so in a file.
_HELD_START = """
import os, sys, time


class HoldTheStart:
    def find_spec(self, name, path=None, target=None):
        if name == "engine.settings":
            sys.meta_path.remove(self)
            open(os.environ["HELD_START_MARK"], "w").close()
            time.sleep(float(os.environ["HELD_START_S"]))
        return None


sys.meta_path.insert(0, HoldTheStart())
"""


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_stop_sent_while_the_engine_starts_is_kept_as_pid_1(
    clean: None, tmp_path: Path, workers: int
) -> None:
    """As PID 1 (a container without an init) the kernel drops a signal the process has
    no handler for. A SIGTERM sent while the engine imported its modules (0.4 s measured
    under load, more on a slow machine) was lost: the engine went on to serve until it was
    killed."""
    pid_namespace = await _pid_namespace()
    (tmp_path / "sitecustomize.py").write_text(_HELD_START)
    mark = tmp_path / "starting"
    env = engine_env(workers) | {
        "PYTHONPATH": str(tmp_path),
        "HELD_START_MARK": str(mark),
        "HELD_START_S": "3",
    }
    engine = Engine(tmp_path, f"early-stop-{workers}", env, wrapper=pid_namespace)
    engine.start()
    try:
        await poll(lambda: _found(mark), engine.describe)
        (first,) = children(engine.pid)  # PID 1 of the namespace
        os.kill(first, signal.SIGTERM)
        try:
            code = engine.wait()
        except subprocess.TimeoutExpired:
            code = None  # the stop was lost: the engine serves on
    finally:
        engine.stop()
    said = engine.describe()
    assert code == 0, said
    assert "stopped while starting" in said, said
    if workers > 1:  # held in its imports 3 s, the supervisor started no worker
        assert "worker_started" not in said, said


async def _found(path: Path) -> bool:
    return await asyncio.to_thread(path.exists)


async def _run(*command: str) -> tuple[int, str]:
    """``command``'s exit status and what it said on stderr."""
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _, said = await asyncio.wait_for(proc.communicate(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, said.decode(errors="replace").strip()


async def _count(pids: set[int], n: int) -> bool:
    return len(pids) == n


async def _reaped(pid: int) -> bool:
    return not exists(pid)


def test_a_metrics_folder_that_cannot_be_written_is_refused_at_start(tmp_path: Path) -> None:
    # Each worker failed at its first count, and was restarted, again and again.
    (tmp_path / "a-file").write_text("")
    (tmp_path / "read-only").mkdir(mode=0o500)
    (tmp_path / "write-only").mkdir(mode=0o300)
    folders = [tmp_path / "missing", tmp_path / "a-file"]
    if os.geteuid() != 0:  # root reads and writes anywhere
        folders += [tmp_path / "read-only", tmp_path / "write-only"]
    for folder in folders:
        done = subprocess.run(
            [sys.executable, "-m", "engine", "serve"],
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder), "GUICHET_PORT": "0"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().endswith(
            f"{folder} is not a folder this user can read and write"
        )


def test_a_worker_that_keeps_dying_at_start_is_restarted_ever_more_slowly() -> None:
    """A worker that cannot start (a bug, no memory) must not take the machine's CPU being
    restarted, nor fill the metrics folder with its files: a pause that doubles, to 30 s.
    One that had served a while is replaced at once."""
    pauses = [0.0]
    for _ in range(7):
        pauses.append(restart_pause(lived_s=0.5, last_pause_s=pauses[-1]))
    assert pauses == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert restart_pause(lived_s=3600, last_pause_s=30.0) == 0.0
