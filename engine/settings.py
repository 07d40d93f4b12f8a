"""Configuration, read strictly from the environment.

A bad value is an error that names the variable and the value; nothing is read at import time.
Tests build ``Settings(...)`` directly.
"""

from __future__ import annotations

import ipaddress
import os
import re
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
class Rate:
    """A token bucket: ``burst`` tokens, refilled at ``burst`` per ``period_s`` seconds."""

    burst: int
    period_s: float

    @property
    def per_s(self) -> float:
        return self.burst / self.period_s

    @classmethod
    def parse(cls, name: str, raw: str) -> Rate:
        """``20/10s``: 20 at once, 20 more every 10 seconds (units s, m, h, d)."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*([smhd])\s*", raw)
        if m is None or int(m.group(1)) == 0 or int(m.group(2)) == 0:
            raise ConfigError(
                f"{name} must look like 20/10s (count/period, s m h or d), not {raw!r}"
            )
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(3)]
        return cls(int(m.group(1)), int(m.group(2)) * unit)

    def __str__(self) -> str:
        return f"{self.burst}/{self.period_s:g}s"


# Each limit's variable and its default; docs/abuse.md says why these values.
LIMITS = {
    "limit_address": ("GUICHET_LIMIT_ADDRESS", Rate(20, 10)),
    "limit_net": ("GUICHET_LIMIT_NET", Rate(200, 10)),
    "limit_net48": ("GUICHET_LIMIT_NET48", Rate(500, 10)),
    "limit_session": ("GUICHET_LIMIT_SESSION", Rate(10, 20)),
    "limit_identity": ("GUICHET_LIMIT_IDENTITY", Rate(10, 3600)),
    "limit_hold": ("GUICHET_LIMIT_HOLD", Rate(20, 3600)),
    "limit_global_challenge": ("GUICHET_LIMIT_GLOBAL_CHALLENGE", Rate(50_000, 10)),
    "limit_global_confirm": ("GUICHET_LIMIT_GLOBAL_CONFIRM", Rate(10_000, 10)),
    "limit_lookup": ("GUICHET_LIMIT_LOOKUP", Rate(10, 60)),
    "limit_lookup_net": ("GUICHET_LIMIT_LOOKUP_NET", Rate(100, 60)),
}


@dataclass(frozen=True, slots=True)
class Settings:
    secret: bytes
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    admin_token: str | None = None
    # Each agent's own admin token, by name (GUICHET_ADMIN_TOKENS): the audit log and the
    # logs then say which agent did what. GUICHET_ADMIN_TOKEN's agent is "admin".
    admin_agents: tuple[tuple[str, str], ...] = ()
    env: str = "development"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    hold_ttl_s: int = 600
    # A frozenset: it is part of cache keys per request, and a frozenset keeps its hash.
    trusted_proxies: frozenset[Network] = frozenset()
    pow_difficulty: int = 20
    pow_puzzles: int = 4
    challenge_ttl_s: int = 300
    # A first-come release's challenges are issued from this long before it opens: time for
    # a phone to solve one, not for a farm to stockpile them (docs/abuse.md).
    challenge_lead_s: int = 180
    # Every store call is bounded; an unanswered call becomes 503 with this Retry-After.
    redis_timeout_s: float = 1.0
    pg_timeout_s: float = 5.0
    pg_pool_size: int = 10
    # asyncpg's prepared statements kept per connection; 0 behind pgbouncer in transaction
    # mode, whose server connections change between transactions (deploy/README.md).
    pg_statement_cache_size: int = 100
    # Where `guichet migrate` connects: PostgreSQL itself when the engine goes through
    # pgbouncer (a migration's lock is a session's). None: database_url.
    migrate_database_url: str | None = None
    retry_after_s: int = 2
    max_body_bytes: int = 16 * 1024
    # Staff's bodies: a release of the most slots the schema takes (2 000) is about 250 KiB.
    max_admin_body_bytes: int = 1024 * 1024
    max_in_flight: int = 2000
    # Token buckets (see LIMITS and docs/abuse.md). Challenges are the gate of every
    # attempt: address, network, session and global buckets are taken when one is issued.
    limit_address: Rate = LIMITS["limit_address"][1]
    limit_net: Rate = LIMITS["limit_net"][1]
    limit_net48: Rate = LIMITS["limit_net48"][1]
    limit_session: Rate = LIMITS["limit_session"][1]
    limit_identity: Rate = LIMITS["limit_identity"][1]
    limit_hold: Rate = LIMITS["limit_hold"][1]
    limit_global_challenge: Rate = LIMITS["limit_global_challenge"][1]
    limit_global_confirm: Rate = LIMITS["limit_global_confirm"][1]
    # Lookups of a booking or an entry that find nothing (or take a wrong token), by
    # address and by network: each was a PostgreSQL query.
    limit_lookup: Rate = LIMITS["limit_lookup"][1]
    limit_lookup_net: Rate = LIMITS["limit_lookup_net"][1]
    # Adaptive proof of work: up to this many bits more as a client's buckets empty, and
    # this many more again under global pressure, for clients already escalated.
    pow_max_extra_bits: int = 6
    pow_global_extra_bits: int = 2
    max_unspent_challenges: int = 3
    max_live_holds: int = 1
    session_ttl_s: int = 86400
    # Identity rules against resale, over a sliding period.
    identity_period_days: int = 30
    max_bookings_per_identity: int = 3
    max_cancellations_per_identity: int = 2
    max_active_per_email: int = 4
    # Personal data of an appointment is erased this many days after it (0: never).
    retention_days: int = 90
    # A confirm whose PostgreSQL step did not report back after this long is settled by the
    # sweeper from PostgreSQL's answer. It must outlive any booking transaction: that is at
    # most ~12 statements (locks and trigger included), each bounded by pg_timeout_s, with
    # idle gaps bounded by it too, so about 12 x 5 s; 120 s leaves a margin.
    confirm_grace_s: float = 120.0
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
        _not_a_placeholder("GUICHET_SECRET", raw_secret, mode)
        # As the token comes in a header, stripped: a file's trailing newline would
        # otherwise lock every agent out with a plain 401.
        admin_token = env.get("GUICHET_ADMIN_TOKEN", "").strip() or None
        if admin_token is not None:
            _admin_token("GUICHET_ADMIN_TOKEN", admin_token, mode)
        admin_agents = _admin_agents(env.get("GUICHET_ADMIN_TOKENS", ""), mode)
        tokens = [t for _, t in admin_agents] + ([admin_token] if admin_token else [])
        if len(set(tokens)) != len(tokens):
            raise ConfigError(
                "GUICHET_ADMIN_TOKENS: each agent needs a token of their own (one is given "
                "twice, or is GUICHET_ADMIN_TOKEN's)"
            )
        period = _int(env, "GUICHET_IDENTITY_PERIOD_DAYS", 30, 1, 3650)
        return cls(
            secret=raw_secret.encode(),
            database_url=env.get("GUICHET_DATABASE_URL", DEFAULT_DATABASE_URL),
            migrate_database_url=env.get("GUICHET_MIGRATE_DATABASE_URL") or None,
            redis_url=_redis_url(env.get("GUICHET_REDIS_URL", DEFAULT_REDIS_URL)),
            admin_token=admin_token,
            admin_agents=admin_agents,
            env=mode,
            host=env.get("GUICHET_HOST", "127.0.0.1"),
            port=_int(env, "GUICHET_PORT", 8080, 0, 65535),
            workers=_int(env, "GUICHET_WORKERS", 1, 1, 256),
            pg_pool_size=_int(env, "GUICHET_PG_POOL_SIZE", 10, 1, 1000),
            pg_statement_cache_size=_int(env, "GUICHET_PG_STATEMENT_CACHE_SIZE", 100, 0, 10000),
            max_body_bytes=_int(env, "GUICHET_MAX_BODY_BYTES", 16 * 1024, 1024, 1024 * 1024),
            max_admin_body_bytes=_int(
                env, "GUICHET_MAX_ADMIN_BODY_BYTES", 1024 * 1024, 16 * 1024, 64 * 1024 * 1024
            ),
            hold_ttl_s=_int(env, "GUICHET_HOLD_TTL", 600, 10, 86400),
            trusted_proxies=_networks(env.get("GUICHET_TRUSTED_PROXIES", "")),
            pow_difficulty=_int(env, "GUICHET_POW_DIFFICULTY", 20, 0, 32),
            pow_puzzles=_int(env, "GUICHET_POW_PUZZLES", 4, 1, 64),
            # At most 240: a challenge asked for at the lead's start (it lives 300 s) must
            # still be good a minute after the opening.
            challenge_lead_s=_int(env, "GUICHET_CHALLENGE_LEAD_S", 180, 0, 240),
            access_log=env.get("GUICHET_ACCESS_LOG", "0") == "1",
            pow_max_extra_bits=_int(env, "GUICHET_POW_MAX_EXTRA_BITS", 6, 0, 16),
            max_unspent_challenges=_int(env, "GUICHET_MAX_UNSPENT_CHALLENGES", 3, 1, 100),
            max_live_holds=_int(env, "GUICHET_MAX_LIVE_HOLDS", 1, 1, 100),
            identity_period_days=period,
            max_bookings_per_identity=_int(env, "GUICHET_MAX_BOOKINGS_PER_IDENTITY", 3, 1, 1000),
            max_cancellations_per_identity=_int(
                env, "GUICHET_MAX_CANCELLATIONS_PER_IDENTITY", 2, 1, 1000
            ),
            max_active_per_email=_int(env, "GUICHET_MAX_ACTIVE_PER_EMAIL", 4, 1, 1000),
            retention_days=_retention(env, period),
            limit_address=_rate(env, "limit_address"),
            limit_net=_rate(env, "limit_net"),
            limit_net48=_rate(env, "limit_net48"),
            limit_session=_rate(env, "limit_session"),
            limit_identity=_rate(env, "limit_identity"),
            limit_hold=_rate(env, "limit_hold"),
            limit_global_challenge=_rate(env, "limit_global_challenge"),
            limit_global_confirm=_rate(env, "limit_global_confirm"),
            limit_lookup=_rate(env, "limit_lookup"),
            limit_lookup_net=_rate(env, "limit_lookup_net"),
        )


# Every variable from_env reads. Names under GUICHET_TEST_ belong to the test suite.
KNOWN_VARIABLES = frozenset(
    {
        "GUICHET_ENV",
        "GUICHET_DATA_DIR",
        "GUICHET_SECRET",
        "GUICHET_DATABASE_URL",
        "GUICHET_MIGRATE_DATABASE_URL",
        "GUICHET_REDIS_URL",
        "GUICHET_ADMIN_TOKEN",
        "GUICHET_ADMIN_TOKENS",
        "GUICHET_HOST",
        "GUICHET_PORT",
        "GUICHET_WORKERS",
        "GUICHET_PG_POOL_SIZE",
        "GUICHET_PG_STATEMENT_CACHE_SIZE",
        "GUICHET_MAX_BODY_BYTES",
        "GUICHET_MAX_ADMIN_BODY_BYTES",
        "GUICHET_HOLD_TTL",
        "GUICHET_TRUSTED_PROXIES",
        "GUICHET_POW_DIFFICULTY",
        "GUICHET_POW_PUZZLES",
        "GUICHET_CHALLENGE_LEAD_S",
        "GUICHET_ACCESS_LOG",
        "GUICHET_POW_MAX_EXTRA_BITS",
        "GUICHET_MAX_UNSPENT_CHALLENGES",
        "GUICHET_MAX_LIVE_HOLDS",
        "GUICHET_IDENTITY_PERIOD_DAYS",
        "GUICHET_MAX_BOOKINGS_PER_IDENTITY",
        "GUICHET_MAX_CANCELLATIONS_PER_IDENTITY",
        "GUICHET_MAX_ACTIVE_PER_EMAIL",
        "GUICHET_RETENTION_DAYS",
        *(name for name, _default in LIMITS.values()),
    }
)


_AGENT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def _not_a_placeholder(variable: str, value: str, mode: str) -> None:
    """Refuse, in production, a value copied from deploy/guichet.env.example: the secret
    signs challenges (their difficulty included) and keys the identity hashes, and the
    example's is public, as long as it is."""
    if mode == "production" and _PLACEHOLDER in value.lower():
        raise ConfigError(
            f"{variable} is the example's placeholder: set your own"
            " (for example `openssl rand -base64 48`)"
        )


_PLACEHOLDER = "change-me"  # what deploy/guichet.env.example writes where a value goes


def _admin_token(variable: str, token: str, mode: str) -> None:
    if not token.isascii():
        raise ConfigError(f"{variable} must be ASCII: it is sent in a header")
    _not_a_placeholder(variable, token, mode)
    if mode == "production" and len(token) < 32:
        # It books without proof of work, cancels anyone's booking and reads the
        # agendas' personal data, from wherever the admin routes are reachable.
        raise ConfigError(
            f"{variable} must be at least 32 characters when GUICHET_ENV=production"
            " (for example `openssl rand -base64 32`)"
        )


def _admin_agents(raw: str, mode: str) -> tuple[tuple[str, str], ...]:
    """GUICHET_ADMIN_TOKENS: ``name:token`` pairs, comma-separated (base64 tokens hold
    neither character). Each name is what the audit log records for its agent."""
    agents: list[tuple[str, str]] = []
    for i, item in enumerate(raw.split(","), 1):
        if not item.strip():
            continue
        name, colon, token = item.strip().partition(":")
        if not colon or not _AGENT.match(name) or name == "admin" or not token.strip():
            # Which item, not what it says: it may be a token written without its name.
            raise ConfigError(
                f"GUICHET_ADMIN_TOKENS: item {i} is not name:token (pairs comma-separated, "
                "each name of lowercase letters, digits, '.', '_' or '-', not 'admin')"
            )
        if name in (n for n, _ in agents):
            raise ConfigError(f"GUICHET_ADMIN_TOKENS names the agent {name!r} twice")
        _admin_token(f"GUICHET_ADMIN_TOKENS ({name})", token.strip(), mode)
        agents.append((name, token.strip()))
    return tuple(agents)


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """``GUICHET_*`` names that no setting reads: a misspelt one is otherwise silently
    ignored, and its setting keeps its default."""
    return sorted(
        name
        for name in env
        if name.startswith("GUICHET_")
        and not name.startswith("GUICHET_TEST_")
        and name not in KNOWN_VARIABLES
    )


def _retention(env: Mapping[str, str], period: int) -> int:
    """GUICHET_RETENTION_DAYS: 0 (keep for ever), or at least the identity ``period``, whose
    caps read the hashes of the bookings made within it."""
    days = _int(env, "GUICHET_RETENTION_DAYS", 90, 0, 36500)
    if 0 < days < period:
        raise ConfigError(
            f"GUICHET_RETENTION_DAYS must be 0 or at least GUICHET_IDENTITY_PERIOD_DAYS "
            f"({period}), not {days}"
        )
    return days


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


def _rate(env: Mapping[str, str], field: str) -> Rate:
    name, default = LIMITS[field]
    raw = env.get(name)
    return Rate.parse(name, raw) if raw else default


def _redis_url(url: str) -> str:
    if not url.startswith(("redis://", "rediss://", "redis+cluster://", "unix://")):
        raise ConfigError(
            f"GUICHET_REDIS_URL must start with redis:// or redis+cluster://, not {url!r}"
        )
    return url


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _networks(raw: str) -> frozenset[Network]:
    """The trusted proxies; IPv4 written as IPv6 (``::ffff:127.0.0.1``) as IPv4, as client
    addresses are read (engine/addresses.py)."""
    nets: list[Network] = []
    for item in raw.replace(",", " ").split():
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(
                f"GUICHET_TRUSTED_PROXIES has a bad address or CIDR: {item!r}"
            ) from None
        if net.version == 6 and net.subnet_of(_MAPPED):
            mapped = net.network_address.ipv4_mapped
            assert mapped is not None
            net = ipaddress.IPv4Network((int(mapped), max(net.prefixlen - 96, 0)))
        nets.append(net)
    return frozenset(nets)


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
