"""The application's side: `migrator.router` routes by the catalog, learns of flips by notification,
retries fenced writes, and needs no more than the catalog's reader role; `route export` and `route
watch` serve routers that are not Python."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from conftest import REPO, Fleet, as_superuser, loaded_by
from psycopg import sql

from migrator.catalog.routes import announce_cutover
from migrator.db import dsn as dsnlib
from migrator.move import fence
from migrator.router import Router, TenantFenced, UnknownTenant
from migrator.testing.writer import Workload


def _wait(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _flip_in_catalog(fleet: Fleet, tenant: str, stamp: str) -> int:
    """Change a route as another session would (the move's compare-and-set, without the move)."""
    with dsnlib.connect(fleet.catalog.url, autocommit=True) as conn:
        row = conn.execute(
            "UPDATE routes SET stamp = %s, version = version + 1 WHERE tenant = %s RETURNING version", (stamp, tenant)
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def reader(fleet: Fleet) -> Iterator[tuple[str, str]]:
    """A login role given exactly `migrator catalog grant-reader`; yields (role, its catalog URL)."""
    role, password = f"reader_{secrets.token_hex(4)}", secrets.token_urlsafe(12)
    as_superuser(
        fleet.server,
        "postgres",
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)),
    )
    assert fleet.run("catalog", "grant-reader", role).exit_code == 0
    server = fleet.server
    yield role, f"postgresql://{role}:{quote(password, safe='')}@{server.host}:{server.port}/{fleet.databases[0]}"
    as_superuser(fleet.server, "postgres", sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role)))


@pytest.fixture
def router(fleet: Fleet) -> Iterator[Router]:
    with Router(fleet.catalog.url, fleet.stamps) as made:
        yield made


def test_stamp_of_is_cached_after_one_catalog_read(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 20)
    with Router(fleet.catalog.url, fleet.stamps) as router:  # started after the route was made: not notified
        assert [router.stamp_of("7") for _ in range(100)] == ["eu-1"] * 100
        assert router.stats.lookups == 1
        with pytest.raises(UnknownTenant, match="'404'"):
            router.stamp_of("404")


def test_a_route_registered_while_listening_is_cached_without_a_lookup(fleet: Fleet, router: Router) -> None:
    fleet.seed("eu-1", 7, 20)
    _wait(lambda: router.version_of("7") == 1, "the new route's notification")
    assert router.stamp_of("7") == "eu-1" and router.stats.lookups == 0


def test_a_flip_by_another_process_reaches_the_cache_without_a_lookup(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 50)
    with Router(fleet.catalog.url, fleet.stamps) as router:
        assert router.stamp_of("7") == "eu-1" and router.version_of("7") == 1
        move = ["move", "7", "--to", "eu-2", "--yes"]
        moved = subprocess.run(
            [sys.executable, "-m", "migrator", "--config", str(fleet.config_path), *move],
            capture_output=True, text=True, cwd=REPO, timeout=120,
        )  # fmt: skip
        assert moved.returncode == 0, moved.stderr
        _wait(lambda: router.version_of("7") == 2, "the flip's notification")
        assert router.stamp_of("7") == "eu-2"
        assert router.stats.lookups == 1 and router.stats.notifications >= 1


def _router_sessions(fleet: Fleet, stamp: str) -> int:
    """Sessions the router has open on a stamp (its pools' application_name)."""
    with dsnlib.connect(fleet.dsn(stamp), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
            ("migrator-router",),
        ).fetchone()
    return int(row[0]) if row else 0


def test_an_announced_cutover_opens_connections_to_the_target_before_the_flip(
    fleet: Fleet, reader: tuple[str, str]
) -> None:
    """The move announces its target before the freeze: the router connects there while the route
    still points at the source, so the first writes after the flip wait for no new connection."""
    _, url = reader  # the catalog's reader role may listen, as it may read routes
    fleet.seed("eu-1", 7, 20)
    with Router(url, fleet.stamps) as router:
        router.run("7", lambda conn: conn.execute("SELECT 1"))  # the application uses eu-1
        assert _router_sessions(fleet, "eu-2") == 0
        with fleet.catalog.transaction() as conn:
            announce_cutover(conn, ["7", "404"], "eu-2")  # 404: a tenant this application never used
        _wait(lambda: _router_sessions(fleet, "eu-2") >= 1, "connections opened on the target")
        assert router.stamp_of("7") == "eu-1" and router.version_of("7") == 1  # the route is untouched
        assert router.stats.lookups == 1


def test_lost_notifications_converge_by_re_reading_and_reconnecting(fleet: Fleet, reader: tuple[str, str]) -> None:
    role, url = reader
    fleet.seed("eu-1", 7, 20)
    with Router(url, fleet.stamps) as router:
        assert router.stamp_of("7") == "eu-1"
        # Cut the notifications: the listener's session ends and it cannot log in again for now.
        as_superuser(fleet.server, "postgres", sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)))
        with dsnlib.connect(fleet.server.dsn("postgres"), autocommit=True) as conn:
            ended = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE usename = %s AND application_name = 'migrator-router-listen'",
                (role,),
            ).fetchone()
        assert ended == (1,)
        _wait(lambda: not router._listening.is_set(), "the router to notice its listener is gone")
        _flip_in_catalog(fleet, "7", "eu-2")  # a change nobody is listening for
        # Every entry was marked stale when the listener was lost: the next use re-reads the catalog
        # (on the router's pooled catalog session, which survived).
        assert router.stamp_of("7") == "eu-2"
        assert router.stats.lookups == 2
        as_superuser(fleet.server, "postgres", sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role)))
        _wait(lambda: router.stats.listener_reconnects == 1 and router._listening.is_set(), "the reconnect", 15)
        router.stamp_of("7")  # the reconnect marked entries stale again: one more read
        lookups = router.stats.lookups
        _flip_in_catalog(fleet, "7", "us-1")
        _wait(lambda: router.version_of("7") == 3, "a notification after the reconnect")
        assert router.stamp_of("7") == "us-1" and router.stats.lookups == lookups


def test_without_notifications_the_ttl_bounds_a_stale_route(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 20)
    with Router(fleet.catalog.url, fleet.stamps, ttl_s=0.5, listen=False) as router:
        assert router.stamp_of("7") == "eu-1"
        _flip_in_catalog(fleet, "7", "eu-2")
        assert router.stamp_of("7") == "eu-1"  # cached, and nobody told it
        time.sleep(0.6)
        assert router.stamp_of("7") == "eu-2"


class _DelayedRouter(Router):
    """A router whose lookups stop between reading a route and caching it, until released."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.read = threading.Event()
        self.release = threading.Event()
        super().__init__(*args, **kwargs)

    def _before_store(self, tenant: str) -> None:
        self.read.set()
        assert self.release.wait(10)


def test_a_lookup_delayed_across_a_flip_does_not_cache_the_old_stamp(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 20)
    with _DelayedRouter(fleet.catalog.url, fleet.stamps) as router:
        answer: list[str] = []
        slow = threading.Thread(target=lambda: answer.append(router.stamp_of("7")))
        slow.start()
        assert router.read.wait(10)  # it has read version 1 (eu-1) and not yet cached it
        _flip_in_catalog(fleet, "7", "eu-2")
        _wait(lambda: router.version_of("7") == 2, "the flip's notification")
        router.release.set()
        slow.join(10)
        assert router.version_of("7") == 2 and router.stamp_of("7") == "eu-2"
        assert answer == ["eu-2"]  # the late answer yields to the newer cached route


def _insert_task(tenant: int) -> Callable[[psycopg.Connection[Any]], int]:
    def insert(conn: psycopg.Connection[Any]) -> int:
        project = conn.execute("SELECT id FROM projects WHERE tenant_id = %s LIMIT 1", (tenant,)).fetchone()
        assert project is not None
        row = conn.execute(
            "INSERT INTO tasks (tenant_id, project_id, title) VALUES (%s, %s, 'via router') RETURNING id",
            (tenant, project[0]),
        ).fetchone()
        assert row is not None
        return int(row[0])

    return insert


def test_run_never_retries_an_error_that_is_not_the_fence(fleet: Fleet, router: Router) -> None:
    fleet.seed("eu-1", 7, 20)
    calls = []

    def broken(conn: psycopg.Connection[Any]) -> None:
        calls.append(1)
        conn.execute("SELECT 1 / 0")

    with pytest.raises(psycopg.errors.DivisionByZero):
        router.run("7", broken)
    assert calls == [1] and router.stats.fenced_retries == 0
    assert isinstance(router.run("7", _insert_task(7)), int)  # the pooled connection is usable again


def test_an_application_error_in_run_returns_its_connection_to_the_pool(fleet: Fleet) -> None:
    """More errors than the pool has connections: each one gave its connection back, rolled back."""
    fleet.seed("eu-1", 7, 20)

    def failing(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT 1")  # a transaction is open when the application's own code fails
        raise LookupError("not a database error")

    with Router(fleet.catalog.url, fleet.stamps, pool_size=2) as router:
        for _ in range(5):
            with pytest.raises(LookupError):
                router.run("7", failing, deadline_s=2.0)
        assert isinstance(router.run("7", _insert_task(7), deadline_s=2.0), int)


def test_run_gives_up_with_tenant_fenced_when_the_fence_outlasts_the_deadline(fleet: Fleet, router: Router) -> None:
    fleet.seed("eu-1", 7, 20)
    layout = fleet.layout()
    with dsnlib.connect(fleet.dsn("eu-1")) as conn:
        fence.guard(conn, layout, ("7",), 4242, fenced=True, capture=False)
        conn.commit()
    try:
        started = time.monotonic()
        with pytest.raises(TenantFenced, match="tenant 7 stayed fenced"):
            router.run("7", _insert_task(7), deadline_s=0.5)
        assert 0.45 < time.monotonic() - started < 3
        assert router.stats.fenced_retries > 3
    finally:
        with dsnlib.connect(fleet.dsn("eu-1")) as conn:
            fence.unguard(conn, layout, ("7",))
            conn.commit()
    assert isinstance(router.run("7", _insert_task(7)), int)


def test_a_writer_on_the_router_rides_through_an_online_move(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 3000)
    writer = Workload(fleet.catalog.url, fleet.stamps, 7, seed=7).start()
    time.sleep(0.5)
    result = fleet.run("move", "7", "--to", "eu-2", "--yes", "--json")
    assert result.exit_code == 0, result.output
    time.sleep(0.5)
    writer.stop()
    assert writer.errors == [], writer.errors[:3]
    assert writer.acked > 100
    assert not writer.lost_writes(fleet.dsn("eu-2"))
    freeze_ms = json.loads(result.stdout)["move"]["freeze_ms"]
    # The application's longest pause is the freeze plus its own retry back-off and re-routing.
    assert writer.longest_pause_s * 1000 < freeze_ms + 1000, (writer.longest_pause_s, freeze_ms)


def test_the_reader_role_is_enough_for_the_router_export_and_watch(
    fleet: Fleet, reader: tuple[str, str], tmp_path: Path
) -> None:
    _, url = reader
    fleet.seed("eu-1", 7, 20)
    with Router(url, fleet.stamps) as router:
        assert router.stamp_of("7") == "eu-1"
        assert isinstance(router.run("7", _insert_task(7)), int)  # stamps are reached with the app's own DSNs
    config = tmp_path / "reader.toml"
    config.write_text(fleet.config_path.read_text().replace(fleet.catalog.url, url))
    base = [sys.executable, "-m", "migrator", "--config", str(config)]
    out = tmp_path / "routes.json"
    exported = subprocess.run([*base, "route", "export", "-o", str(out)], capture_output=True, text=True, cwd=REPO)
    assert exported.returncode == 0, exported.stderr
    assert json.loads(out.read_text()) == {"7": {"stamp": "eu-1", "state": "active", "version": 1}}
    watch = subprocess.Popen([*base, "route", "watch", "--json"], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        time.sleep(1.5)  # let it LISTEN
        fleet.seed("eu-2", 8, 10)  # `route set` as the operator
        line = watch.stdout.readline() if watch.stdout else ""
        assert json.loads(line) == {"tenant": "8", "stamp": "eu-2", "version": 1, "state": "active", "op": "insert"}
    finally:
        watch.terminate()
        watch.wait(10)


def test_route_export_writes_json_csv_and_an_nginx_map_atomically(fleet: Fleet, tmp_path: Path) -> None:
    fleet.seed("eu-1", 7, 20)
    fleet.seed("eu-2", 8, 20)
    (tmp_path / "edge").mkdir()
    out = tmp_path / "edge" / "routes.conf"
    out.write_text("old")
    assert fleet.run("route", "export", "--format", "nginx-map", "-o", str(out)).exit_code == 0
    assert out.read_text() == 'map $tenant $stamp {\n    default "";\n    "7" "eu-1";\n    "8" "eu-2";\n}\n'
    assert [p.name for p in out.parent.iterdir()] == ["routes.conf"]  # no temporary file left behind
    csv_text = fleet.run("route", "export", "--format", "csv").stdout
    assert csv_text == "tenant,stamp,version,state\n7,eu-1,1,active\n8,eu-2,1,active\n"


def test_the_router_imports_only_psycopg() -> None:
    """Nor the catalog's store and models: its one statement is catalog.routes, the package's names load lazily."""
    heavy = ("click", "alembic", "sqlalchemy", "tenacity", "tqdm", "yaml", "migrator.catalog.store")
    assert loaded_by("import migrator.router", *heavy, "migrator.catalog.models") == []
