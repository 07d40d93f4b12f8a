"""The ``guichet`` command (also ``python -m engine``).

serve       serve the HTTP API (GUICHET_HOST, GUICHET_PORT, GUICHET_WORKERS)
migrate     apply the SQL migrations the database has not seen (idempotent)
demo        seed the demo sites and releases (idempotent)
sweep       one sweeper pass now: reclaim, settle stale confirms, reconcile
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from engine.settings import ConfigError, Settings

if TYPE_CHECKING:
    from engine.reservations import Reservations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guichet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve the HTTP API")
    sub.add_parser("migrate", help="apply pending SQL migrations")
    sub.add_parser("demo", help="seed demo sites and releases")
    sub.add_parser("sweep", help="run one sweeper pass, with a reconcile")
    args = parser.parse_args(argv)

    from engine import logs

    logs.configure()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"guichet: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        from engine.serve import serve

        serve(settings)
        return 0
    commands: dict[str, Callable[[Settings], Coroutine[Any, Any, int]]] = {
        "migrate": _migrate,
        "demo": _demo,
        "sweep": _sweep,
    }
    return asyncio.run(commands[args.command](settings))


async def _migrate(settings: Settings) -> int:
    from engine.migrate import migrate

    applied = await migrate(settings.database_url)
    print(f"guichet: {len(applied)} migration(s) applied" + (f": {applied}" if applied else ""))
    return 0


async def _demo(settings: Settings) -> int:
    from engine import demo

    async with _domain(settings) as domain:
        created = await demo.seed(domain)
    print(f"guichet: demo seeded, {len(created)} release(s) created")
    return 0


async def _sweep(settings: Settings) -> int:
    from engine.sweeper import sweep_once

    async with _domain(settings) as domain:
        report = await sweep_once(domain, reconcile=True)
    print(
        f"guichet: swept {report.releases} release(s), settled {report.settled} confirm(s), "
        f"{report.corrections} correction(s)"
    )
    return 0


@contextlib.asynccontextmanager
async def _domain(settings: Settings) -> AsyncIterator[Reservations]:
    """The domain with its stores, for one command."""
    from engine.app import redis_client
    from engine.inventory import Inventory
    from engine.metrics import Metrics
    from engine.reservations import Reservations
    from engine.store import IdentityRules, Store, create_pool

    pool = await create_pool(settings.database_url, settings.pg_timeout_s, 2)
    redis = redis_client(settings)
    try:
        yield Reservations(
            settings,
            Store(pool, settings.pg_timeout_s, settings.retry_after_s, IdentityRules.of(settings)),
            Inventory(redis, settings.redis_timeout_s, settings.retry_after_s),
            Metrics(),
        )
    finally:
        await pool.close()
        await redis.aclose()
