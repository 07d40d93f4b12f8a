"""The contract: /openapi.json is valid OpenAPI 3.1 and lists every route of API.md; the
ops endpoints answer; configuration errors name the variable."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from openapi_spec_validator import validate
from redis.asyncio import Redis

import engine.settings
from engine.keys import SWEEPER_LOCK
from engine.openapi import document
from engine.routes import ROUTES
from engine.settings import KNOWN_VARIABLES, ConfigError, Settings, unknown_variables
from tests.api import Api
from tests.conftest import DATABASE_URL, REDIS_URL
from tests.contract import check_reply
from tests.procs import HOST, REPO_ROOT, dead_port

API_MD_ROUTES = {
    ("get", "/v1/sites"),
    ("get", "/v1/releases"),
    ("get", "/v1/releases/{release}/slots"),
    ("post", "/v1/challenges"),
    ("post", "/v1/holds"),
    ("post", "/v1/holds/{hold_id}/confirm"),
    ("delete", "/v1/holds/{hold_id}"),
    ("get", "/v1/bookings/{reference}"),
    ("delete", "/v1/bookings/{reference}"),
    ("put", "/v1/admin/sites/{site}"),
    ("post", "/v1/admin/releases"),
    ("patch", "/v1/admin/releases/{release}"),
    ("post", "/v1/admin/bookings"),
    ("get", "/v1/admin/agenda"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
}


async def test_openapi_document(api: Api) -> None:
    r = await api.call("GET", "/openapi.json")
    assert r.status == 200
    validate(r.body)
    served = {(m, p) for p, ops in r.body["paths"].items() for m in ops}
    assert served >= API_MD_ROUTES
    hold = r.body["paths"]["/v1/holds"]["post"]
    assert {"201", "403", "404", "409", "410", "429", "503", "413"} <= set(hold["responses"])
    # API.md: 429 and 503 carry Retry-After; and the problem's ``level`` says which limit.
    for ops in r.body["paths"].values():
        for op in ops.values():
            for status in {"429", "503"} & set(op["responses"]):
                assert "Retry-After" in op["responses"][status]["headers"]
    assert "level" in r.body["components"]["schemas"]["Problem"]["properties"]


def test_every_json_reply_has_its_schema() -> None:
    """Each operation's success is documented with the schema of its body (engine/replies.py),
    except the ones whose body is not one of ours to describe."""
    doc = document(ROUTES)
    undescribed = {("get", "/metrics"), ("get", "/openapi.json")}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            [ok] = [status for status in op["responses"] if status.startswith("2")]
            content = op["responses"][ok].get("content")
            if ok == "204" or (method, path) in undescribed:
                assert content is None, (method, path)
            else:
                assert "$ref" in content["application/json"]["schema"], (method, path)


def test_every_route_that_sheds_documents_its_503() -> None:
    """A route refused past the worker's in-flight cap answers 503 overloaded: its
    operation must say so (``/openapi.json`` itself did not)."""
    doc = document(ROUTES)
    for route in ROUTES:
        if route.sheds:
            responses = doc["paths"][route.path][route.method.lower()]["responses"]
            assert "503" in responses, (route.method, route.path)


async def test_a_reply_unlike_its_schema_fails_the_tests(api: Api) -> None:
    """``Api.call`` checks every 2xx reply against the document: a reply with a missing
    field, an extra field, a wrong type or a status other than the documented one fails."""
    await api.site()
    release = await api.publish([1])
    slot = release["slots"][0]["id"]
    hold = (await api.hold(slot)).body
    check_reply("POST", "/v1/holds", 201, "application/json", hold)
    wrong = [
        {k: v for k, v in hold.items() if k != "hold_token"},
        {**hold, "debug": "x"},
        {**hold, "slot": {**hold["slot"], "duration_minutes": "15"}},
        {**hold, "expires_at": "tomorrow"},
    ]
    for body in wrong:
        with pytest.raises(AssertionError, match="not as documented"):
            check_reply("POST", "/v1/holds", 201, "application/json", body)
    with pytest.raises(AssertionError, match="not a documented status"):
        check_reply("POST", "/v1/holds", 200, "application/json", hold)
    with pytest.raises(AssertionError, match=r"not in /openapi\.json"):
        check_reply("GET", "/v1/holds", 200, "application/json", hold)


async def test_ops_endpoints(api: Api) -> None:
    assert (await api.call("GET", "/healthz")).status == 200
    ready = await api.call("GET", "/readyz")
    assert ready.status == 200 and ready.body["postgresql"] == ready.body["redis"] == "ok"
    await api.site()
    release = await api.publish([1])
    await api.book(release["slots"][0]["id"])
    metrics = await api.call("GET", "/metrics")
    assert metrics.status == 200
    text = metrics.body
    assert 'guichet_holds_total{outcome="granted"} 1.0' in text
    assert 'guichet_confirms_total{outcome="confirmed"} 1.0' in text
    # The Redis pipelining factor can be read off: commands sent per write.
    writes = re.search(r"^guichet_redis_writes_total (\S+)$", text, re.M)
    commands = re.search(r"^guichet_redis_commands_total (\S+)$", text, re.M)
    assert writes and commands, text
    assert 0 < float(writes[1]) <= float(commands[1])
    assert 'guichet_http_requests_total{method="POST",route="/v1/holds",status="201"} 1.0' in text
    assert "guichet_reconcile_corrections_total 0.0" in text


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GUICHET_PORT": "eighty"}, "GUICHET_PORT"),
        ({"GUICHET_WORKERS": "0"}, "GUICHET_WORKERS"),
        ({"GUICHET_PG_POOL_SIZE": "0"}, "GUICHET_PG_POOL_SIZE"),
        # 0 refused every booking and every draw win (none has fewer cancellations than 0).
        ({"GUICHET_MAX_CANCELLATIONS_PER_IDENTITY": "0"}, "GUICHET_MAX_CANCELLATIONS"),
        ({"GUICHET_ENV": "production"}, "GUICHET_SECRET"),
        ({"GUICHET_SECRET": "short"}, "GUICHET_SECRET"),
        (
            {"GUICHET_ENV": "production", "GUICHET_SECRET": "x" * 40, "GUICHET_ADMIN_TOKEN": "pw"},
            "GUICHET_ADMIN_TOKEN",
        ),
        ({"GUICHET_ADMIN_TOKEN": "mot-de-passe-très-long"}, "GUICHET_ADMIN_TOKEN"),
        ({"GUICHET_ADMIN_TOKENS": "x" * 40}, "GUICHET_ADMIN_TOKENS: item 1"),  # no name
        ({"GUICHET_ADMIN_TOKENS": f"amina:{'a' * 40},Bruno:{'b' * 40}"}, "item 2"),
        ({"GUICHET_ADMIN_TOKENS": f"admin:{'a' * 40}"}, "GUICHET_ADMIN_TOKENS"),
        ({"GUICHET_ADMIN_TOKENS": f"amina:{'a' * 40},amina:{'b' * 40}"}, "twice"),
        ({"GUICHET_ADMIN_TOKENS": f"amina:{'a' * 40},bruno:{'a' * 40}"}, "of their own"),
        (
            {"GUICHET_ADMIN_TOKEN": "a" * 40, "GUICHET_ADMIN_TOKENS": f"amina:{'a' * 40}"},
            "of their own",
        ),
        (
            {
                "GUICHET_ENV": "production",
                "GUICHET_SECRET": "x" * 40,
                "GUICHET_ADMIN_TOKENS": "amina:short",
            },
            r"GUICHET_ADMIN_TOKENS \(amina\) must be at least 32",
        ),
        ({"GUICHET_TRUSTED_PROXIES": "10.0.0.0/8 nonsense"}, "nonsense"),
        ({"GUICHET_RETENTION_DAYS": "10"}, "GUICHET_IDENTITY_PERIOD_DAYS"),
        ({"GUICHET_REDIS_URL": "http://x"}, "GUICHET_REDIS_URL"),
    ],
)
def test_configuration_errors_name_the_variable(
    env: dict[str, str], message: str, tmp_path: object
) -> None:
    base = {"GUICHET_DATA_DIR": str(tmp_path), "GUICHET_SECRET": "x" * 40}
    if env.get("GUICHET_ENV") == "production" and "GUICHET_SECRET" not in env:
        base.pop("GUICHET_SECRET")
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({**base, **env})


def test_the_shipped_example_configuration_is_refused_in_production(tmp_path: object) -> None:
    """deploy/guichet.env.example, copied as it is: its secret is long enough, and public.
    With it anyone could sign challenges of difficulty 0 and derive tokens and identity
    hashes; it was taken. Each of its placeholders is refused in production."""
    example = (REPO_ROOT / "deploy" / "guichet.env.example").read_text()
    env = dict(
        line.split("=", 1) for line in example.splitlines() if "=" in line and line[0] != "#"
    )
    env["GUICHET_DATA_DIR"] = str(tmp_path)
    assert env["GUICHET_ENV"] == "production"
    with pytest.raises(ConfigError, match="GUICHET_SECRET is the example's placeholder"):
        Settings.from_env(env)
    env["GUICHET_SECRET"] = "s" * 48
    env["GUICHET_ADMIN_TOKEN"] = "change-me-" + "t" * 32  # long enough, still the example's
    with pytest.raises(ConfigError, match="GUICHET_ADMIN_TOKEN is the example's placeholder"):
        Settings.from_env(env)


def test_agents_tokens_are_read_and_never_quoted_in_errors(tmp_path: object) -> None:
    env = {"GUICHET_DATA_DIR": str(tmp_path), "GUICHET_SECRET": "x" * 40}
    agents = f" amina:{'a' * 40} , bruno.d:{'b' * 40}\n,"
    settings = Settings.from_env({**env, "GUICHET_ADMIN_TOKENS": agents})
    assert settings.admin_agents == (("amina", "a" * 40), ("bruno.d", "b" * 40))
    with pytest.raises(ConfigError) as refused:  # a token written without its name
        Settings.from_env({**env, "GUICHET_ADMIN_TOKENS": "s3cr3t-" * 6})
    assert "s3cr3t" not in str(refused.value)


def test_an_admin_token_read_from_a_file_keeps_no_newline(tmp_path: object) -> None:
    """`GUICHET_ADMIN_TOKEN=$(cat file)` drops the newline, an env file may not: the
    header's token is stripped, so a token kept with its newline matched none."""
    env = {"GUICHET_DATA_DIR": str(tmp_path), "GUICHET_SECRET": "x" * 40}
    settings = Settings.from_env({**env, "GUICHET_ADMIN_TOKEN": "a" * 40 + "\n"})
    assert settings.admin_token == "a" * 40


def test_trusted_proxies_written_as_ipv6_are_read_as_ipv4(tmp_path: object) -> None:
    """Client addresses written ``::ffff:a.b.c.d`` are read as IPv4: so are the proxies,
    else a proxy configured that way would never be found trusted."""
    env = {
        "GUICHET_DATA_DIR": str(tmp_path),
        "GUICHET_SECRET": "x" * 40,
        "GUICHET_TRUSTED_PROXIES": "::ffff:127.0.0.1, ::ffff:192.0.2.0/120 fd00::/8",
    }
    assert Settings.from_env(env).trusted_proxies == {
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("fd00::/8"),
    }


def test_development_secret_is_generated_once(tmp_path: object) -> None:
    env = {"GUICHET_DATA_DIR": str(tmp_path)}
    first = Settings.from_env(env)
    assert Settings.from_env(env).secret == first.secret and len(first.secret) >= 32


def test_the_pool_size_is_a_setting(tmp_path: object) -> None:
    base = {"GUICHET_DATA_DIR": str(tmp_path), "GUICHET_SECRET": "x" * 40}
    assert Settings.from_env(base).pg_pool_size == 10
    assert Settings.from_env({**base, "GUICHET_PG_POOL_SIZE": "32"}).pg_pool_size == 32


def test_misspelt_settings_are_named() -> None:
    env = {"GUICHET_WORKRES": "2", "GUICHET_PORT": "80", "GUICHET_TEST_REDIS_URL": "x", "HOME": "/"}
    assert unknown_variables(env) == ["GUICHET_WORKRES"]


def test_every_variable_read_is_known() -> None:
    """KNOWN_VARIABLES cannot drift from what from_env reads."""
    source = (Path(engine.settings.__file__)).read_text()
    read = set(re.findall(r'"(GUICHET_[A-Z0-9_]*[A-Z0-9])"', source))
    assert read and read <= KNOWN_VARIABLES, read - KNOWN_VARIABLES


def migrate_cli(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`guichet migrate` in a process of its own, with only ``env``'s GUICHET_ variables
    (and an engine database URL nothing listens on, unless ``env`` names one)."""
    return subprocess.run(
        [sys.executable, "-m", "engine", "migrate"],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("GUICHET_")},
            "GUICHET_DATA_DIR": str(tmp_path),
            "GUICHET_SECRET": "x" * 40,
            "GUICHET_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def sweep_cli(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`guichet sweep` in a process of its own, on the test stores, with only ``env``'s
    GUICHET_ variables on top (and any other variable of ``env``)."""
    return subprocess.run(
        [sys.executable, "-m", "engine", "sweep"],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("GUICHET_")},
            "GUICHET_DATA_DIR": str(tmp_path),
            "GUICHET_SECRET": "x" * 40,
            "GUICHET_DATABASE_URL": DATABASE_URL,
            "GUICHET_REDIS_URL": REDIS_URL,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_command_whose_store_does_not_answer_says_so_in_one_line(tmp_path: Path) -> None:
    """`guichet sweep` (as `guichet demo`) with a Redis nothing listens on: one line that
    says which store and to try again, and exit code 1, not a traceback."""
    with dead_port() as port:
        done = sweep_cli(tmp_path, GUICHET_REDIS_URL=f"redis://{HOST}:{port}/0")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "guichet: Redis did not answer; try again" in done.stderr, done.stderr


async def test_a_sweep_by_hand_says_when_a_worker_is_sweeping(tmp_path: Path) -> None:
    """`guichet sweep` while a worker's sweeper holds the lock visits nothing: it says so,
    and fails, instead of reporting a pass that found nothing to do."""
    redis = Redis.from_url(REDIS_URL)
    try:
        await redis.set(SWEEPER_LOCK, "a worker", px=60_000)
        done = await asyncio.to_thread(sweep_cli, tmp_path)
    finally:
        await redis.delete(SWEEPER_LOCK)
        await redis.aclose()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "a worker is sweeping" in done.stderr and "swept" not in done.stdout


def test_a_command_leaves_nothing_among_the_workers_metrics(tmp_path: Path) -> None:
    """`guichet sweep` with the workers' PROMETHEUS_MULTIPROC_DIR in its environment (an
    env file shared with `guichet serve`): nothing of it lands there. Its heartbeat, frozen
    once it has ended, would read as a worker stuck, and page."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    done = sweep_cli(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(metrics_dir.iterdir()) == []


def test_the_engine_warns_of_unknown_settings(tmp_path: Path) -> None:
    done = migrate_cli(tmp_path, GUICHET_POOL_SIZE="32")
    assert "GUICHET_POOL_SIZE is not a setting" in done.stderr, done.stderr


def test_migrations_go_where_guichet_migrate_database_url_says(
    tmp_path: Path, database: str
) -> None:
    """Behind pgbouncer the engine's GUICHET_DATABASE_URL is pgbouncer's; `guichet migrate`
    must reach PostgreSQL itself (deploy/pgbouncer.ini). Here the engine's URL is a port
    nothing listens on: migrate succeeds through the other."""
    done = migrate_cli(tmp_path, GUICHET_MIGRATE_DATABASE_URL=database)
    assert done.returncode == 0, done.stderr
    assert "migration(s) applied" in done.stdout
