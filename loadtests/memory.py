"""How much memory one engine worker takes, and whether a flood can grow it without bound.

    python loadtests/memory.py [--rounds 6] [--addresses 25000] [--connections 64]

One worker (GUICHET_WORKERS=1) with the benchmark's generous limits, but for 1 challenge an
hour per address. Each round comes from that many addresses never seen before (a botnet's,
or a proxy farm's), and each address sends, batch after batch:
  1. a hold with a fresh pre-solved challenge (201);
  2. the same request again, as a phone whose answer was lost retries (201, the same hold);
  3. the same again under an Idempotency-Key: another request, its challenge spent (410),
     which the worker remembers;
  4. a draw entry with a fresh challenge, for a person of its own (201);
  5. the same entry again: its challenge found spent, which the worker remembers, and the
     entry answered from PostgreSQL (201), for the address's one token of the hour;
  6. two challenge requests, both refused (429): the first finds the address's bucket
     empty, which the worker remembers, and the second is refused from that memory.
After each round it prints the worker's resident memory (VmRSS) and its high-water mark
(VmHWM). What the worker keeps per client is capped (addresses parsed and bucket names:
16 384 each; refusals, holds' and entries' spent challenges: 100 000 each), so once past
the caps (the default run goes to 150 000 addresses) the resident memory should level off.
The holds are dropped from Redis after each round, so that the sweeper's reading of them
does not grow either. A batch answered otherwise than above stops the run.

Data: the benchmark's (``bench.py``): database ``guichet_bench`` (dropped and migrated
again) and Redis database 13 (flushed at the start and the end). Writes
``loadtests/reports/memory-<UTC time>.json``; BENCHMARKS.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import (
    HOST,
    Minter,
    Server,
    applicant,
    bench_urls,
    cancel_on_sigterm,
    closed_loop,
    drop_holds,
    engine_commit,
    engine_env,
    flush_redis,
    machine_info,
    memory_kib,
    raw_request,
    reset_database,
    seed,
    write_report,
)


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


async def _send(port: int, requests: list[bytes], connections: int, expect: int) -> None:
    """Send each request once; every reply must have status ``expect``."""
    replies: dict[int, tuple[int, bytes]] = {}
    measured = await closed_loop(
        port,
        requests,
        connections=connections,
        duration_s=3600,
        warmup_s=0,
        cycle=False,
        replies=replies,
    )
    if measured.errors or len(replies) != len(requests):
        raise SystemExit(
            f"memory: {len(requests) - len(replies)} requests not answered, "
            f"{measured.errors} connection errors"
        )
    statuses = Counter(status for status, _ in replies.values())
    if set(statuses) != {expect}:
        wrong = next(body for status, body in replies.values() if status != expect)
        raise SystemExit(f"memory: expected {expect}, got {dict(statuses)}: {wrong[:300]!r}")


async def _seed_draw(port: int, admin: str) -> str:
    """A draw release of the bench site (seeded before), registration open for an hour."""
    import aiohttp

    now = datetime.now(UTC)
    slot = {
        "starts_at": (now + timedelta(days=3)).isoformat(),
        "duration_minutes": 15,
        "capacity": 10,
    }
    body = {
        "site": "bench",
        "procedure": "bench",
        "mode": "draw",
        "registration_opens_at": (now - timedelta(minutes=1)).isoformat(),
        "registration_closes_at": (now + timedelta(hours=1)).isoformat(),
        "draw_at": (now + timedelta(hours=2)).isoformat(),
        "slots": [slot],
    }
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as session,
        session.post(f"http://{HOST}:{port}/v1/admin/releases", json=body) as r,
    ):
        if r.status != 201:
            raise SystemExit(f"memory: POST draw release: {r.status} {await r.text()}")
        return str((await r.json())["release"]["id"])


def _entries(minter: Minter, port: int, draw: str, addresses: list[str], first: int) -> list[bytes]:
    """An entry request from each address, each for a person of its own."""
    out = []
    for i, address in enumerate(addresses, start=first):
        text, nonces = minter.challenge(draw, address)
        person = applicant(i, "MEM")
        body = json.dumps({"challenge": text, "nonces": nonces, "applicant": person}).encode()
        path = f"/v1/releases/{draw}/entries"
        out.append(raw_request("POST", path, port, body, {"X-Forwarded-For": address}))
    return out


def _keyed(request: bytes) -> bytes:
    """``request`` under an Idempotency-Key: for Redis, another request."""
    head, _, body = request.partition(b"\r\n\r\n")
    return head + b"\r\nIdempotency-Key: memory\r\n\r\n" + body


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cancel_on_sigterm()  # a SIGTERM (timeout, CI) then stops the engine it started
    maintenance, dsn, redis = bench_urls()
    await reset_database(maintenance, dsn)
    await flush_redis(redis)
    secret, admin = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    workdir = Path(tempfile.mkdtemp(prefix="guichet-memory-"))
    env = engine_env(dsn, redis, secret, admin, workdir, 1, GUICHET_LIMIT_ADDRESS="1/1h")
    server = Server("engine", [sys.executable, "-m", "engine", "serve"], env, workdir, None)
    rows: list[dict[str, Any]] = []
    try:
        server.start()
        await server.wait_ready()
        (worker,) = server.worker_pids()
        release = (await seed(server.port, admin, {"r": (120, 10000)}))["r"]
        draw = await _seed_draw(server.port, admin)
        challenge = json.dumps({"release": release["id"]}).encode()
        rss, peak = memory_kib(worker)
        rows.append({"round": 0, "addresses": 0, "rss_mib": _mib(rss), "rss_peak_mib": _mib(peak)})
        print(f"{'round':>5} {'addresses':>10} {'RSS MiB':>8} {'peak MiB':>8}  seconds")
        print(f"{0:>5} {0:>10} {_mib(rss):>8} {_mib(peak):>8}  (started, releases seeded)")
        minter = Minter(secret)  # one for the run: its addresses are never seen twice
        for n in range(1, args.rounds + 1):
            minter.expires_ms = int((time.time() + 1800) * 1000)  # however long the run
            holds, addresses = minter.holds(
                server.port, release["id"], release["slots"], args.addresses
            )
            entries = _entries(minter, server.port, draw, addresses, n * args.addresses)
            asks = [
                raw_request(
                    "POST", "/v1/challenges", server.port, challenge, {"X-Forwarded-For": a}
                )
                for a in addresses
            ]
            started = time.perf_counter()
            keyed = [_keyed(h) for h in holds]
            for batch, expect in (
                (holds, 201),
                (holds, 201),
                (keyed, 410),
                (entries, 201),
                (entries, 201),
                (asks, 429),
                (asks, 429),
            ):
                await _send(server.port, batch, args.connections, expect)
            await drop_holds(redis, release["id"])
            rss, peak = memory_kib(worker)
            row = {
                "round": n,
                "addresses": n * args.addresses,
                "rss_mib": _mib(rss),
                "rss_peak_mib": _mib(peak),
                "seconds": round(time.perf_counter() - started, 1),
            }
            rows.append(row)
            print(
                f"{n:>5} {row['addresses']:>10} {row['rss_mib']:>8} {row['rss_peak_mib']:>8}  "
                f"{row['seconds']}",
                flush=True,
            )
    finally:
        server.stop()
        await flush_redis(redis)
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "engine_commit": engine_commit(),
        "command": " ".join(sys.argv),
        "host": HOST,
        "rounds": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--addresses", type=int, default=25_000, help="new addresses a round")
    parser.add_argument("--connections", type=int, default=64)
    report = asyncio.run(run(parser.parse_args()))
    print(f"report: {write_report(report, 'memory')}")


if __name__ == "__main__":
    main()
