"""How much memory one engine worker takes, and whether a flood can grow it without bound.

    python loadtests/memory.py [--rounds 6] [--addresses 25000] [--connections 64]

One worker (GUICHET_WORKERS=1) with the benchmark's generous limits, but for 1 challenge an
hour per address. Each round comes from that many addresses never seen before (a botnet's,
or a proxy farm's), and each address sends:
  1. a hold with a fresh pre-solved challenge;
  2. the same request again, as a phone whose answer was lost retries: the same hold is
     answered, and the worker remembers the challenge as spent;
  3. two challenge requests: the second refused (its bucket empty), which the worker
     remembers too.
After each round it prints the worker's resident memory (VmRSS) and its high-water mark
(VmHWM). What the worker keeps per client is capped (addresses parsed and bucket names:
16 384 each; refusals and spent challenges: 100 000 each), so once past the caps (the
default run goes to 150 000 addresses) the resident memory should level off. The holds
are dropped from Redis after each round, so that the sweeper's reading of them does not
grow either.

Data: the benchmark's (``bench.py``): database ``guichet_bench`` (dropped and migrated
again) and Redis database 13 (flushed at the start and the end). Writes
``loadtests/reports/memory-<UTC time>.json``; BENCHMARKS.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import (
    HOST,
    Minter,
    Server,
    bench_urls,
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


async def _send(port: int, requests: list[bytes], connections: int) -> Counter[int]:
    """Send each request once; the replies' statuses."""
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
        raise SystemExit(f"memory: {len(requests) - len(replies)} requests not answered")
    return Counter(status for status, _ in replies.values())


async def run(args: argparse.Namespace) -> dict[str, Any]:
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
        minter = Minter(secret)
        challenge = json.dumps({"release": release["id"]}).encode()
        rss, peak = memory_kib(worker)
        rows.append({"round": 0, "addresses": 0, "rss_mib": _mib(rss), "peak_mib": _mib(peak)})
        print(f"{'round':>5} {'addresses':>10} {'RSS MiB':>8} {'peak MiB':>8}  statuses")
        print(f"{0:>5} {0:>10} {_mib(rss):>8} {_mib(peak):>8}  (started, a release seeded)")
        for n in range(1, args.rounds + 1):
            holds, addresses = minter.holds(
                server.port, release["id"], release["slots"], args.addresses
            )
            asks = [
                raw_request(
                    "POST", "/v1/challenges", server.port, challenge, {"X-Forwarded-For": a}
                )
                for a in addresses
            ]
            started = time.perf_counter()
            statuses: Counter[int] = Counter()
            for batch in (holds, holds, asks, asks):  # each batch after the one before it
                statuses += await _send(server.port, batch, args.connections)
            await drop_holds(redis, release["id"])
            rss, peak = memory_kib(worker)
            row = {
                "round": n,
                "addresses": n * args.addresses,
                "rss_mib": _mib(rss),
                "peak_mib": _mib(peak),
                "statuses": dict(sorted(statuses.items())),
                "seconds": round(time.perf_counter() - started, 1),
            }
            rows.append(row)
            print(
                f"{n:>5} {row['addresses']:>10} {row['rss_mib']:>8} {row['peak_mib']:>8}  "
                + ", ".join(f"{s}: {c}" for s, c in row["statuses"].items()),
                flush=True,
            )
    finally:
        server.stop()
        await flush_redis(redis)
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
