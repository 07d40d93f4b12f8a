"""Configuration, read strictly from the environment.

A bad value is an error that names the variable and the value; nothing is read at import time.
Tests build ``Settings(...)`` directly.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/guichet"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A configuration variable has a value the engine cannot use."""


@dataclass(frozen=True, slots=True)
class Settings:
    secret: bytes
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    admin_token: str | None = None
    env: str = "development"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    hold_ttl_s: int = 600
    trusted_proxies: tuple[Network, ...] = ()
    pow_difficulty: int = 20
    pow_puzzles: int = 4
    challenge_ttl_s: int = 300
    # Every store call is bounded; an unanswered call becomes 503 with this Retry-After.
    redis_timeout_s: float = 1.0
    pg_timeout_s: float = 5.0
    pg_pool_size: int = 10
    retry_after_s: int = 2
    max_body_bytes: int = 16 * 1024
    max_in_flight: int = 2000
    # Per client address: attempts (challenges, holds, confirms) per second, and burst.
    client_rate_per_s: float = 5.0
    client_burst: int = 20
    # A confirm whose PostgreSQL step did not report back after this long is settled by the
    # sweeper from PostgreSQL's answer. Longer than any transaction can live (see pg_timeout_s).
    confirm_grace_s: float = 30.0
    sweep_interval_s: float = 1.0
    reconcile_interval_s: float = 30.0
    listing_cache_s: float = 0.5
    release_cache_s: float = 2.0
    access_log: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``GUICHET_*`` variables; raise ConfigError naming the first bad one."""
        env = os.environ if environ is None else environ
        mode = env.get("GUICHET_ENV", "development")
        if mode not in ("development", "production"):
            raise ConfigError(f"GUICHET_ENV must be 'development' or 'production', not {mode!r}")
        data_dir = Path(env.get("GUICHET_DATA_DIR", ".guichet"))
        raw_secret = env.get("GUICHET_SECRET")
        if raw_secret is None:
            if mode == "production":
                raise ConfigError("GUICHET_SECRET is required when GUICHET_ENV=production")
            raw_secret = _local_secret(data_dir)
        if len(raw_secret) < 32:
            raise ConfigError("GUICHET_SECRET must be at least 32 characters")
        return cls(
            secret=raw_secret.encode(),
            database_url=env.get("GUICHET_DATABASE_URL", DEFAULT_DATABASE_URL),
            redis_url=_redis_url(env.get("GUICHET_REDIS_URL", DEFAULT_REDIS_URL)),
            admin_token=env.get("GUICHET_ADMIN_TOKEN") or None,
            env=mode,
            host=env.get("GUICHET_HOST", "127.0.0.1"),
            port=_int(env, "GUICHET_PORT", 8080, 0, 65535),
            workers=_int(env, "GUICHET_WORKERS", 1, 1, 256),
            hold_ttl_s=_int(env, "GUICHET_HOLD_TTL", 600, 10, 86400),
            trusted_proxies=_networks(env.get("GUICHET_TRUSTED_PROXIES", "")),
            pow_difficulty=_int(env, "GUICHET_POW_DIFFICULTY", 20, 0, 32),
            pow_puzzles=_int(env, "GUICHET_POW_PUZZLES", 4, 1, 64),
            access_log=env.get("GUICHET_ACCESS_LOG", "0") == "1",
        )


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, not {value}")
    return value


def _redis_url(url: str) -> str:
    if not url.startswith(("redis://", "rediss://", "redis+cluster://", "unix://")):
        raise ConfigError(
            f"GUICHET_REDIS_URL must start with redis:// or redis+cluster://, not {url!r}"
        )
    return url


def _networks(raw: str) -> tuple[Network, ...]:
    nets = []
    for item in raw.replace(",", " ").split():
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(
                f"GUICHET_TRUSTED_PROXIES has a bad address or CIDR: {item!r}"
            ) from None
    return tuple(nets)


def _local_secret(data_dir: Path) -> str:
    """The development secret: generated once, kept in the data folder, private to its owner."""
    path = data_dir / "secret"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value
