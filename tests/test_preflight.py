"""Every unsafe or malformed move request fails with one clear line, a non-zero exit, and no change."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from alembic import command
from conftest import Fleet, catalog_snapshot, stamp_snapshot

from migrator.db import alembic as migrations
from migrator.db import dsn as dsnlib
from migrator.local.provision import sample_app_env


def _downgrade_eu2(fleet: Fleet) -> None:
    with dsnlib.engine(fleet.dsn("eu-2")).begin() as conn:
        command.downgrade(migrations.alembic_config(sample_app_env(), conn), "-1")


def _same_tenant_on_target(fleet: Fleet) -> None:
    from migrator.local.seed import TenantSpec, seed_tenant

    with dsnlib.connect(fleet.dsn("eu-2")) as conn:
        seed_tenant(conn, TenantSpec(7, 50))


def _colliding_user_key(fleet: Fleet) -> None:
    fleet.seed("eu-2", 9, 200)
    with dsnlib.connect(fleet.dsn("eu-1"), autocommit=True) as src:
        user_id = src.execute("SELECT id FROM users WHERE tenant_id = 7 ORDER BY id LIMIT 1").fetchone()[0]
    with dsnlib.connect(fleet.dsn("eu-2"), autocommit=True) as tgt:
        tgt.execute("INSERT INTO users (id, tenant_id, email) VALUES (%s, 9, 'clash@example.com')", (user_id,))


def _route_without_rows(fleet: Fleet) -> None:
    fleet.catalog.set_route("404", "eu-1")


def _draining_target(fleet: Fleet) -> None:
    fleet.catalog.update_stamp("eu-2", state="draining")


CASES: list[tuple[str, list[str], Callable[[Fleet], None] | None, int, str]] = [
    ("unknown tenant", ["move", "999", "--to", "eu-2"], None, 2, "unknown tenant '999'"),
    ("unknown stamp", ["move", "7", "--to", "mars-1"], None, 2, "unknown stamp 'mars-1'"),
    ("same stamp", ["move", "7", "--to", "eu-1"], None, 2, "source and target are the same"),
    ("draining target", ["move", "7", "--to", "eu-2"], _draining_target, 2, "eu-2 is draining"),
    ("revisions differ", ["move", "7", "--to", "eu-2"], _downgrade_eu2, 2, "schema revisions differ"),
    (
        "rows on target",
        ["move", "7", "--to", "eu-2"],
        _same_tenant_on_target,
        2,
        "already holds rows of tenant 7 in tenants",
    ),
    ("colliding key", ["move", "7", "--to", "eu-2"], _colliding_user_key, 2, "primary key collision in users"),
    ("no rows", ["move", "404", "--to", "eu-2"], _route_without_rows, 2, "tenant 404 has no row in tenants"),
    ("bad batch", ["move", "7", "--to", "eu-2", "--batch-rows", "0"], None, 2, "batch-rows"),
]


@pytest.mark.parametrize(("name", "args", "setup", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_refused_move_exits_nonzero_and_changes_nothing(
    fleet: Fleet, name: str, args: list[str], setup: Callable[[Fleet], None] | None, code: int, message: str
) -> None:
    fleet.seed("eu-1", 7, 600)
    if setup:
        setup(fleet)
    before = (catalog_snapshot(fleet), stamp_snapshot(fleet.dsn("eu-1")), stamp_snapshot(fleet.dsn("eu-2")))
    result = fleet.run(*args, "--yes")
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output
    after = (catalog_snapshot(fleet), stamp_snapshot(fleet.dsn("eu-1")), stamp_snapshot(fleet.dsn("eu-2")))
    assert after == before


def test_dry_run_checks_everything_and_changes_nothing(fleet: Fleet) -> None:
    fleet.seed("eu-1", 7, 600)
    before = (catalog_snapshot(fleet), stamp_snapshot(fleet.dsn("eu-1")), stamp_snapshot(fleet.dsn("eu-2")))
    result = fleet.run("move", "7", "--to", "eu-2", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "preflight passed" in result.stdout and "tasks" in result.stdout
    assert (catalog_snapshot(fleet), stamp_snapshot(fleet.dsn("eu-1")), stamp_snapshot(fleet.dsn("eu-2"))) == before


def test_a_schema_change_while_a_move_is_interrupted_stops_its_resume(fleet: Fleet) -> None:
    """A move stopped mid-way must not resume onto a target whose schema changed meanwhile."""
    fleet.seed("eu-1", 7, 200)
    killed = fleet.popen("move", "7", "--to", "eu-2", "--yes", "--offline", "--batch-rows", "1", "--rate-limit", "50")
    try:
        deadline = time.monotonic() + 60
        while (move := fleet.catalog.open_move("7")) is None or move.phase != "copying":
            assert time.monotonic() < deadline, "the move never started copying"
            time.sleep(0.05)
    finally:
        killed.kill()
        killed.wait(30)
    _downgrade_eu2(fleet)
    before = catalog_snapshot(fleet)
    resumed = fleet.run("move", "7", "--to", "eu-2", "--yes")
    assert resumed.exit_code == 2, resumed.output
    assert (
        f"schema changed during move {move.id}: eu-1 is at 0006_task_checklists, eu-2 at 0005_task_watchers,"
        f" the move started at 0006_task_checklists; abort it with `migrator move abort {move.id}`"
    ) in resumed.stderr
    after = catalog_snapshot(fleet)
    assert after["routes"] == before["routes"] and fleet.catalog.route("7").stamp == "eu-1"
