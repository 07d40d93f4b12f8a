"""Real processes and sockets for outage and multi-process tests, all on 127.0.0.1.

    free_port     a port nothing listens on right now
    free_ports    several distinct ones
    dead_port     a port held bound but not listening: every connect is refused
    Blackhole     accepts connections and never answers (a store that hangs)
    TcpProxy      forwards to a real store; stop() cuts every connection and refuses new ones;
                  hold_back() keeps a client's calls from reaching the store
    RedisServer   a private ``redis-server`` without persistence, restartable on its port
    Engine        a ``python -m engine serve`` subprocess

Readiness is polled in bounded loops with short intervals, never slept for. Processes are
started and stopped from plain functions (they do not block for long) and always stopped by
the caller's teardown; their output goes to a file that ``describe()`` shows on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import aiohttp

HOST = "127.0.0.1"
READY_S = 10.0
POLL_S = 0.02
REPO_ROOT = Path(__file__).resolve().parent.parent


def with_port(url: str, port: int) -> str:
    """``url`` pointed at 127.0.0.1:``port``, same user, password, database and options."""
    parts = urlsplit(url)
    userinfo, _, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}@{HOST}:{port}" if userinfo else f"{HOST}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports nothing listens on right now (held together while chosen, so
    that none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET)) for _ in range(n)]
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]


@contextlib.contextmanager
def dead_port() -> Iterator[int]:
    """A port bound by us and never listened on: connects get ECONNREFUSED, and no other
    process can start listening there while the block runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        yield int(s.getsockname()[1])


async def poll(
    check: Callable[[], Awaitable[bool]], what: Callable[[], str], within_s: float = READY_S
) -> None:
    """Call ``check`` until it returns True; after ``within_s``, fail showing ``what()``."""
    deadline = time.monotonic() + within_s
    while True:
        if await check():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"not ready after {within_s} s: {what()}")
        await asyncio.sleep(POLL_S)


class _Sink(asyncio.Protocol):
    def __init__(self, transports: set[asyncio.BaseTransport]) -> None:
        self._transports = transports

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transports.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        pass  # read and ignored: never a reply


class Blackhole:
    """A TCP server that completes every handshake, reads everything, and never replies."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self.port = 0

    async def __aenter__(self) -> Blackhole:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Sink(self._transports), HOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for transport in self._transports:
            transport.abort()  # type: ignore[attr-defined]
        await self._server.wait_closed()

    @property
    def accepted(self) -> int:
        """Connections accepted so far (proof that the engine did reach this store)."""
        return len(self._transports)


class TcpProxy:
    """Forwards 127.0.0.1:port to an upstream store. ``stop()`` aborts every forwarded
    connection and closes the listener (connects are refused); ``start()`` listens again on
    the same port. ``hold_back(*needles)``: from then on, what a client sends in a read that
    contains one of them is kept in ``held`` instead of forwarded, so that the test can make the
    call reach the store when it chooses, as a call the client gave up on may; with
    ``replies=True``, what the store answers instead (a reply lost on its way back). It
    matches each read as it comes: keep the needle short and the calls small, or it may fall
    across two reads, and check ``held`` holds what you meant."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._needles: tuple[bytes, ...] = ()
        self._replies = False
        self.held: list[bytes] = []
        self.port = 0

    @classmethod
    async def started(cls, url: str) -> tuple[TcpProxy, str]:
        """A started proxy to the store ``url`` names, and ``url`` through it."""
        parts = urlsplit(url)
        default = 6379 if parts.scheme.startswith("redis") else 5432
        proxy = cls(parts.hostname or HOST, parts.port or default)
        await proxy.start()
        return proxy, with_port(url, proxy.port)

    def hold_back(self, *needles: bytes, replies: bool = False) -> None:
        """Keep back what holds any of ``needles`` (none: nothing), the requests or the
        ``replies``."""
        self._needles, self._replies = needles, replies

    def _keep(self, data: bytes, reply: bool) -> bool:
        if any(n in data for n in self._needles) and reply == self._replies:
            self.held.append(data)
            return True
        return False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, HOST, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Connections first: from Python 3.12.1, wait_closed() waits for them to close.
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._writers.clear()
        self._tasks.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            _pump(reader, up_writer, lambda data: self._keep(data, reply=False)),
            _pump(up_reader, writer, lambda data: self._keep(data, reply=True)),
        )


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    keep: Callable[[bytes], bool] = lambda _data: False,
) -> None:
    try:
        while data := await reader.read(65536):
            if keep(data):
                continue
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()


class RedisServer:
    """A private redis-server on a fixed loopback port, without persistence: a restart
    starts empty (no keys, no Functions library)."""

    def __init__(
        self, workdir: Path, port: int | None = None, options: dict[str, str] | None = None
    ) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.options = options or {}
        self.logfile = workdir / f"redis-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> None:
        assert self._proc is None, "already running"
        self._log = self.logfile.open("ab")
        options = {
            "port": str(self.port),
            "bind": HOST,
            "save": "",
            "appendonly": "no",
            "dir": str(self.workdir),
            "daemonize": "no",
            **self.options,
        }
        args = ["redis-server"]
        for name, value in options.items():
            args += [f"--{name}", value]
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    async def wait_ready(self) -> None:
        async def pong() -> bool:
            proc = self._proc
            assert proc is not None
            if proc.poll() is not None:
                raise AssertionError(f"redis-server exited {proc.returncode}\n{self.describe()}")
            return await _redis_pong(self.port)

        await poll(pong, lambda: f"redis-server on port {self.port}\n{self.describe()}")

    def kill(self) -> None:
        """Stop at once, as a crash would (SIGKILL), and reap the process."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        self._proc.wait(timeout=READY_S)
        self._proc = None
        assert self._log is not None
        self._log.close()
        self._log = None

    def describe(self) -> str:
        text = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
        return f"--- {self.logfile} ---\n{text[-4000:]}"


async def _redis_pong(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), READY_S)
        return line == b"+PONG\r\n" or line.startswith(b"-NOAUTH")  # up, and wants a password
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def running(server: RedisServer) -> AsyncIterator[RedisServer]:
    server.start()
    try:
        await server.wait_ready()
        yield server
    finally:
        server.kill()


class Engine:
    """``python -m engine serve`` as a subprocess, configured by ``GUICHET_*`` variables."""

    def __init__(
        self, workdir: Path, name: str, env: dict[str, str], wrapper: Sequence[str] = ()
    ) -> None:
        """``wrapper``: a command that runs the engine's (``unshare ...``), if any."""
        self.wrapper = list(wrapper)
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.logfile = workdir / f"engine-{name}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("GUICHET_")}
        environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        environ.update(env)
        environ.update({"GUICHET_HOST": HOST, "GUICHET_PORT": str(self.port)})
        self._env = environ
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> None:
        self._log = self.logfile.open("ab")
        self._proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "engine", "serve"],
            cwd=REPO_ROOT,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self) -> None:
        """Poll /healthz until it answers 200. Each attempt waits as long as it needs (up to
        the deadline) once connected, so no abandoned request can be answered later."""
        deadline = time.monotonic() + READY_S

        async def healthy() -> bool:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise AssertionError(f"engine exited {self._proc.returncode}\n{self.describe()}")
            left = max(0.1, deadline - time.monotonic())
            timeout = aiohttp.ClientTimeout(total=left)
            connector = aiohttp.TCPConnector(force_close=True)
            try:
                async with (
                    aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                    session.get(f"{self.base_url}/healthz") as r,
                ):
                    return r.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await poll(healthy, lambda: f"engine on port {self.port}\n{self.describe()}")

    def send(self, signum: int) -> None:
        assert self._proc is not None
        self._proc.send_signal(signum)

    def wait(self, timeout_s: float = READY_S) -> int:
        """Its exit code. If it has not exited within ``timeout_s``, the error says where it
        and its workers are (``stuck``): a hang seen once in CI is otherwise a guess."""
        assert self._proc is not None
        try:
            return self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            pids = [self._proc.pid, *sorted(children(self._proc.pid))]
            raise NotExited(exc, f"{stuck(pids)}\n{self.describe()}") from exc

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within READY_S; reap it. Workers it
        left behind (a supervisor killed before it could stop them) are killed too."""
        if self._proc is None:
            return
        workers = children(self._proc.pid)
        if self._proc.poll() is None:
            # A process stopped (SIGSTOP) by a failed test could not exit.
            for pid in [self._proc.pid, *workers]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=READY_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=READY_S)
        for pid in workers:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert self._log is not None
        self._log.close()
        self._log = None

    def describe(self) -> str:
        text = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
        return f"--- {self.logfile} ---\n{text[-8000:]}"


def children(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces or parentheses.
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.add(int(entry.name))
    return found


class NotExited(subprocess.TimeoutExpired):
    """``subprocess.TimeoutExpired``, saying where the process is."""

    def __init__(self, exc: subprocess.TimeoutExpired, where: str) -> None:
        super().__init__(exc.cmd, exc.timeout)
        self.where = where

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.where}"


def stuck(pids: Sequence[int]) -> str:
    """Where each process is: its state, signals and kernel wait (/proc), and its Python
    stack (``py-spy dump``, a dev dependency, as docs/operations.md asks of ops)."""
    spy = Path(sys.executable).with_name("py-spy")  # the venv's, whatever PATH holds
    parts = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            wchan = Path(f"/proc/{pid}/wchan").read_text()
        except OSError:
            parts.append(f"--- process {pid}: gone")
            continue
        wanted = ("State", "PPid", "Threads", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")
        lines = [line for line in status.splitlines() if line.split(":")[0] in wanted]
        parts.append(f"--- process {pid} (kernel wait: {wchan or '-'})\n" + "\n".join(lines))
        if spy.exists():
            try:
                dump = subprocess.run(
                    [str(spy), "dump", "--locals", "--pid", str(pid)],
                    capture_output=True,
                    text=True,
                    timeout=READY_S,
                )
                parts.append(dump.stdout + dump.stderr)
            except subprocess.TimeoutExpired:
                parts.append("py-spy did not answer")
        else:
            parts.append(f"(no Python stack: {spy} is not installed)")
    return "\n".join(parts)


def unread() -> dict[tuple[int, int], int]:
    """Each end of an established IPv4 TCP connection, as (its port, the far end's),
    with the bytes come in that its process has not read yet (Linux /proc/net/tcp)."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state, queues = line.split()[1:5]
        if state == "01":  # ESTABLISHED
            ends = int(local.split(":")[1], 16), int(remote.split(":")[1], 16)
            found[ends] = int(queues.split(":")[1], 16)
    return found


def exists(pid: int) -> bool:
    """True until ``pid`` has been reaped (a zombie still exists)."""
    return Path(f"/proc/{pid}").exists()


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
