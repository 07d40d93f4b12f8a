"""``guichet serve``: one process, or a supervisor forking GUICHET_WORKERS workers.

Each worker listens on its own socket bound with SO_REUSEPORT, so the kernel spreads new
connections evenly over the workers. With one shared socket, whichever worker woke first took
the connection, and in measured 4-worker runs one worker got almost none (BENCHMARKS.md). The
supervisor keeps a bound, non-listening socket of its own, so the port stays the engine's
while a worker is replaced; the connections waiting in a dying worker's queue are lost (the
clients retry), unless ``net.ipv4.tcp_migrate_req`` moves them to the others
(deploy/README.md). Where SO_REUSEPORT is missing, the workers share one socket as before.

With several workers, prometheus-client's multiprocess mode is switched on before any worker
imports it (``PROMETHEUS_MULTIPROC_DIR``), so ``/metrics`` on any worker reports the engine.
A worker that dies is replaced; SIGTERM or SIGINT stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from engine import early_stop
from engine.settings import ConfigError, Settings

_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# A worker that dies this soon after its start is started again after a pause, doubled at
# each such death up to the last: a worker that cannot start (a bug, memory) must not
# take the machine's CPU restarting, nor fill the metrics folder with files.
_QUICK_DEATH_S = 10.0
_FIRST_PAUSE_S = 1.0
_LONGEST_PAUSE_S = 30.0
# Connections the kernel queues for a worker before it accepts them: a release's first
# second brings thousands (Linux caps it at net.core.somaxconn).
BACKLOG = 1024
_SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
# A stopped worker's tasks left once its app is closed (none expected) get this long.
_LEFTOVER_WAIT_S = 5.0


_REUSEPORT = hasattr(socket, "SO_REUSEPORT")


def _bind(host: str, port: int, *, reuseport: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _listen(host: str, port: int, *, reuseport: bool = False) -> socket.socket:
    sock = _bind(host, port, reuseport=reuseport)
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


def backlog_cap(somaxconn: Path = _SOMAXCONN) -> int | None:
    """The kernel's cap on a socket's backlog, ``net.core.somaxconn``, where it is below
    ``BACKLOG``: Linux lowers the backlog to it without a word (128 before Linux 5.4, and
    in a container, whatever the host's)."""
    try:
        cap = int(somaxconn.read_text())
    except (OSError, ValueError):  # not Linux
        return None
    return cap if cap < BACKLOG else None


def run_worker(settings: Settings, sock: socket.socket) -> None:
    import uvloop
    from aiohttp import web

    from engine.app import create_app
    from engine.logs import log

    host, port = sock.getsockname()[:2]
    log.info("worker_started", pid=os.getpid(), address=f"{host}:{port}")
    app = create_app(settings)
    app.on_startup.append(_freeze_gc)  # after the stores and the sweeper have started
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    stopped_at = 0.0

    def on_signal(signum: int) -> None:
        # The first signal starts the drain; a later SIGTERM is ignored (systemd signals
        # every process of the unit, then the supervisor its workers: aiohttp took the
        # second as another stop, which cancelled the requests in flight and the stores'
        # close). A second Ctrl-C (SIGINT) is someone at a terminal who will not wait: now.
        nonlocal stopped_at
        if not stop.is_set():
            stopped_at = time.monotonic()
            log.info("worker_stopping", pid=os.getpid(), signal=signal.Signals(signum).name)
            stop.set()
        elif signum == signal.SIGINT:
            os._exit(1)

    def handle_signals() -> None:
        # From the running loop: one added before it runs only records a signal, and a
        # stop that came then would wait for another. Until then the default ends it, or,
        # the engine's only process, early_stop keeps it.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        if (early := early_stop.received()) is not None:
            on_signal(early)

    async def serve_until_stopped() -> None:
        # A stop only sets an event; no task is cancelled for it. aiohttp's run_app
        # cancelled its main task, and a stop during the start-up was lost when the
        # cancellation landed in redis-py's send: Python 3.11's asyncio.wait_for drops a
        # cancellation once the call it waits on is done. The start-up went on, and the
        # worker served on, deaf to every later SIGTERM (a CI run, reproduced in 11 % of
        # stops landing in the start-up). Now a stop waits for the start-up (each of its
        # waits is bounded by a store's timeout), then drains.
        if stop.is_set():
            return
        runner = web.AppRunner(
            app,
            handle_signals=False,
            # aiohttp's access log costs 20-55 % of throughput: off unless asked for.
            access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
            keepalive_timeout=75.0,  # run_app's (AppRunner's own is an hour)
            # Requests in flight get drain_s to finish. aiohttp waits shutdown_timeout
            # for a request, then fails its body's reads, and waits as long again before
            # it cancels it (measured: 2 s given, cancelled at 4 s): half of it each. So a
            # handler reads its body before it waits on a store (each of the engine's does).
            shutdown_timeout=drain_s(settings) / 2,
        )
        try:
            await runner.setup()
            if not stop.is_set():
                # Its listen() is called again with the backlog given here: aiohttp's
                # default, 128, had silently replaced ours.
                await web.SockSite(runner, sock, backlog=BACKLOG).start()
                await stop.wait()
        finally:
            # Also after a start-up that failed: its steps that had finished are closed.
            await runner.cleanup()

    loop.call_soon(handle_signals)
    try:
        loop.run_until_complete(serve_until_stopped())
    finally:
        # Nothing should be left; what is, is cancelled, waited for a bounded time, and
        # said.
        if left := asyncio.all_tasks(loop):
            for task in left:
                task.cancel()
            _, pending = loop.run_until_complete(asyncio.wait(left, timeout=_LEFTOVER_WAIT_S))
            log.warning("worker_tasks_left", tasks=len(left), not_ended=len(pending))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    log.info("worker_stopped", pid=os.getpid(), seconds=f"{time.monotonic() - stopped_at:.3f}")


def drain_s(settings: Settings) -> float:
    """How long a stopping worker lets its requests in flight finish: the longest waits
    on one PostgreSQL connection, four of its statements' limits (Store._connection)."""
    from engine.store import CALLS_PER_DEADLINE

    return CALLS_PER_DEADLINE * settings.pg_timeout_s + 10


async def _freeze_gc(app: object) -> None:
    """Move everything the start-up made (modules, routes, pools: most of the heap) out of
    the garbage collector's reach. Its full collections scan every tracked object and stop
    the worker meanwhile; measured under load, they came every second or so and took up to
    200 ms (BENCHMARKS.md)."""
    gc.collect()
    gc.freeze()


def _socket(settings: Settings) -> socket.socket:
    if settings.workers > 1 and _REUSEPORT:
        # First a plain bind: it fails if anything holds the port, even another engine
        # with SO_REUSEPORT, which would otherwise silently share our connections.
        probe = _bind(settings.host, settings.port, reuseport=False)
        port = probe.getsockname()[1]
        probe.close()
        # Not listening: it only holds the port for the workers.
        return _bind(settings.host, port, reuseport=True)
    return _listen(settings.host, settings.port)


class ListenError(Exception):
    """The engine's address is taken, or not ours to bind."""


def serve(settings: Settings) -> None:
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given and not (os.path.isdir(given) and os.access(given, os.R_OK | os.W_OK | os.X_OK)):
        # Else every worker fails at its first count, and is restarted, again and again; or,
        # the folder not readable, /metrics is empty and a previous run's files stay.
        raise ConfigError(
            f"PROMETHEUS_MULTIPROC_DIR={given} is not a folder this user can read and write"
        )
    try:
        sock = _socket(settings)
    except OSError as exc:
        raise ListenError(f"cannot listen on {settings.host}:{settings.port}: {exc}") from exc
    print(
        f"guichet: serving on http://{settings.host}:{sock.getsockname()[1]} "
        f"with {settings.workers} worker(s)",
        file=sys.stderr,
        flush=True,
    )
    if (cap := backlog_cap()) is not None:
        from engine.logs import log

        log.warning("backlog_capped", backlog=BACKLOG, somaxconn=cap, see="deploy/README.md")
    if given:
        # An operator's folder is kept, but values of a previous run must not be added in
        # (nor its workers' heartbeats, which would read as workers stuck), one worker or
        # several.
        for stale in Path(given).glob("*.db"):
            stale.unlink()
    if settings.workers == 1:
        run_worker(settings, sock)
        return
    metrics_dir = given or tempfile.mkdtemp(prefix="guichet-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        _supervise(settings, sock)
    finally:
        if not given:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _spawn(settings: Settings, sock: socket.socket) -> int:
    pid = os.fork()
    if pid == 0:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by _supervise
        code = 0
        try:
            if _REUSEPORT:
                host, port = sock.getsockname()[:2]
                own = _listen(host, port, reuseport=True)
                sock.close()
                sock = own
            run_worker(settings, sock)
        except BaseException:  # a worker must never fall back into the supervisor's loop
            code = 1
            with contextlib.suppress(BaseException):  # said, else the supervisor's "died" only
                from engine.logs import log

                log.exception("worker_failed", pid=os.getpid())
        finally:
            os._exit(code)
    return pid


def _die_with_parent() -> None:
    """Ask Linux to send this worker SIGTERM if the supervisor dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: workers then outlive a killed supervisor
        pass


def restart_pause(lived_s: float, last_pause_s: float) -> float:
    """How long to wait before starting again a worker that died after ``lived_s``."""
    if lived_s >= _QUICK_DEATH_S:
        return 0.0
    return min(_LONGEST_PAUSE_S, max(_FIRST_PAUSE_S, last_pause_s * 2))


def _supervise(settings: Settings, sock: socket.socket) -> None:
    from prometheus_client import multiprocess

    from engine.metrics import worker_restarts

    restarts = worker_restarts(None)  # in the metrics folder, as the workers' counts
    started: dict[int, float] = {}
    children: set[int] = set()
    pause = 0.0
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def spawn() -> None:
        # A stop signal waits while a worker is forked and recorded, so that it reaches
        # that worker too (the child unblocks it once its own handling is set).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            if not stopping:
                new = _spawn(settings, sock)
                started[new] = time.monotonic()
                children.add(new)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if (early := early_stop.received()) is not None:
        stop(early, None)
    for _ in range(settings.workers):
        spawn()
    while children:
        try:
            pid, _status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            # As PID 1 (a container without an init) the supervisor is given every orphan
            # of its PID namespace; reaped, it is no worker of ours to replace.
            continue
        children.remove(pid)
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        if stopping:
            continue
        restarts.inc()
        pause = restart_pause(time.monotonic() - started.pop(pid, 0.0), pause)
        print(
            f"guichet: worker {pid} died; starting another" + (f" in {pause:g} s" if pause else ""),
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + pause
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        spawn()
