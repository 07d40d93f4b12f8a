"""CPU instructions per request of one engine worker, counted by valgrind's callgrind.

``bench.py`` measures rates, and on a shared 2-core VM they move 20 to 50 % from one run to
the next: more than most single changes. An instruction count hardly moves: the same
requests against the same code count the same to within 1 to 3 % (how requests batch per
event-loop turn varies), whatever else the machine does. So this script is what to run
before and after a change to the request path; ``bench.py`` is what to run for the rates
the goals are stated in.

It starts, each under ``valgrind --tool=callgrind``, the hello world of ``bench.py`` (the
ceiling), its floor of a hold (aiohttp and one Redis script call) and one engine worker,
sends each path ``--requests`` requests over 8 kept-alive connections after a warm-up, and
divides the instructions the process ran meanwhile (zeroed before, dumped after, with
``callgrind_control``) by the requests. The engine runs with its sweeper, reconcile and
caches on hour-long periods, so that what is counted is the request path (the listing: a
cache hit; the confirms: of holds taken before counting starts, one person each, so that a
confirm's PostgreSQL transaction is in the count only as the worker's side of it). Counts
are user-space instructions: the kernel's socket work, the same for every
path, is not in them. Needs valgrind, and the stores of ``bench.py``.

    python loadtests/instructions.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench
from bench import (
    BLOCKED_ADDRESS,
    BROWSER,
    Bench,
    Server,
    block_address,
    closed_loop,
    flush_redis,
    open_loop,
    raw_request,
    reset_database,
    run_bounded,
    seed,
    write_report,
)

HOUR = 3600.0
CONNECTIONS = 8
WARMUP = 300
DUMP_S = 120.0  # the longest a dump may take to appear
SCRIPT = Path(__file__).resolve()
KEEP: Path | None = None  # --keep: where each path's callgrind dump is copied


def engine_server() -> None:
    """One engine worker as ``guichet serve`` runs it, its periodic work an hour apart."""
    from engine.serve import serve
    from engine.settings import Settings

    settings = dataclasses.replace(
        Settings.from_env(),
        sweep_interval_s=HOUR,
        reconcile_interval_s=HOUR,
        listing_cache_s=HOUR,
        release_cache_s=HOUR,
    )
    serve(settings)


def reference_server(kind: str, port: int) -> None:
    """What the stack's layers cost, below the hello world of ``bench.py`` (the same JSON
    reply, to any request): ``lowlevel`` serves it with aiohttp's low-level server
    (``web.Server``: no application, router or route), ``protocol`` with a bare asyncio
    protocol on uvloop that parses nothing (it answers each GET it finds the end of): what the
    event loop and the sockets cost a Python server at the least."""
    import uvloop
    from aiohttp import web

    sock = bench.listening_socket(port)

    class Hello(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while b"\r\n\r\n" in self.buffer:
                _request, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
                body = json.dumps({"hello": "world"}).encode()
                self.transport.write(  # type: ignore[attr-defined]
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )

    async def hello(_request: web.BaseRequest) -> web.Response:
        return web.json_response({"hello": "world"})

    async def main() -> None:
        loop = asyncio.get_running_loop()
        factory = web.Server(hello, access_log=None) if kind == "lowlevel" else Hello
        await loop.create_server(factory, sock=sock)
        await asyncio.Event().wait()

    uvloop.run(main())


def under_callgrind(workdir: Path, name: str, argv: list[str]) -> list[str]:
    out = workdir / f"cg-{name}.%p"
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv]


async def control(option: str, pid: int) -> None:
    code, _out, err = await run_bounded(["callgrind_control", option, str(pid)], DUMP_S)
    if code != 0:
        raise SystemExit(f"instructions: callgrind_control {option} failed: {err.decode()}")


def dumps(workdir: Path, name: str, pid: int) -> set[Path]:
    return set(workdir.glob(f"cg-{name}.{pid}.*"))


def total_of(path: Path) -> int | None:
    """A dump's instruction total; None while callgrind is still writing it."""
    match = re.search(r"^totals: (\d+)", path.read_text(errors="replace"), re.M)
    return int(match[1]) if match else None


async def dumped(workdir: Path, name: str, pid: int, before: set[Path]) -> tuple[Path, int]:
    """The dump that appeared since ``before`` was listed, and its instruction total."""
    deadline = time.monotonic() + DUMP_S
    while time.monotonic() < deadline:
        for path in dumps(workdir, name, pid) - before:
            if (total := total_of(path)) is not None:
                return path, total
        await asyncio.sleep(0.2)
    raise SystemExit(f"instructions: no callgrind dump of {name} after {DUMP_S} s")


async def count(
    workdir: Path,
    server: Server,
    name: str,
    requests: list[bytes],
    expect: int,
    rate: float | None = None,
) -> float:
    """Instructions per request of ``requests[WARMUP:]``, after ``requests[:WARMUP]``; sent
    open loop at ``rate`` a second if given, else by 8 clients as fast as answered."""

    async def send(batch: list[bytes]) -> None:
        if rate:
            measured = await open_loop(server.port, batch, rate=rate, duration_s=len(batch) / rate)
        else:
            measured = await closed_loop(
                server.port,
                batch,
                connections=CONNECTIONS,
                duration_s=HOUR,
                warmup_s=0,
                cycle=False,
            )
        if set(measured.statuses) != {str(expect)}:
            raise SystemExit(f"instructions: {name}: {measured.statuses}, not all {expect}")

    await send(requests[:WARMUP])
    await control("-z", server.pid)
    await send(requests[WARMUP:])
    before = dumps(workdir, server.name, server.pid)
    await control("-d", server.pid)
    path, total = await dumped(workdir, server.name, server.pid, before)
    if KEEP is not None:
        shutil.copy(path, KEEP / f"{name}.callgrind")
    return total / (len(requests) - WARMUP)


async def count_reference(
    b: Bench,
    name: str,
    args: list[str],
    requests: Callable[[int], list[bytes]],
    expect: int,
    script: Path = bench.SCRIPT,
) -> float:
    """Instructions per request of a reference server (``bench.py``'s, or this script's,
    ``args`` pick it); ``requests(port)`` are sent to it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUICHET_")}
    argv = [sys.executable, str(script), *args, "--port", "{port}"]
    server = Server(name, under_callgrind(b.workdir, name, argv), env, b.workdir, None)
    b.servers.append(server)
    server.start()
    await server.wait_ready()
    print(f"{name} ...", flush=True)
    try:
        return await count(b.workdir, server, name, requests(server.port), expect)
    finally:
        server.stop()


async def count_engine(b: Bench, args: argparse.Namespace, n: int) -> dict[str, float]:
    """Instructions per request of one engine worker, for each of its paths ``--only``
    keeps."""
    engine_env = bench.engine_env(
        b.dsn, b.redis, b.secret, b.admin, b.workdir, 1, GUICHET_LIMIT_ADDRESS="2/1h"
    )
    argv = [sys.executable, str(SCRIPT), "--engine-server"]
    engine = Server(
        "engine", under_callgrind(b.workdir, "engine", argv), engine_env, b.workdir, None
    )
    b.servers.append(engine)
    engine.start()
    await engine.wait_ready()
    port = engine.port
    releases = await seed(port, b.admin, {"r": (120, 10_000), "c": (120, 1_000)})
    rel = releases["r"]
    paths: dict[str, tuple[list[bytes], int]] = {
        "healthz": ([raw_request("GET", "/healthz", port)] * n, 200),
        "listing": (
            [raw_request("GET", f"/v1/releases/{rel['id']}/slots", port, headers=BROWSER)] * n,
            200,
        ),
        "hold": (b.minter.holds(port, rel["id"], rel["slots"], n)[0], 201),
        "forged": (b.minter.forged(port, rel["id"], rel["slots"], n), 403),
    }
    await block_address(port, rel["id"], BLOCKED_ADDRESS)
    body = json.dumps({"release": rel["id"]}).encode()
    blocked = raw_request(
        "POST", "/v1/challenges", port, body, {"X-Forwarded-For": BLOCKED_ADDRESS}
    )
    paths["blocked"] = ([blocked] * n, 429)
    if not args.only or "confirm" in args.only:
        paths["confirm"] = (await confirms(port, b, releases["c"], n), 201)
    if args.hold_rate:
        paths["hold_paced"] = (b.minter.holds(port, rel["id"], rel["slots"], n)[0], 201)
    rows: dict[str, float] = {}
    for name, (requests, expect) in paths.items():
        if args.only and name not in args.only and name != "hold_paced":
            continue
        print(f"{name} ...", flush=True)
        rate = args.hold_rate if name == "hold_paced" else None
        rows[name] = await count(b.workdir, engine, name, requests, expect, rate)
    engine.stop()
    return rows


async def confirms(port: int, b: Bench, release: dict[str, Any], n: int) -> list[bytes]:
    """``n`` confirms of holds taken now (not counted), each by its own address and person."""
    holds, addresses = b.minter.holds(port, release["id"], release["slots"], n)
    replies: dict[int, tuple[int, bytes]] = {}
    await closed_loop(
        port,
        holds,
        connections=CONNECTIONS,
        duration_s=HOUR,
        warmup_s=0,
        cycle=False,
        replies=replies,
    )
    taken = []
    for i, (status, body) in sorted(replies.items()):
        if status != 201:
            raise SystemExit(f"instructions: a hold for the confirms answered {status}")
        hold = json.loads(body)
        taken.append((hold["hold_id"], hold["hold_token"], addresses[i]))
    return bench.confirm_requests(port, taken, b.tag)


async def run(args: argparse.Namespace) -> dict[str, object]:
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"instructions: needs {tool} (apt-get install valgrind)")
    b = Bench(bench_args())
    bench.READY_S = 600.0  # a Python start-up under valgrind takes tens of seconds
    n = WARMUP + args.requests
    rows: dict[str, float] = {}
    try:
        await reset_database(b.maintenance, b.dsn)
        await flush_redis(b.redis)
        rows["hello"] = await count_reference(
            b, "hello", ["--hello-server"], lambda port: [raw_request("GET", "/", port)] * n, 200
        )
        for kind in ("lowlevel", "protocol"):
            if not args.only or kind in args.only:
                rows[kind] = await count_reference(
                    b,
                    kind,
                    ["--reference-server", kind],
                    lambda port: [raw_request("GET", "/", port)] * n,
                    200,
                    script=SCRIPT,
                )
        if not args.only or "floor" in args.only:
            slot = f"{FLOOR_RELEASE}.000"
            rows["floor"] = await count_reference(
                b,
                "floor",
                ["--floor-server", "--redis-url", b.redis],
                lambda port: b.minter.holds(port, FLOOR_RELEASE, [slot], n)[0],
                201,
            )
        if not args.only or args.only - {"floor", "lowlevel", "protocol"}:
            rows.update(await count_engine(b, args, n))
    finally:
        b.stop_all()
        with contextlib.suppress(Exception):
            await flush_redis(b.redis)
        shutil.rmtree(b.workdir, ignore_errors=True)
    return {
        "requests": args.requests,
        "connections": CONNECTIONS,
        "commit": bench.engine_commit(),
        "instructions_per_request": rows,
    }


FLOOR_RELEASE = "r0000000floor"  # any release id: the floor reads only the slot id


def bench_args() -> argparse.Namespace:
    return argparse.Namespace(no_wrk=True, set=[], gc_log=False)


LABELS = {
    "hello": "ceiling: hello world, GET /",
    "lowlevel": "the same on aiohttp's low-level server",
    "protocol": "the same from a bare uvloop protocol",
    "healthz": "GET /healthz (the engine's floor)",
    "listing": "slot listing, 120 slots (cached, gzipped)",
    "floor": "floor of a hold: aiohttp + 1 Redis call (201)",
    "hold": "hold, POST /v1/holds (201)",
    "forged": "refusal: forged challenge (403)",
    "blocked": "refusal: blocked client, POST /v1/challenges",
    "confirm": "confirm, POST /v1/holds/{id}/confirm (201)",
    "hold_paced": "hold, open loop at --hold-rate",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="counted requests per path")
    parser.add_argument(
        "--only",
        type=lambda text: set(text.split(",")),
        default=set(),
        help="comma-separated subset of: "
        + ", ".join(k for k in LABELS if k not in ("hello", "hold_paced")),
    )
    parser.add_argument(
        "--hold-rate",
        type=float,
        help="also count holds sent open loop at this many a second (the worker runs some 50 "
        "times slower under callgrind: 20 to 80 here leave it idle between small batches)",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        help="copy each path's callgrind dump here, as PATH.callgrind, for callgrind_annotate",
    )
    parser.add_argument("--engine-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--reference-server", choices=("lowlevel", "protocol"), help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_server:
        engine_server()
        return
    if args.reference_server:
        reference_server(args.reference_server, args.port)
        return
    import uvloop

    global KEEP
    KEEP = args.keep
    if KEEP is not None:
        KEEP.mkdir(parents=True, exist_ok=True)
    report = uvloop.run(run(args))
    rows = report["instructions_per_request"]
    assert isinstance(rows, dict)
    print(f"\ninstructions per request, engine at commit {report['commit']}")
    print(f"{'path':<48} {'instructions':>12} {'hello / path':>13}")
    for key, value in rows.items():
        print(f"{LABELS[key]:<48} {value:>12,.0f} {rows['hello'] / value:>13.2f}")
    print(f"\nreport: {write_report(report, 'instructions')}")


if __name__ == "__main__":
    main()
