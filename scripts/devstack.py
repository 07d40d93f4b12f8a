#!/usr/bin/env python3
"""Make a Redis and a PostgreSQL reachable for `make run` / `make test` (stdlib only).

  devstack.py up [--data-dir DIR] [--database NAME] [--env-file FILE] [--no-install]
                 [--for-tests] [--private]
  devstack.py down [--data-dir DIR]        stop the private instances recorded under DIR, only
  devstack.py status [--data-dir DIR]

`up` picks each store in this order: GUICHET_REDIS_URL / GUICHET_DATABASE_URL if set (used
verbatim, nothing started or created); else, unless --private, a server answering without a
password on 127.0.0.1:6379 / as postgres@127.0.0.1:5432; else a private instance under DIR
(reused, or started on a free 127.0.0.1 port; missing binaries are apt-get installed when
root or `sudo -n` allows it and --no-install is absent, otherwise exit 1 with one stderr line
naming what to install). It then creates databases NAME and NAME_test if missing and writes
FILE (default DIR/env.sh): GUICHET_{REDIS,DATABASE,TEST_DATABASE,TEST_REDIS}_URL exports.
With --for-tests the redis-server binary is needed (installed as above) even where a Redis
already answers: the tests start private ones of their own.
"""

import argparse
import hashlib
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL = "127.0.0.1"
PG_USER = "postgres"  # superuser name in every cluster, and the OS user when we are root
SYSTEM_PG = f"postgresql://{PG_USER}@{LOCAL}:5432/postgres"
SOCKET_PATH_MAX = 107  # sun_path limit for the private cluster's unix socket


class DevstackError(Exception):
    """A failure reported as one `devstack: ...` line on stderr, exit status 1."""


@dataclass(frozen=True)
class Store:
    """URLs chosen for one store, and where they point in words (for the summary)."""

    url: str
    test_url: str
    summary: str


# --- small helpers ---------------------------------------------------------------------------


def run(cmd: list[str], *, cwd: Path | None = None, capture: bool = True) -> str:
    """Run `cmd` with stdin closed; return its stdout, or raise DevstackError with its tail."""
    env = {**os.environ, "PGCONNECT_TIMEOUT": "3"}
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=capture,
            text=True,
            check=False,
        )
    except OSError as exc:  # e.g. the executable is missing
        raise DevstackError(f"`{shlex.join(cmd)}` failed: {exc}") from None
    if proc.returncode != 0:
        tail = " | ".join(((proc.stderr or proc.stdout or "").strip().splitlines())[-3:])
        raise DevstackError(f"`{shlex.join(cmd)}` failed: {tail or f'exit {proc.returncode}'}")
    return proc.stdout or ""


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `check` every 0.1 s; True as soon as it holds, False once `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (picked by the kernel)."""
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        return int(sock.getsockname()[1])


def read_int(path: Path) -> int | None:
    """The integer on the first line of `path`, or None if it is missing or not a number."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie (killed, not yet reaped)."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: exists, owned by someone else; no /proc: not Linux
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def user_setting(name: str, own_url: str) -> str | None:
    """os.environ[name] if set, except when it is `own_url`, our private instance's URL: then
    it is our env file sourced back into the shell, and `up` must check that instance itself."""
    value = os.environ.get(name)
    return value if value and value != own_url else None


def with_db(url: str, path: str) -> str:
    """`url` with its path (the database name / number) replaced by `path`."""
    return urlunsplit(urlsplit(url)._replace(path=path))


# --- Redis -----------------------------------------------------------------------------------


def redis_call(port: int, *words: str) -> bytes | None:
    """Send one RESP command to 127.0.0.1:port; first reply line (b"" if closed), None if down."""
    payload = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
    try:
        with socket.create_connection((LOCAL, port), timeout=1.0) as sock:
            sock.sendall(payload.encode())
            return sock.makefile("rb").readline().rstrip(b"\r\n")
    except OSError:
        return None


def redis_ping(port: int) -> bool:
    """Whether a Redis on 127.0.0.1:port answers PING with +PONG (no password)."""
    return redis_call(port, "PING") == b"+PONG"


def private_redis(home: Path) -> tuple[int, int] | None:
    """(pid, port) of the redis-server recorded in `home` if that process still runs it."""
    pid, port = read_int(home / "redis.pid"), read_int(home / "port")
    if pid is None or port is None or not pid_alive(pid):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")  # redis titles itself "redis-server 127.0.0.1:PORT"
    if cmdline.exists() and f":{port}".encode() not in cmdline.read_bytes():
        return None
    return pid, port


def start_redis(home: Path) -> tuple[int, str]:
    """Reuse or start the private redis-server under `home`; return (port, how)."""
    running = private_redis(home)
    if running and redis_ping(running[1]):
        return running[1], "reused"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            LOCAL,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(home),
            "--pidfile",
            str(home / "redis.pid"),
            "--logfile",
            str(home / "redis.log"),
        ]
    )
    if not wait_until(lambda: redis_ping(port)):
        raise DevstackError(f"private redis did not answer on port {port}; see {home}/redis.log")
    (home / "port").write_text(f"{port}\n")
    return port, "started"


def stop_redis(home: Path) -> str:
    """Shut the private redis under `home` down (SHUTDOWN NOSAVE, then SIGTERM); say what."""
    running = private_redis(home)
    if running is None:
        return "redis: no private instance running"
    pid, port = running
    redis_call(port, "SHUTDOWN", "NOSAVE")
    if not wait_until(lambda: not pid_alive(pid), 5.0):
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pid_alive(pid), 5.0)
    return f"redis: stopped private instance at {home} (port {port})"


# --- PostgreSQL ------------------------------------------------------------------------------


def pg_bindir() -> Path | None:
    """Directory with initdb and pg_ctl: the one on PATH, else highest /usr/lib/postgresql/N/bin."""
    on_path = shutil.which("initdb")
    installed = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        reverse=True,
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)],
    )
    for bindir in ([Path(on_path).parent] if on_path else []) + installed:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


def find_psql() -> str | None:
    """psql on PATH, else the one next to the server binaries, else None."""
    bindir = pg_bindir()
    beside = bindir / "psql" if bindir else None
    return shutil.which("psql") or (str(beside) if beside and beside.exists() else None)


def psql(dsn: str, sql: str) -> str:
    """Run one SQL statement with psql (never prompting for a password); return its output."""
    cmd = [find_psql() or "psql", "-X", "-w", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", dsn]
    return run([*cmd, "-c", sql]).strip()


def pg_answers(dsn: str) -> bool:
    """Whether `select 1` succeeds on `dsn` (False if psql is missing)."""
    try:
        return find_psql() is not None and psql(dsn, "select 1") == "1"
    except DevstackError:
        return False


def pg_dsn(port: int, database: str) -> str:
    """URL of `database` as the trusted superuser on 127.0.0.1:port."""
    return f"postgresql://{PG_USER}@{LOCAL}:{port}/{database}"


def as_server_user(cmd: list[str]) -> list[str]:
    """`cmd` run as the postgres OS user when we are root (initdb/postgres refuse root)."""
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def pg_home(data_dir: Path) -> Path:
    """Folder of the private cluster (data/, log, port, socket): recorded location or DIR/pg."""
    recorded = data_dir / "pg.location"
    return Path(recorded.read_text().strip()) if recorded.exists() else data_dir / "pg"


def choose_pg_home(data_dir: Path) -> Path:
    """pg_home(), except that a first start relocates (and records) the cluster under /var/tmp
    when the postgres user cannot traverse to DIR, or the socket path would be too long."""
    home = pg_home(data_dir)
    if (data_dir / "pg.location").exists() or home.exists():
        return home
    if os.geteuid() == 0:
        server_user()  # the reachability check below runs as that user
    reachable = (
        os.geteuid() != 0
        or subprocess.run(as_server_user(["test", "-x", str(data_dir)]), check=False).returncode
        == 0
    )
    if reachable and len(f"{home}/.s.PGSQL.65535") <= SOCKET_PATH_MAX:
        return home
    tmp = Path("/var/tmp") if Path("/var/tmp").is_dir() else Path("/tmp")
    home = tmp / f"guichet-pg-{hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]}"
    (data_dir / "pg.location").write_text(f"{home}\n")
    return home


def server_user() -> pwd.struct_passwd:
    """The postgres OS user that runs the cluster when we are root; created if missing."""
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER])
        return pwd.getpwnam(PG_USER)


def prepare_home(home: Path) -> None:
    """Create `home`; as root, make sure the postgres user exists and owns it."""
    home.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return
    user = server_user()
    if home.stat().st_uid not in (0, user.pw_uid):  # e.g. a squatted folder in /var/tmp
        raise DevstackError(f"{home} belongs to another user; remove it or pick another --data-dir")
    os.chown(home, user.pw_uid, user.pw_gid)


def private_pg(home: Path) -> tuple[int, int] | None:
    """(pid, port) of the postmaster of the cluster in `home` if it runs on the recorded port."""
    try:
        lines = (home / "data" / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    port = read_int(home / "port")
    if len(lines) < 4 or not lines[0].isdigit() or lines[3].strip() != str(port):
        return None
    return (int(lines[0]), port) if port and pid_alive(int(lines[0])) else None


def start_pg(home: Path) -> tuple[int, str]:
    """Reuse or start (after initdb if needed) the private trust cluster in `home`."""
    running = private_pg(home)
    if running:
        return running[1], "reused"
    bindir = pg_bindir()
    if bindir is None:
        raise DevstackError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    prepare_home(home)
    data = home / "data"
    if not (data / "PG_VERSION").exists():
        run(
            as_server_user(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    PG_USER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-locale",
                ]
            ),
            cwd=home,
        )
    port = free_port()
    options = f"-c listen_addresses={LOCAL} -p {port} -k {shlex.quote(str(home))}"
    try:
        run(
            as_server_user(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-o",
                    options,
                    "-l",
                    str(home / "log"),
                    "-w",
                    "-t",
                    "30",
                    "start",
                ]
            ),
            cwd=home,
        )
    except DevstackError as exc:
        raise DevstackError(f"{exc}; see {home}/log") from None
    (home / "port").write_text(f"{port}\n")
    return port, "started"


def stop_pg(home: Path) -> str:
    """Stop the private cluster in `home` with `pg_ctl stop -m fast`; say what was done."""
    running, bindir = private_pg(home), pg_bindir()
    if running is None:
        return "postgres: no private cluster running"
    if bindir is None:
        raise DevstackError(f"pg_ctl not found; cannot stop the cluster in {home}")
    run(
        as_server_user(
            [str(bindir / "pg_ctl"), "-D", str(home / "data"), "-m", "fast", "-w", "stop"]
        ),
        cwd=home,
    )
    return f"postgres: stopped private cluster at {home} (port {running[1]})"


def ensure_database(admin_dsn: str, name: str) -> None:
    """CREATE DATABASE `name` unless it exists (`name` was validated as a plain identifier)."""
    if psql(admin_dsn, f"SELECT 1 FROM pg_database WHERE datname = '{name}'") != "1":
        psql(admin_dsn, f'CREATE DATABASE "{name}"')


# --- commands --------------------------------------------------------------------------------


MISSING_HINT = {
    "redis-server": ("redis-server", "GUICHET_REDIS_URL"),
    "postgresql": ("PostgreSQL (initdb, pg_ctl)", "GUICHET_DATABASE_URL"),
    "postgresql-client": ("psql", "GUICHET_DATABASE_URL"),
}


def apt_command() -> list[str] | None:
    """Non-interactive apt-get command run as root (directly or via `sudo -n`), or None."""
    if shutil.which("apt-get") is None:
        return None
    if os.geteuid() == 0:
        sudo = []
    elif (
        shutil.which("sudo")
        and subprocess.run(["sudo", "-n", "true"], capture_output=True, check=False).returncode == 0
    ):
        sudo = ["sudo", "-n"]
    else:
        return None
    return [*sudo, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]


def missing_packages(redis: bool, pg: bool) -> list[str]:
    """Debian packages providing the binaries that private `redis` / `pg` need and lack."""
    missing = ["redis-server"] if redis and not shutil.which("redis-server") else []
    missing += ["postgresql"] if pg and pg_bindir() is None else []
    missing += ["postgresql-client"] if pg and find_psql() is None else []
    return missing


def install_missing(redis: bool, pg: bool, allowed: bool, for_tests: bool = False) -> None:
    """Make the binaries for private `redis` / `pg` available: apt-get install what is missing
    if `allowed` and possible (root or `sudo -n`), else raise one line naming what to install.
    `for_tests`: redis-server is needed by the tests themselves, whatever Redis is used."""
    packages = missing_packages(redis, pg)
    apt = apt_command() if packages and allowed else None
    if apt:
        print(f"devstack: installing {' '.join(packages)} with apt-get", file=sys.stderr)
        run([*apt, "update"], capture=False)
        run([*apt, "install", "-y", *packages], capture=False)
        packages = missing_packages(redis, pg)
    if packages:
        names = ", ".join(MISSING_HINT[p][0] for p in packages)
        it = "it" if len(packages) == 1 else "them"
        hint = f"{names} not found; install {it} (Debian: apt-get install {' '.join(packages)})"
        # Setting a store's URL spares its binaries, but for redis-server's to the tests.
        spared = [p for p in packages if not (for_tests and p == "redis-server")]
        env_vars = " or ".join(dict.fromkeys(MISSING_HINT[p][1] for p in spared))
        if env_vars:
            hint += f" or set {env_vars}"
        if for_tests and "redis-server" in packages:
            hint += "; the tests start private Redis servers"
        raise DevstackError(hint)


def redis_store(env_url: str | None, private_dir: Path | None) -> Store:
    """The user's URL if given, else the private instance under `private_dir`, else :6379."""
    if env_url:
        test_url = os.environ.get("GUICHET_TEST_REDIS_URL") or with_db(env_url, "/15")
        return Store(env_url, test_url, "from the environment")
    port, how = start_redis(private_dir / "redis") if private_dir else (6379, "")
    where = f"private at {private_dir / 'redis'} ({how})" if private_dir else "existing"
    return Store(f"redis://{LOCAL}:{port}/0", f"redis://{LOCAL}:{port}/15", where)


def postgres_store(env_url: str | None, private_dir: Path | None, db: str) -> Store:
    """The user's URL if given (nothing created), else the private cluster for `private_dir`
    or the server on :5432, where databases `db` and `db`_test are created if missing."""
    if env_url:
        path = urlsplit(env_url).path.rstrip("/") or f"/{db}"
        test_url = os.environ.get("GUICHET_TEST_DATABASE_URL") or with_db(env_url, path + "_test")
        return Store(env_url, test_url, "from the environment")
    home = choose_pg_home(private_dir) if private_dir else None
    port, how = start_pg(home) if home else (5432, "")
    for name in (db, f"{db}_test"):
        ensure_database(pg_dsn(port, "postgres"), name)
    where = f"private at {home} ({how})" if home else "existing"
    return Store(pg_dsn(port, db), pg_dsn(port, f"{db}_test"), where)


def cmd_up(args: argparse.Namespace) -> None:
    """Choose or start both stores, create the databases, write the env file, print a summary."""
    data_dir: Path = args.data_dir.resolve()
    own_redis = f"redis://{LOCAL}:{read_int(data_dir / 'redis' / 'port')}/0"
    own_pg = pg_dsn(read_int(pg_home(data_dir) / "port") or 0, args.database)
    env_redis = user_setting("GUICHET_REDIS_URL", own_redis)
    env_pg = user_setting("GUICHET_DATABASE_URL", own_pg)
    redis_private = not env_redis and (args.private or not redis_ping(6379))
    pg_private = not env_pg and (args.private or not pg_answers(SYSTEM_PG))
    install_missing(redis_private or args.for_tests, pg_private, args.install, args.for_tests)
    data_dir.mkdir(parents=True, exist_ok=True)
    redis = redis_store(env_redis, data_dir if redis_private else None)
    postgres = postgres_store(env_pg, data_dir if pg_private else None, args.database)

    env_file: Path = args.env_file or data_dir / "env.sh"
    env_file.parent.mkdir(parents=True, exist_ok=True)
    values = {
        "GUICHET_REDIS_URL": redis.url,
        "GUICHET_DATABASE_URL": postgres.url,
        "GUICHET_TEST_DATABASE_URL": postgres.test_url,
        "GUICHET_TEST_REDIS_URL": redis.test_url,
    }
    env_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items()))
    print(f"redis: {redis.summary}: {redis.url}")
    print(f"postgres: {postgres.summary}: {postgres.url}")
    print(f"env: wrote {env_file}")


def cmd_down(args: argparse.Namespace) -> None:
    """Stop the private instances under --data-dir; servers it did not start are left alone."""
    data_dir: Path = args.data_dir.resolve()
    print(stop_redis(data_dir / "redis"))
    print(stop_pg(pg_home(data_dir)))


def cmd_status(args: argparse.Namespace) -> None:
    """Print, per store, the private instance's state and whether the default server answers."""
    data_dir: Path = args.data_dir.resolve()
    rows = [
        (
            "redis",
            data_dir / "redis",
            private_redis(data_dir / "redis"),
            redis_ping(6379),
            f"{LOCAL}:6379",
        ),
        (
            "postgres",
            pg_home(data_dir),
            private_pg(pg_home(data_dir)),
            pg_answers(SYSTEM_PG),
            SYSTEM_PG,
        ),
    ]
    for name, home, running, default_ok, default in rows:
        state = f"running on port {running[1]}" if running else "not running"
        print(
            f"{name}: private at {home}: {state}; {default} "
            f"{'answers' if default_ok else 'does not answer'}"
        )


def database_name(value: str) -> str:
    """argparse type: a lowercase identifier short enough to take the `_test` suffix."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,57}", value):
        raise argparse.ArgumentTypeError("use lowercase letters, digits and _ (max 58)")
    return value


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the command; 0 on success, 1 with one stderr line if not."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (
        ("up", cmd_up, "make both stores reachable, write the env file"),
        ("down", cmd_down, "stop the private instances"),
        ("status", cmd_status, "show the private and default servers"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(func=func)
        sub.add_argument(
            "--data-dir",
            type=Path,
            default=REPO_ROOT / ".guichet",
            help="state of the private instances (default: <repo>/.guichet)",
        )
    up = commands.choices["up"]
    up.add_argument("--database", type=database_name, default="guichet")
    up.add_argument("--env-file", type=Path, help="default: <data-dir>/env.sh")
    up.add_argument(
        "--no-install",
        dest="install",
        action="store_false",
        help="never apt-get install missing servers",
    )
    up.add_argument(
        "--for-tests",
        action="store_true",
        help="also need the redis-server binary: the tests start private Redis servers",
    )
    up.add_argument("--private", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except DevstackError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
