"""The README's client and the demo data work together, as a newcomer would use them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

from aiohttp.test_utils import TestClient

from engine import demo
from engine.appkeys import RESERVATIONS

ROOT = Path(__file__).resolve().parent.parent


def test_readme_client_is_docs_client() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S)
    assert block is not None
    assert block.group(1) in (ROOT / "docs" / "client.py").read_text()
    opening = readme.splitlines()[:10]
    assert any(line.startswith("make run ") for line in opening)
    assert any(line.startswith("make test ") for line in opening)


async def test_demo_then_readme_client_books(client: TestClient) -> None:
    domain = client.app[RESERVATIONS]
    created = await demo.seed(domain)
    assert len(created) == 6
    assert await demo.seed(domain) == []  # idempotent
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "docs" / "client.py"),
        env={**os.environ, "GUICHET_API": str(client.make_url("")).rstrip("/")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    printed = json.loads(out)
    assert printed["booking"]["status"] == "confirmed"
    assert printed["booking"]["applicant"] == {"family_name": "Diallo", "given_names": "Aminata"}
