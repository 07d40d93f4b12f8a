"""deploy/pgbouncer.ini, run: the engine's PostgreSQL through a real pgbouncer in
transaction pooling, on loopback.

The file is used as shipped, but for its port, authentication and database (the test's).
pgbouncer is not a Python package: where it is not installed (`apt-get install pgbouncer`)
this test is skipped, and `.ci/run` installs it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from engine.appkeys import LOTTERY
from engine.migrate import migrate
from tests.api import ADMIN, Api, applicant, ip
from tests.conftest import DATABASE_URL
from tests.procs import HOST, READY_S, REPO_ROOT, free_port, poll
from tests.test_limits import engine

PGBOUNCER = shutil.which("pgbouncer") or next(
    (p for p in ("/usr/sbin/pgbouncer", "/usr/local/bin/pgbouncer") if Path(p).exists()), None
)
pytestmark = pytest.mark.skipif(PGBOUNCER is None, reason="pgbouncer is not installed")


def shipped_config(folder: Path, port: int) -> str:
    """deploy/pgbouncer.ini pointed at the test database, on ``port``, trusting its user."""
    db = urlsplit(DATABASE_URL)
    text = (REPO_ROOT / "deploy" / "pgbouncer.ini").read_text()
    replacements = {
        r"^guichet = .*$": (
            f"guichet = host={db.hostname} port={db.port or 5432} dbname={db.path.lstrip('/')}"
            + (f" password={db.password}" if db.password else "")
        ),
        r"^listen_port = .*$": f"listen_port = {port}",
        r"^auth_type = .*$": "auth_type = trust",
        r"^auth_file = .*$": f"auth_file = {folder}/userlist.txt",
    }
    for pattern, line in replacements.items():
        text, n = re.subn(pattern, line, text, flags=re.MULTILINE)
        assert n == 1, f"deploy/pgbouncer.ini changed shape ({pattern}): update this test"
    return text + "unix_socket_dir =\n"


@pytest.fixture
def pgbouncer() -> Iterator[tuple[str, Path]]:
    """pgbouncer as shipped, in front of the test database: its DSN. It refuses to run as
    root: under root it runs as nobody, from a folder nobody can read (not pytest's)."""
    assert PGBOUNCER is not None
    folder = Path(tempfile.mkdtemp(prefix="guichet-pgbouncer-"))
    folder.chmod(0o755)
    port = free_port()
    user = urlsplit(DATABASE_URL).username or "postgres"
    (folder / "userlist.txt").write_text(f'"{user}" ""\n')
    (folder / "pgbouncer.ini").write_text(shipped_config(folder, port))
    as_nobody = ["-u", "nobody"] if os.geteuid() == 0 else []
    with open(folder / "pgbouncer.log", "wb") as log:  # its log goes to stderr
        proc = subprocess.Popen(
            [PGBOUNCER, *as_nobody, str(folder / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        yield f"postgresql://{user}@{HOST}:{port}/guichet", folder
    finally:
        try:
            proc.terminate()
            proc.wait(timeout=READY_S)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def pgbouncer_up(pgbouncer: tuple[str, Path]) -> str:
    """The DSN of pgbouncer (as the ``pgbouncer`` fixture), once it answers."""
    dsn, folder = pgbouncer

    async def up() -> bool:
        try:
            conn = await asyncpg.connect(dsn, statement_cache_size=0, timeout=1)
        except (OSError, asyncpg.PostgresError):
            return False
        await conn.close()
        return True

    def log() -> str:
        return "pgbouncer did not answer:\n" + (folder / "pgbouncer.log").read_text()

    await poll(up, log)
    return dsn


@pytest.fixture
async def through_pgbouncer(pgbouncer_up: str, clean: None) -> AsyncIterator[Api]:
    async with engine(database_url=pgbouncer_up, pg_statement_cache_size=0) as api:
        yield api


async def test_migrations_refuse_to_go_through_pgbouncer(pgbouncer_up: str) -> None:
    """Their lock is a session's: through transaction pooling it would stay held on a
    server connection, and every later migrate would wait for it. migrate sees that its
    settings did not arrive, and says where to point it."""
    with pytest.raises(RuntimeError, match="GUICHET_MIGRATE_DATABASE_URL"):
        await migrate(pgbouncer_up)


async def test_the_engine_through_pgbouncer_in_transaction_pooling(
    through_pgbouncer: Api, pg: asyncpg.Connection
) -> None:
    """Every kind of PostgreSQL work the engine does, through pgbouncer: publishing and
    changing a release, booking and cancelling, a staff booking, the agenda, a draw's
    entries and the draw itself (its locks are transaction-scoped)."""
    api = through_pgbouncer
    release = await api.publish([2, 1])
    slot = release["slots"][0]["id"]
    booked = await api.book(slot, applicant(), ip(1))
    assert booked["booking"]["status"] == "confirmed"
    cancel = {"Authorization": f"Bearer {booked['cancel_token']}"}
    reference = booked["booking"]["reference"]
    assert (await api.call("DELETE", f"/v1/bookings/{reference}", headers=cancel)).status == 204
    staff = {"slot_id": release["slots"][1]["id"], "applicant": applicant()}
    assert (await api.call("POST", "/v1/admin/bookings", staff, ADMIN)).status == 201
    # Many at once, so that pgbouncer hands the engine's connections server connections
    # other than those their statements were prepared on (what statement caching breaks).
    path = f"/v1/admin/releases/{release['id']}"
    reads = await asyncio.gather(*(api.call("GET", path, headers=ADMIN) for _ in range(100)))
    assert {r.status for r in reads} == {200}
    read = reads[0]
    patch = {"slots": [{"id": slot, "capacity": 3}]}
    etag = {**ADMIN, "If-Match": read.headers["ETag"]}
    changed = await api.call("PATCH", f"/v1/admin/releases/{release['id']}", patch, etag)
    assert changed.status == 200, changed.body
    day = release["slots"][0]["starts_at"][:10]
    agenda = await api.call("GET", f"/v1/admin/agenda?site=bobigny&date={day}", headers=ADMIN)
    assert agenda.status == 200
    drawn = (await api.publish_draw([1]))["id"]
    entry = await api.enter(drawn, applicant(), ip(2))
    assert entry.status == 201, entry.body
    api.clock.advance(90001)
    [outcome] = await api.client.app[LOTTERY].run_due()
    assert outcome.allocated == 1
    assert await pg.fetchval("SELECT count(*) FROM bookings WHERE status = 'confirmed'") == 2
