"""Real PostgreSQL servers on this machine, for the local fleet, tests, benchmarks and chaos runs.

The local backend runs `initdb`/`pg_ctl` from the installed server binaries. PostgreSQL refuses to
run as root, so when this process is root every server command runs as the `postgres` OS user, and
the directories on the way to the data directory are made traversable for it. Where testcontainers
is installed (the `[test]` extra) and a Docker engine answers, its `postgres:15` is used instead.
Passwords never reach a command line, a log line or a repr.

Layout of `base_dir`: `data/` (the cluster), `sock/` (unix socket), `postgres.log`, and
`server.json` (mode 0600), which lets `attach_server` reopen the server from another process.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from migrator.errors import BadInput, MigratorError

DEFAULT_SETTINGS: dict[str, str] = {
    "max_connections": "200",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "128MB",
}
SUPERUSER = "postgres"
OS_USER = "postgres"
STATE_FILE = "server.json"
LOG_FILE = "postgres.log"
START_TIMEOUT_S = 60
DOCKER_IMAGE = "postgres:15"
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes including ".s.PGSQL.NNNNN"


@dataclass
class LocalServer:
    """A running (or stopped) server this tool started; `dsn()` is how everything connects to it."""

    datadir: Path
    port: int
    host: str
    user: str
    password: str
    backend: str  # "local" or "docker"
    container_id: str | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        return (
            f"LocalServer(datadir={str(self.datadir)!r}, port={self.port}, host={self.host!r}, user={self.user!r},"
            f" password='***', backend={self.backend!r})"
        )

    @property
    def base_dir(self) -> Path:
        return self.datadir.parent

    @property
    def log_file(self) -> Path:
        return self.base_dir / LOG_FILE

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq URL with the password (callers mask it with `dsn.mask` before printing)."""
        user, password = quote(self.user, safe=""), quote(self.password, safe="")
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{dbname}"

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`smart`, `fast` or `immediate`); stopping a stopped server does nothing."""
        if mode not in ("smart", "fast", "immediate"):
            raise BadInput(f"unknown stop mode {mode!r} (expected smart, fast or immediate)")
        if self.backend == "docker":
            container = _docker_container(self.container_id)
            if container is not None and container.status == "running":
                container.stop(timeout=0 if mode == "immediate" else 10)
            return
        if not self.is_running():
            return
        result = _pg_ctl(self, "stop", "-m", mode, "-w", "-t", str(START_TIMEOUT_S))
        if result.returncode != 0 and self.is_running():
            raise MigratorError(f"could not stop the server in {self.datadir}: {_tail_text(result.stderr)}")

    def start(self) -> None:
        """Start a stopped server again on the same port and data, e.g. to simulate a restart."""
        if self.backend == "docker":
            container = _docker_container(self.container_id)
            if container is None:
                raise MigratorError(f"docker container {self.container_id} is gone")
            container.start()
            container.reload()
            self.port = int(container.ports[f"{5432}/tcp"][0]["HostPort"])
            _write_state(self)
            _wait_ready(self)
            return
        if self.is_running():
            return
        self.log_file.touch(exist_ok=True)
        result = _pg_ctl(self, "start", "-w", "-t", str(START_TIMEOUT_S), "-l", str(self.log_file))
        if result.returncode != 0:
            raise MigratorError(
                f"PostgreSQL did not start in {self.datadir} (port {self.port}): {_tail_text(result.stderr)}\n"
                f"--- last lines of {self.log_file} ---\n{_tail(self.log_file)}"
            )

    def is_running(self) -> bool:
        if self.backend == "docker":
            container = _docker_container(self.container_id)
            return container is not None and container.status == "running"
        if not (self.datadir / "PG_VERSION").exists():
            return False
        return _pg_ctl(self, "status").returncode == 0


def start_server(
    base_dir: Path,
    *,
    port: int | None = None,
    settings: dict[str, str] | None = None,
    password: str | None = None,
    backend: str | None = None,
) -> LocalServer:
    """Create and start a fresh server in `base_dir`; `backend` None means docker where testcontainers
    is installed and a Docker engine answers, else local."""
    base_dir = Path(base_dir).resolve()
    password = password or secrets.token_urlsafe(24)
    merged = {**DEFAULT_SETTINGS, **(settings or {})}
    chosen = backend or ("docker" if containers_installed() and docker_available() else "local")
    if chosen == "docker" and not containers_installed():
        raise BadInput("the docker backend needs testcontainers (`pip install 'stamp-migrator[test]'`)")
    if chosen == "docker":
        return _start_docker(base_dir, port, merged, password)
    if chosen != "local":
        raise BadInput(f"unknown server backend {chosen!r} (expected local or docker)")
    return _start_local(base_dir, port, merged, password)


def start_standby(
    primary: LocalServer, base_dir: Path, name: str, settings: dict[str, str] | None = None
) -> LocalServer:
    """A streaming standby of a local `primary` in `base_dir` (pg_basebackup -R with a physical slot
    named `name`, which is also its application_name in pg_stat_replication), started and streaming.

    The replication password goes through a passfile (0600, the server's OS user's), never a
    command line; `primary_conninfo` names that file.
    """
    if primary.backend != "local":
        raise BadInput("standbys are only made for the local backend")
    base_dir = Path(base_dir).resolve()
    user = _server_os_user()
    base_dir.mkdir(parents=True, exist_ok=True)
    if user is not None:
        _ensure_traversable(base_dir, user)
    datadir = base_dir / "data"
    datadir.mkdir(mode=0o700, exist_ok=True)
    _own(datadir, user)
    passfile = base_dir / ".pgpass"
    passfile.write_text(f"{primary.host}:{primary.port}:*:{primary.user}:{primary.password}\n")
    passfile.chmod(0o600)
    _own(passfile, user)
    conninfo = f"host={primary.host} port={primary.port} user={primary.user} application_name={name}"
    result = _run(
        [
            str(pg_bindir() / "pg_basebackup"),
            "-D", str(datadir), "-d", conninfo, "-R", "-X", "stream", "-C", "-S", name,
            "--checkpoint=fast", "--no-sync",
        ],
        base_dir,
        180,
        {"PGPASSFILE": str(passfile)},
    )  # fmt: skip
    if result.returncode != 0:
        raise MigratorError(f"pg_basebackup failed for {datadir}: {_tail_text(result.stderr or result.stdout)}")
    for stale in ("postmaster.pid", "postmaster.opts"):
        (datadir / stale).unlink(missing_ok=True)
    port = _free_port()
    socket_dir = base_dir / "sock"
    socket_dir.mkdir(exist_ok=True)
    _own(socket_dir, user)
    socket_setting = str(socket_dir) if len(str(socket_dir)) < _SOCKET_PATH_MAX - 20 else ""  # as for a primary
    extra = {**(settings or {}), "port": str(port), "unix_socket_directories": socket_setting, "hot_standby": "on"}
    with (datadir / "postgresql.auto.conf").open("a") as conf:  # after -R's primary_conninfo: later lines win
        conf.write("".join(f"{key} = {_conf_value(value)}\n" for key, value in extra.items()))
    (base_dir / LOG_FILE).touch(exist_ok=True)
    _own(base_dir / LOG_FILE, user)
    standby = LocalServer(datadir, port, primary.host, primary.user, primary.password, "local")
    _write_state(standby)
    standby.start()
    _wait_streaming(primary, name)
    return standby


def _wait_streaming(primary: LocalServer, name: str, timeout: float = START_TIMEOUT_S) -> None:
    """Until the primary sees standby `name` streaming: accepting connections, it may still be in
    `startup` or `catchup`, and a caller (a test, the throttle's demo) expects it streaming."""
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(primary.dsn(), autocommit=True, connect_timeout=5) as conn:
        query = "SELECT state FROM pg_stat_replication WHERE application_name = %s"
        while (row := conn.execute(query, (name,)).fetchone()) is None or row[0] != "streaming":
            if time.monotonic() > deadline:
                state = row[0] if row else "not connected"
                raise MigratorError(f"standby {name} of port {primary.port} is {state}, not streaming, in {timeout}s")
            time.sleep(0.1)


def attach_server(datadir: Path) -> LocalServer:
    """Reopen a server started earlier (possibly by another process) from its state file."""
    state_path = Path(datadir).resolve().parent / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise BadInput(f"no server state in {state_path.parent} ({STATE_FILE} is missing)") from None
    except (OSError, ValueError) as exc:
        raise MigratorError(f"unreadable server state {state_path}: {exc}") from None
    return LocalServer(
        datadir=Path(state["datadir"]),
        port=int(state["port"]),
        host=state["host"],
        user=state["user"],
        password=state["password"],
        backend=state["backend"],
        container_id=state.get("container_id"),
    )


def containers_installed() -> bool:
    """Whether testcontainers (only the `[test]` extra installs it) can be imported, without importing it."""
    return importlib.util.find_spec("testcontainers") is not None


@functools.cache
def docker_available() -> bool:
    """True only when a Docker engine answers `docker info` within a few seconds."""
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


# --- local backend -------------------------------------------------------------------------------


@functools.cache
def pg_bindir() -> Path:
    """The server binaries: `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin, else PATH."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=False)
            if out.returncode == 0 and out.stdout.strip():
                candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.TimeoutExpired):
            pass
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    candidates.extend(versions)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        # pg_config may come from a newer libpq package whose bindir has no server.
        if all((bindir / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise MigratorError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install the Debian package `postgresql`"
    )


def _version_key(path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in path.parent.name.split("."))
    except ValueError:
        return (0,)


@dataclass(frozen=True)
class _OsUser:
    name: str
    uid: int
    gid: int
    home: str


def _server_os_user() -> _OsUser | None:
    """The OS user to run server commands as: `postgres` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(OS_USER)
    except KeyError:
        raise MigratorError(
            f"running as root but there is no `{OS_USER}` OS user to run PostgreSQL as "
            "(install the Debian package `postgresql`, or run as a non-root user)"
        ) from None
    return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def _run(
    args: list[str], cwd: Path, timeout: float, pg_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a server binary as the server's OS user, with no PG* variables leaking in but `pg_env`'s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | (pg_env or {})
    kwargs: dict[str, Any] = {}
    user = _server_os_user()
    if user is not None:
        kwargs = {"user": user.uid, "group": user.gid, "extra_groups": []}
        env["HOME"] = user.home
    try:
        return subprocess.run(
            args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )
    except subprocess.TimeoutExpired as exc:
        raise MigratorError(f"{Path(args[0]).name} did not finish within {timeout:.0f}s") from exc


def _pg_ctl(server: LocalServer, *args: str) -> subprocess.CompletedProcess[str]:
    user = _server_os_user()
    if user is not None and server.base_dir.exists():
        # Again on every call: pytest resets /tmp/pytest-of-root to 0700 at each session start.
        _ensure_traversable(server.base_dir, user)
    return _run([str(pg_bindir() / "pg_ctl"), "-D", str(server.datadir), *args], server.base_dir, START_TIMEOUT_S + 30)


def _ensure_traversable(path: Path, user: _OsUser) -> None:
    """Give the server's OS user search (x) permission on every ancestor we own; fail clearly otherwise.

    A root-owned 0700 directory (mkdtemp, pytest's /tmp/pytest-of-root) would otherwise make
    initdb fail with a bare "Permission denied". Only the search bit is added, never read.
    """
    for directory in [path, *path.parents]:
        info = directory.stat()
        if info.st_uid == user.uid:
            needed = stat.S_IXUSR
        elif info.st_gid == user.gid:
            needed = stat.S_IXGRP
        else:
            needed = stat.S_IXOTH
        if info.st_mode & needed:
            continue
        if info.st_uid != os.geteuid():
            raise MigratorError(f"the `{user.name}` OS user cannot enter {directory}; choose another directory")
        directory.chmod(stat.S_IMODE(info.st_mode) | stat.S_IXOTH)


def _own(path: Path, user: _OsUser | None) -> None:
    if user is not None:
        os.chown(path, user.uid, user.gid)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _conf_value(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def _start_local(base_dir: Path, port: int | None, settings: dict[str, str], password: str) -> LocalServer:
    bindir = pg_bindir()
    user = _server_os_user()
    datadir = base_dir / "data"
    if (datadir / "PG_VERSION").exists():
        raise BadInput(f"{datadir} already holds a cluster; use attach_server() to reopen it")
    base_dir.mkdir(parents=True, exist_ok=True)
    if user is not None:
        _ensure_traversable(base_dir, user)
    datadir.mkdir(mode=0o700, exist_ok=True)
    _own(datadir, user)
    pwfile = base_dir / ".pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    _own(pwfile, user)
    try:
        result = _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(datadir),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            base_dir,
            180,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise MigratorError(f"initdb failed in {datadir}: {_tail_text(result.stderr or result.stdout)}")

    socket_dir = base_dir / "sock"
    socket_dir.mkdir(exist_ok=True)
    _own(socket_dir, user)
    # Too long a socket path would stop the server from starting; TCP is all this tool uses anyway.
    socket_setting = str(socket_dir) if len(str(socket_dir)) < _SOCKET_PATH_MAX - 20 else ""
    log_file = base_dir / LOG_FILE
    log_file.touch(exist_ok=True)
    _own(log_file, user)

    for _attempt in range(3 if port is None else 1):
        chosen = port or _free_port()
        _write_conf(
            datadir,
            {
                **settings,
                "listen_addresses": "127.0.0.1",
                "port": str(chosen),
                "unix_socket_directories": socket_setting,
            },
        )
        server = LocalServer(datadir, chosen, "127.0.0.1", SUPERUSER, password, "local")
        _write_state(server)
        try:
            server.start()
            return server
        except MigratorError:
            # Another process may have taken the free port between probing and binding: try another.
            if port is None and "already in use" in _tail(log_file):
                continue
            raise
    raise MigratorError(f"no free port found for the server in {datadir}")


def _write_conf(datadir: Path, settings: dict[str, str]) -> None:
    """Settings go to postgresql.auto.conf (last one wins), so restarts keep them."""
    lines = ["# written by migrator.pgserver", *(f"{key} = {_conf_value(value)}" for key, value in settings.items())]
    # Rewriting the existing file in place keeps its owner (the server's OS user).
    (datadir / "postgresql.auto.conf").write_text("\n".join(lines) + "\n")


def _write_state(server: LocalServer) -> None:
    """The state file holds the password, so it is created private (0600) before anything is written."""
    path = server.base_dir / STATE_FILE
    state = {
        "datadir": str(server.datadir),
        "port": server.port,
        "host": server.host,
        "user": server.user,
        "password": server.password,
        "backend": server.backend,
        "container_id": server.container_id,
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return _tail_text(path.read_text(errors="replace"), lines)
    except OSError:
        return "(no log)"


def _tail_text(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --- docker backend ------------------------------------------------------------------------------


def _start_docker(base_dir: Path, port: int | None, settings: dict[str, str], password: str) -> LocalServer:
    """testcontainers' postgres:15 with the same settings passed as `-c` flags."""
    try:
        from testcontainers.community.postgres import PostgresContainer  # type: ignore[import-not-found]
    except ImportError:
        from testcontainers.postgres import PostgresContainer

    base_dir.mkdir(parents=True, exist_ok=True)
    container = PostgresContainer(DOCKER_IMAGE, username=SUPERUSER, password=password, dbname="postgres", driver=None)
    if port is not None:
        container.with_bind_ports(5432, port)
    container.with_command(["postgres", *(arg for k, v in settings.items() for arg in ("-c", f"{k}={v}"))])
    container.start()
    server = LocalServer(
        datadir=base_dir / "data",
        port=int(container.get_exposed_port(5432)),
        host=container.get_container_host_ip(),
        user=SUPERUSER,
        password=password,
        backend="docker",
        container_id=container.get_wrapped_container().id,
    )
    _write_state(server)
    return server


def _docker_container(container_id: str | None) -> Any:
    """The Docker SDK's container object, or None when it no longer exists."""
    import docker
    from docker.errors import NotFound

    if container_id is None:
        return None
    try:
        return docker.from_env().containers.get(container_id)
    except NotFound:
        return None


def _wait_ready(server: LocalServer, timeout: float = START_TIMEOUT_S) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(server.dsn(), connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise MigratorError(f"server on port {server.port} did not accept connections in {timeout}s") from None
            time.sleep(0.5)
