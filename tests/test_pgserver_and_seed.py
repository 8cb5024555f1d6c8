"""A real local server, the stamp schema's migrations both ways, and seeding with exact row counts."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic import command
from psycopg import sql

from migrator.db import alembic as migrations
from migrator.db import dsn as dsnlib
from migrator.errors import BadInput, MigratorError
from migrator.local import pgserver
from migrator.local.provision import sample_app_env
from migrator.local.seed import PATH_TABLES, TENANT_TABLES, TenantSpec, demo_tenants, seed_fleet_stamp, seed_tenant
from migrator.rollout.history import History

STAMP = sample_app_env()
_db_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pgserver.LocalServer]:
    started = pgserver.start_server(tmp_path_factory.mktemp("pgserver") / "server")
    try:
        yield started
    finally:
        started.stop()


def _new_database(server: pgserver.LocalServer) -> str:
    name = f"db{next(_db_numbers)}"
    with dsnlib.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return server.dsn(name)


def _tables(dsn: str) -> set[str]:
    with dsnlib.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {row[0] for row in rows}


def test_stamp_schema_upgrades_to_head_and_downgrades_to_base(server: pgserver.LocalServer) -> None:
    dsn = _new_database(server)
    assert migrations.current_revision(dsn) is None
    migrations.upgrade(dsn, STAMP)
    assert migrations.current_revision(dsn) == History.load(STAMP).head == "0006_task_checklists"
    assert set(TENANT_TABLES) | set(PATH_TABLES) | {"billing_plans", "feature_flags", "alembic_version"} == _tables(dsn)

    with dsnlib.engine(dsn).begin() as conn:
        command.downgrade(migrations.alembic_config(STAMP, conn), "base")
    assert migrations.current_revision(dsn) is None
    assert _tables(dsn) == {"alembic_version"}
    migrations.upgrade(dsn, STAMP, "0001_core")
    assert migrations.current_revision(dsn) == "0001_core"


def test_failing_revision_leaves_the_previous_one(server: pgserver.LocalServer, tmp_path: Path) -> None:
    """transaction_per_migration: revision 1 stays committed when revision 2 fails."""
    env = tmp_path / "env"
    (env / "versions").mkdir(parents=True)
    shutil.copy(STAMP / "env.py", env / "env.py")
    for revision, down, body in (
        ("r1", None, "CREATE TABLE kept (id int)"),
        ("r2", "r1", "CREATE TABLE lost (id int); SELECT 1 / 0"),
    ):
        (env / "versions" / f"{revision}.py").write_text(
            f"from alembic import op\nrevision = {revision!r}\ndown_revision = {down!r}\n"
            f"def upgrade():\n    op.execute({body!r})\n"
        )
    dsn = _new_database(server)
    with pytest.raises(MigratorError, match="division by zero") as failure:
        migrations.upgrade(dsn, env)
    assert server.password not in str(failure.value)
    assert migrations.current_revision(dsn) == "r1"
    assert _tables(dsn) == {"alembic_version", "kept"}


def test_seed_counts_match_the_database(server: pgserver.LocalServer) -> None:
    dsn = _new_database(server)
    migrations.upgrade(dsn, STAMP)
    counts = seed_fleet_stamp(dsn, [TenantSpec(1, 3_000, "Acme"), TenantSpec(2, 200)])
    with dsnlib.connect(dsn, autocommit=True) as conn:
        for tenant, expected in counts.items():
            actual = sum(
                conn.execute(
                    sql.SQL("SELECT count(*) FROM {} WHERE {} = %s").format(
                        sql.Identifier(table), sql.Identifier("id" if table == "tenants" else "tenant_id")
                    ),
                    (tenant,),
                ).fetchone()[0]
                for table in TENANT_TABLES
            )
            actual += conn.execute(  # the checklist items, which reach their tenant through tasks
                "SELECT count(*) FROM task_checklist_items i JOIN tasks t"
                " ON (t.tenant_id, t.id) = (i.task_tenant, i.task_id) WHERE t.tenant_id = %s",
                (tenant,),
            ).fetchone()[0]
            assert actual == expected
        assert abs(counts[1] - 3_000) < 150
        count, span = conn.execute("SELECT count(*), max(id) - min(id) + 1 FROM tasks WHERE tenant_id = 1").fetchone()
        assert span > count  # ids have gaps
        empty, big, nulls = conn.execute(
            "SELECT count(*) FILTER (WHERE size_bytes = 0), count(*) FILTER (WHERE size_bytes > 8000),"
            " count(*) FILTER (WHERE uploaded_from IS NULL) FROM attachments WHERE tenant_id = 1"
        ).fetchone()
        assert empty and nulls and big  # empty, NULL and toasted (> 8 kB) values all occur
        assert conn.execute("SELECT count(*) FROM billing_plans").fetchone()[0] == 3

        with pytest.raises(BadInput, match="tenant 2 already exists"):
            seed_tenant(conn, TenantSpec(2, 100))


def test_demo_tenants_are_deterministic() -> None:
    specs = demo_tenants(heavy_rows=10_000, small=30, first_id=5)
    assert specs == demo_tenants(heavy_rows=10_000, small=30, first_id=5)
    assert [s.tenant_id for s in specs] == list(range(5, 36))
    assert specs[0].rows == 10_000
    assert all(200 <= s.rows <= 3_000 for s in specs[1:])


def test_server_masks_its_password_stops_and_restarts(server: pgserver.LocalServer) -> None:
    assert server.password not in repr(server)
    assert "***" in repr(server)
    assert server.backend == "local" and server.host == "127.0.0.1"
    attached = pgserver.attach_server(server.datadir)
    assert attached == server and attached.is_running()

    attached.stop()
    assert not server.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.dsn(), connect_timeout=3).close()
    server.stop()  # idempotent

    server.start()  # same port, same data: a simulated restart
    assert server.is_running()
    with dsnlib.connect(server.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'db%'").fetchone()[0] >= 1
