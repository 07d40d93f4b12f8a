"""deploy/nginx.conf, run: a real nginx in front of the engine, on loopback.

The file is used as shipped, but for what a test cannot have: its TLS listener becomes a
plain one on a free port, and its upstream is the test's engine. nginx is not a Python
package: where it is not installed (`apt-get install nginx-light`) this test is skipped,
and `.ci/run` installs it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.settings import Rate
from tests.api import ADMIN, Api, largest_release
from tests.procs import HOST, READY_S, REPO_ROOT, free_port, poll
from tests.test_limits import engine

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
NGINX_TYPES = next(
    (p for p in ("/etc/nginx/mime.types", "/usr/local/nginx/conf/mime.types") if Path(p).exists()),
    None,
)


def shipped_config(listen: int, upstream: int) -> str:
    """deploy/nginx.conf with a plain listener on ``listen`` and the engine on ``upstream``."""
    text = (REPO_ROOT / "deploy" / "nginx.conf").read_text()
    text, listens = re.subn(r"listen 443 ssl http2;", f"listen {HOST}:{listen};", text)
    text, servers = re.subn(r"server 127\.0\.0\.1:8080;", f"server {HOST}:{upstream};", text)
    assert (listens, servers) == (1, 1), "deploy/nginx.conf changed shape: update this test"
    return text


def start_nginx(folder: Path, listen: int, upstream: int) -> subprocess.Popen[bytes]:
    """nginx in the foreground, everything of its own in ``folder``. Bodies and replies are
    kept in memory: its workers (user nobody, under root) could not write to ``folder``.
    Its types are the ones shipped with nginx, as a usual nginx.conf includes them."""
    (folder / "logs").mkdir()
    (folder / "guichet.conf").write_text(shipped_config(listen, upstream))
    (folder / "nginx.conf").write_text(
        f"""daemon off;
pid {folder}/nginx.pid;
error_log {folder}/logs/error.log;
events {{}}
http {{
    access_log off;
    {f"include {NGINX_TYPES};" if NGINX_TYPES else ""}
    client_body_buffer_size 4m;
    proxy_max_temp_file_size 0;
    include {folder}/guichet.conf;
}}
"""
    )
    assert NGINX is not None
    with open(folder / "logs" / "stderr.log", "wb") as stderr:
        return subprocess.Popen(
            [NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


@pytest.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[tuple[Api, aiohttp.ClientSession]]:
    """An engine (3 challenges a minute per address), and a session that reaches it
    through nginx."""
    async with engine(limit_address=Rate(3, 60)) as api:
        listen = free_port()
        proc = start_nginx(tmp_path, listen, api.client.server.port)
        try:
            async with aiohttp.ClientSession(f"http://{HOST}:{listen}") as session:

                async def up() -> bool:
                    try:
                        async with session.get("/v1/sites") as r:
                            return r.status == 200
                    except aiohttp.ClientError:
                        return False

                def log() -> str:
                    return "".join(p.read_text() for p in (tmp_path / "logs").iterdir())

                await poll(up, log)
                yield api, session
        finally:
            proc.terminate()
            proc.wait(timeout=READY_S)


async def test_nginx_as_shipped_in_front_of_the_engine(
    proxied: tuple[Api, aiohttp.ClientSession],
) -> None:
    api, session = proxied
    release = (await api.publish([1]))["id"]

    async def post(path: str, body: Any, headers: dict[str, str]) -> tuple[int, str, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **headers}
        async with session.post(path, data=data, headers=headers) as r:
            return r.status, r.content_type, await r.read()

    # A client's own X-Forwarded-For is replaced, not appended to: rotating it does not
    # give a bot a new address (the engine trusts nginx's, 127.0.0.1 here).
    statuses = []
    for n in range(4):
        spoofed = {"X-Forwarded-For": f"6.6.6.{n}"}
        status, ctype, body = await post("/v1/challenges", {"release": release}, spoofed)
        statuses.append(status)
    assert statuses == [201, 201, 201, 429]
    assert (ctype, json.loads(body)["level"]) == ("application/problem+json", "address")
    # A body over the public limit reaches the engine, whose 413 is problem+json (and has a
    # request id, which nginx's own answers have not).
    async with session.post(
        "/v1/holds",
        data=json.dumps({"slot_id": "x" * 17_000}).encode(),
        headers={"Content-Type": "application/json"},
    ) as r:
        assert (r.status, r.content_type) == (413, "application/problem+json")
        assert "X-Request-Id" in r.headers
    # Staff's: a release of 2 000 slots (about 250 KiB) reaches the engine.
    status, _, body = await post("/v1/admin/releases", largest_release(api.clock.now), ADMIN)
    assert status == 201, body[:300]
    # The metrics and the probes are for the monitoring network only.
    for private in ("/metrics", "/readyz", "/healthz"):
        async with session.get(private) as r:
            assert r.status == 403, private
    # nginx's request id reaches the engine, which answers with it.
    async with session.get("/v1/sites", headers={"X-Request-Id": "from-the-client"}) as r:
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-Id"])
    # What nginx answers itself is problem+json: a body over its own bound...
    async with session.post(
        "/v1/holds",
        data=json.dumps({"slot_id": "x" * 70_000}).encode(),
        headers={"Content-Type": "application/json"},
    ) as r:
        assert (r.status, r.content_type) == (413, "application/problem+json")
        assert "X-Request-Id" not in r.headers  # nginx's, not the engine's
        assert (await r.json(content_type=None))["type"] == "/problems/payload-too-large"
    # ... and an engine that does not answer: 503 with Retry-After, as a store's outage.
    await api.client.server.close()
    async with session.get("/openapi.json") as r:  # not typed by its extension
        assert (r.status, r.content_type) == (503, "application/problem+json")
        assert int(r.headers["Retry-After"]) >= 1
        assert (await r.json(content_type=None))["type"] == "/problems/overloaded"
