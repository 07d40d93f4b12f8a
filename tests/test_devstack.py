"""scripts/devstack.py, which `make run` and `make test` call to reach Redis and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import DATABASE_URL, REDIS_URL
from tests.procs import REPO_ROOT


def test_the_tests_need_a_redis_server_binary_even_where_a_redis_answers(tmp_path: Path) -> None:
    # The stores are given (used as they are, nothing probed); on this PATH neither
    # redis-server nor apt-get is found.
    env = {
        **os.environ,
        "PATH": str(tmp_path / "empty"),
        "GUICHET_REDIS_URL": REDIS_URL,
        "GUICHET_DATABASE_URL": DATABASE_URL,
    }
    up = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "devstack.py"),
        "up",
        "--data-dir",
        str(tmp_path / "data"),
        "--env-file",
        str(tmp_path / "env.sh"),
    ]
    served = subprocess.run(up, env=env, capture_output=True, text=True, timeout=60)
    assert served.returncode == 0, served.stderr
    tests = subprocess.run(
        [*up, "--for-tests"], env=env, capture_output=True, text=True, timeout=60
    )
    assert tests.returncode == 1
    assert tests.stderr.startswith("devstack: redis-server not found"), tests.stderr
    assert "the tests start private Redis servers" in tests.stderr
