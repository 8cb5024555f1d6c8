"""Moves, verify, cleanup and abort run as a plain role holding exactly the grants docs/privileges.md documents.

The fleet's tables are handed to a non-superuser application owner role (as on a managed
PostgreSQL, where the application's migrations run as such a role), the migrator runs as a login
role that is a member of it, and the application writes as a third role that has only DML rights on
its tables: the fence must still work for it, and capture must log its writes.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import Result
from conftest import (
    REPO,
    STAMP_NAMES,
    Fleet,
    RunsCli,
    as_superuser,
    catalog_snapshot,
    copy_held,
    create_roles,
    drop_roles,
    grant_operator,
    login_url,
    operator_grants,
    tenant_digest,
    tenant_row_count,
)
from psycopg import sql

from migrator import config as configlib
from migrator.db import dsn as dsnlib
from migrator.db.alembic import read_revision
from migrator.local import provision
from migrator.local.provision import sample_app_env
from migrator.move import fence
from migrator.move.fence import FENCED_SQLSTATE


@dataclass
class Roles(RunsCli):
    """The roles of one test: who owns the tables, who migrates, who writes as the application."""

    fleet: Fleet
    owner: str
    operator: str
    app: str
    password: str = field(repr=False)
    config_path: Path
    extra: list[str] = field(default_factory=list)

    def url(self, user: str, db: str) -> str:
        return login_url(self.fleet.server, user, self.password, db)

    def stamp_db(self, stamp: str) -> str:
        return self.fleet.databases[1 + STAMP_NAMES.index(stamp)]

    def operator_dsn(self, stamp: str, user: str | None = None) -> str:
        return self.url(user or self.operator, self.stamp_db(stamp))

    def app_dsn(self, stamp: str) -> str:
        return self.url(self.app, self.stamp_db(stamp))


@pytest.fixture
def roles(fleet: Fleet, tmp_path: Path) -> Iterator[Roles]:
    prefix = fleet.databases[0].removesuffix("_catalog")
    owner, operator, app = f"{prefix}_app_owner", f"{prefix}_migrator", f"{prefix}_app"
    catalog_db, stamp_dbs = fleet.databases[0], fleet.databases[1:]
    password = create_roles(fleet.server, owner, operator, app)
    created = Roles(fleet, owner, operator, app, password, tmp_path / "operator.toml")
    try:
        for db in stamp_dbs:  # the application's owner role owns its tables; the application only writes
            with dsnlib.connect(fleet.server.dsn(db), autocommit=True) as conn:
                tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
                for (table,) in tables:
                    conn.execute(
                        sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                            sql.Identifier("public", table), sql.Identifier(owner)
                        )
                    )
                conn.execute(
                    sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}").format(
                        sql.Identifier(app)
                    )
                )
        grant_operator(fleet.server, operator, owner, stamp_dbs, catalog_db)
        for name in STAMP_NAMES:
            fleet.catalog.update_stamp(name, dsn=created.operator_dsn(name))
        created.config_path.write_text(
            configlib.render(created.url(operator, catalog_db), configlib.Tenancy(), sample_app_env())
        )
        with dsnlib.connect(created.url(operator, catalog_db), autocommit=True) as conn:
            row = conn.execute("SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user").fetchone()
            assert row == (False, False)
        yield created
    finally:
        drop_roles(fleet.server, fleet.databases, owner, operator, app, *created.extra)


def _write(dsn: str, statement: str, params: tuple[Any, ...]) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(statement, params).rowcount


def _assert_fenced_for_app(roles: Roles, stamp: str, tenant: int, neighbour: int) -> None:
    """The application role, with no right on `_migrator`, is fenced (not refused) and its neighbour writes."""
    with pytest.raises(psycopg.Error) as caught:
        _write(roles.app_dsn(stamp), "UPDATE tenants SET name = 'late write' WHERE id = %s", (tenant,))
    assert caught.value.sqlstate == FENCED_SQLSTATE, caught.value
    assert _write(roles.app_dsn(stamp), "UPDATE tenants SET name = name WHERE id = %s", (neighbour,)) == 1


def _assert_checksums_equal(result: Result) -> None:
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.output)
    assert report["equal"] and report["tables"]
    for table in report["tables"]:
        assert table["source_checksum"] == table["target_checksum"], table
        assert table["source_rows"] == table["target_rows"], table


def test_online_move_verify_cleanup_as_a_plain_role(fleet: Fleet, roles: Roles) -> None:
    fleet.seed("eu-1", 7, 2_000)
    fleet.seed("eu-1", 8, 200)
    layout = fleet.layout()
    before = tenant_digest(fleet.dsn("eu-1"), layout, "7")

    for stamp in ("eu-1", "eu-2"):
        result = roles.run("stamp", "check", stamp)
        assert result.exit_code == 0, result.output + result.stderr
        assert f"role {roles.operator} has every privilege" in result.output

    result = roles.run("move", "7", "--to", "eu-2", "--batch-rows", "500", "--yes", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    out = json.loads(result.output)
    assert out["route"]["stamp"] == "eu-2"
    # Without SET on session_replication_role the target checks foreign keys itself, and the move says so.
    assert out["move"]["write_mode"] == "checked"
    assert "GRANT SET ON PARAMETER session_replication_role TO" in out["move"]["write_mode_reason"]
    status = roles.run("move", "status", str(out["move"]["id"]))
    assert "writes on the target: checked (role " in status.output
    assert tenant_digest(fleet.dsn("eu-2"), layout, "7") == before

    _assert_checksums_equal(roles.run("verify", "7", "--source", "eu-1", "--target", "eu-2", "--json"))
    _assert_fenced_for_app(roles, "eu-1", 7, 8)

    result = roles.run("cleanup", "7", "--stamp", "eu-1", "--yes")
    assert result.exit_code == 0, result.output + result.stderr
    assert tenant_row_count(fleet.dsn("eu-1"), layout, "7") == 0
    assert tenant_digest(fleet.dsn("eu-2"), layout, "7") == before
    result = roles.run("doctor")
    assert result.exit_code == 0, result.output
    assert _write(roles.app_dsn("eu-1"), "UPDATE tenants SET name = name WHERE id = %s", (8,)) == 1


def test_checked_and_replica_moves_leave_identical_targets(fleet: Fleet, roles: Roles) -> None:
    """The plain role's move runs `checked`, the superuser's `replica`: the rows they write are the same."""
    fleet.seed("eu-1", 7, 2_000)
    fleet.seed("eu-1", 8, 2_000)
    layout = fleet.layout()
    before = {t: tenant_digest(fleet.dsn("eu-1"), layout, t) for t in ("7", "8")}
    modes = {}
    for tenant, superuser in (("7", False), ("8", True)):
        if superuser:  # the catalog's stamps back on the superuser's DSNs (the fixture gave the plain role's)
            for name in ("eu-1", "eu-2"):
                fleet.catalog.update_stamp(name, dsn=fleet.dsn(name))
        result = roles.run("move", tenant, "--to", "eu-2", "--yes", "--json")
        assert result.exit_code == 0, result.output + result.stderr
        modes[tenant] = json.loads(result.output)["move"]["write_mode"]
    assert modes == {"7": "checked", "8": "replica"}
    assert {t: tenant_digest(fleet.dsn("eu-2"), layout, t) for t in ("7", "8")} == before


def test_a_checked_copy_in_parallel_streams_writes_parents_before_children(fleet: Fleet, roles: Roles) -> None:
    """Offline, as the plain role (the target checks foreign keys): four streams, yet no row of a table
    reaches the target before its parents' table is complete (else the offline copy would refuse it)."""
    fleet.seed("eu-1", 7, 3_000)
    layout = fleet.layout()
    before = tenant_digest(fleet.dsn("eu-1"), layout, "7")
    result = roles.run("move", "7", "--to", "eu-2", "--offline", "--jobs", "4", "--batch-rows", "200", "--yes",
                       "--json")  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.output)["move"]["write_mode"] == "checked"
    assert tenant_digest(fleet.dsn("eu-2"), layout, "7") == before


def test_offline_move_and_abort_as_a_plain_role(fleet: Fleet, roles: Roles) -> None:
    fleet.seed("eu-1", 7, 1_000)
    fleet.seed("eu-1", 8, 1_000)
    fleet.seed("eu-1", 9, 50)
    layout = fleet.layout()
    before = {t: tenant_digest(fleet.dsn("eu-1"), layout, t) for t in ("7", "8")}

    result = roles.run("move", "7", "--to", "us-1", "--offline", "--batch-rows", "300", "--yes")
    assert result.exit_code == 0, result.output + result.stderr
    assert fleet.catalog.route("7").stamp == "us-1"
    _assert_checksums_equal(roles.run("verify", "7", "--source", "eu-1", "--target", "us-1", "--json"))
    assert tenant_digest(fleet.dsn("us-1"), layout, "7") == before["7"]
    result = roles.run("cleanup", "7", "--stamp", "eu-1", "--yes")
    assert result.exit_code == 0, result.output + result.stderr

    # A faulty target (installed by its administrator) makes the next move fail verification; abort it.
    # (Preflight refuses a target whose triggers would fire for copied rows: --allow-triggers forces it.)
    as_superuser(
        fleet.server,
        roles.stamp_db("eu-2"),
        sql.SQL(
            "CREATE FUNCTION corrupt() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.id % 97 = 5 THEN NEW.title := NEW.title || ' (corrupted)'; END IF; RETURN NEW; END $$"
        ),
        sql.SQL("CREATE TRIGGER corrupt BEFORE INSERT ON tasks FOR EACH ROW EXECUTE FUNCTION corrupt()"),
    )
    result = roles.run("move", "8", "--to", "eu-2", "--offline", "--allow-triggers", "--yes")
    assert result.exit_code == 1 and "verification failed" in result.stderr, result.output + result.stderr
    move = fleet.catalog.open_move("8")
    assert move is not None
    _assert_fenced_for_app(roles, "eu-1", 8, 9)
    result = roles.run("move", "abort", str(move.id), "--yes")
    assert result.exit_code == 0, result.output + result.stderr
    assert tenant_row_count(fleet.dsn("eu-2"), layout, "8") == 0
    assert tenant_digest(fleet.dsn("eu-1"), layout, "8") == before["8"]
    assert _write(roles.app_dsn("eu-1"), "UPDATE tenants SET name = name WHERE id = %s", (8,)) == 1
    assert roles.run("doctor").exit_code == 0


def test_application_role_writes_are_captured_during_an_online_move(fleet: Fleet, roles: Roles) -> None:
    """The guard trigger runs for the application's role, which has no right on `_migrator` itself."""
    fleet.seed("eu-1", 7, 3_000)
    layout = fleet.layout()
    mover = roles.popen("move", "7", "--to", "eu-2", "--batch-rows", "200", "--yes")
    try:
        with copy_held(fleet, "eu-2"):  # the application writes while the copy is in progress
            deadline = time.monotonic() + 60
            while (move := fleet.catalog.open_move("7")) is None or move.phase != "copying":
                assert mover.poll() is None, mover.communicate()
                assert time.monotonic() < deadline, "the move never reached the copy"
                time.sleep(0.02)
            updated = _write(
                roles.app_dsn("eu-1"),
                "UPDATE tasks SET title = title || ' (edited during the copy)' WHERE tenant_id = %s AND id %% 10 = 0",
                (7,),
            )
            assert updated > 0
            _write(roles.app_dsn("eu-1"), "DELETE FROM task_watchers WHERE tenant_id = %s", (7,))
        out, err = mover.communicate(timeout=180)
    finally:
        if mover.poll() is None:
            mover.kill()
            mover.communicate()
    assert mover.returncode == 0, out + err
    assert roles.password not in out + err
    assert fleet.catalog.route("7").stamp == "eu-2"
    assert tenant_digest(fleet.dsn("eu-2"), layout, "7") == tenant_digest(fleet.dsn("eu-1"), layout, "7")


def test_application_role_cannot_bypass_the_fence_that_cleanup_uses(fleet: Fleet, roles: Roles) -> None:
    fleet.seed("eu-1", 7, 50)
    with psycopg.connect(roles.operator_dsn("eu-1")) as conn:
        fence.fence(conn, fleet.layout(), ("7",), move_id=1)
    bypass = "SELECT set_config('migrator.cleanup_bypass_fence', 'on', false)"
    with psycopg.connect(roles.app_dsn("eu-1"), autocommit=True) as app:
        app.execute(bypass)
        with pytest.raises(psycopg.Error) as caught:
            app.execute("UPDATE tenants SET name = 'sneaked past' WHERE id = 7")
        assert caught.value.sqlstate == fence.FENCED_SQLSTATE
    with psycopg.connect(roles.operator_dsn("eu-1"), autocommit=True) as operator:
        operator.execute(bypass)
        assert operator.execute("UPDATE tenants SET name = 'cleanup may' WHERE id = 7").rowcount == 1


def test_stamp_check_names_each_missing_grant(fleet: Fleet, roles: Roles) -> None:
    fleet.seed("eu-1", 7, 50)
    partial = roles.owner.removesuffix("_app_owner") + "_partial"
    roles.extra.append(partial)
    db = roles.stamp_db("eu-1")
    as_superuser(
        fleet.server,
        "postgres",
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(partial), sql.Literal(roles.password)),
    )
    as_superuser(
        fleet.server,
        db,
        sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(sql.Identifier(db), sql.Identifier(partial)),
    )  # neither CREATE nor membership of the owner
    fleet.catalog.update_stamp("eu-1", dsn=roles.operator_dsn("eu-1", partial))

    result = roles.run("stamp", "check", "eu-1")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert f'GRANT CREATE ON DATABASE "{db}" TO "{partial}";' in result.output
    for table in [t.label for t in fleet.layout().tables]:
        assert any(
            line.startswith(f"table {table}: missing the privileges of its owner {roles.owner}")
            and line.endswith(f'GRANT "{roles.owner}" TO "{partial}";')
            for line in lines
        ), (table, lines)
    tables = fleet.layout().tables
    assert len(lines) == 2 + len(tables), lines  # a header, CREATE, one membership line per table: no noise
    data = json.loads(roles.run("stamp", "check", "eu-1", "--json").output)
    assert data["ok"] is False and data["role"] == partial
    assert {"object": f"database {db}", "privilege": "CREATE"}.items() <= data["missing"][0].items()

    as_superuser(
        fleet.server,
        db,
        sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(db), sql.Identifier(partial)),
    )
    as_superuser(
        fleet.server, "postgres", sql.SQL("GRANT {} TO {}").format(sql.Identifier(roles.owner), sql.Identifier(partial))
    )
    result = roles.run("stamp", "check", "eu-1")
    assert result.exit_code == 0, result.output
    result = roles.run("stamp", "check", "eu-1", "--json")
    assert json.loads(result.output) == {"stamp": "eu-1", "role": partial, "database": db, "ok": True, "missing": []}


def test_stamp_check_names_a_migrator_schema_left_by_another_role(fleet: Fleet, roles: Roles) -> None:
    """A `_migrator` schema created by a superuser run blocks a plain role: check says how to hand it over."""
    fleet.seed("eu-1", 7, 50)
    with dsnlib.connect(fleet.dsn("eu-1")) as conn:
        fence.ensure_schema(conn)
    result = roles.run("stamp", "check", "eu-1")
    assert result.exit_code == 1
    assert f'ALTER SCHEMA "_migrator" OWNER TO "{roles.operator}";' in result.output
    assert f'ALTER TABLE "_migrator"."copy_progress" OWNER TO "{roles.operator}";' in result.output


def test_grant_reader_reads_routes_only(fleet: Fleet, roles: Roles) -> None:
    fleet.seed("eu-1", 7, 10)
    reader = roles.owner.removesuffix("_app_owner") + ' app "reader"'  # quoting proves sql.Identifier
    roles.extra.append(reader)
    as_superuser(
        fleet.server,
        "postgres",
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(reader), sql.Literal(roles.password)),
    )

    result = fleet.run("catalog", "grant-reader", reader)  # run by the catalog's owner
    assert result.exit_code == 0, result.output + result.stderr
    assert "routes" in result.output
    missing = fleet.run("catalog", "grant-reader", "no_such_role_here")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr

    server = fleet.server
    with psycopg.connect(
        host=server.host,
        port=server.port,
        dbname=fleet.databases[0],
        user=reader,
        password=roles.password,
        autocommit=True,
    ) as conn:
        assert conn.execute("SELECT stamp FROM routes WHERE tenant = '7'").fetchone() == ("eu-1",)
        for statement in (
            "UPDATE routes SET stamp = 'eu-2' WHERE tenant = '7'",
            "INSERT INTO routes (tenant, stamp) VALUES ('99', 'eu-2')",
            "DELETE FROM routes WHERE tenant = '7'",
            "SELECT dsn FROM stamps",
            "SELECT * FROM moves",
            "SELECT * FROM move_tenants",
            "SELECT * FROM move_tables",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    assert fleet.catalog.route("7").stamp == "eu-1"


def test_the_docs_document_exactly_the_grants_these_tests_give() -> None:
    """The statements of docs/privileges.md are the ones the fixture runs (no drift)."""
    section = (REPO / "docs" / "privileges.md").read_text()
    assert section.startswith("# Privileges a move needs\n")
    block = section.split("```sql", 1)[1].split("```", 1)[0]
    documented = [
        line.split("--", 1)[0].strip().removesuffix(";")
        for line in block.splitlines()
        if line.strip().startswith("GRANT")
    ]
    given = [
        statement.as_string(None).replace('"', "")
        for _, statement in operator_grants("migrator", "app_owner", ["stamp_db"], "catalog")
    ]
    assert sorted(documented) == sorted(given)


def test_plan_and_apply_as_a_plain_role(fleet: Fleet, roles: Roles, tmp_path: Path) -> None:
    """`plan` measures sizes and `apply` records its progress in `plans` / `plan_moves` with the same grants."""
    fleet.seed("eu-1", 7, 600)
    fleet.seed("eu-1", 8, 400)
    layout = fleet.layout()
    before = {t: tenant_digest(fleet.dsn("eu-1"), layout, t) for t in ("7", "8")}
    plan_file = tmp_path / "drain.yaml"
    result = roles.run("plan", "drain", "eu-1", "--to", "eu-2,us-1", "-o", str(plan_file))
    assert result.exit_code == 0, result.output + result.stderr
    assert roles.password not in plan_file.read_text()
    result = roles.run("apply", str(plan_file), "--parallel", "2", "--batch-rows", "200", "--yes")
    assert result.exit_code == 0, result.output + result.stderr
    assert fleet.catalog.routes("eu-1") == []
    for tenant in ("7", "8"):
        stamp = fleet.catalog.route(tenant).stamp
        assert tenant_digest(fleet.dsn(stamp), layout, tenant) == before[tenant]


def test_a_plan_queued_and_run_by_a_worker_as_a_plain_role(fleet: Fleet, roles: Roles, tmp_path: Path) -> None:
    """`apply --queue` and `migrator worker` need only the grants of docs/privileges.md on the queue's tables."""
    fleet.seed_many("eu-1", [11, 12, 13], 300)
    layout = fleet.layout()
    before = {t: tenant_digest(fleet.dsn("eu-1"), layout, t) for t in ("11", "12", "13")}
    plan_file = tmp_path / "drain.yaml"
    assert roles.run("plan", "drain", "eu-1", "--to", "eu-2,us-1", "-o", str(plan_file)).exit_code == 0
    result = roles.run("apply", str(plan_file), "--queue", "--batch-rows", "100", "--yes")
    assert result.exit_code == 0, result.output + result.stderr
    worker = roles.popen("worker", "--stalled-after", "4")
    try:
        deadline = time.monotonic() + 90
        while fleet.catalog.routes("eu-1") and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=60)
    assert worker.returncode == 0 and roles.password not in stderr, stderr
    assert "error" not in stderr.lower(), stderr
    assert fleet.catalog.routes("eu-1") == []
    status = roles.run("plan", "status", str(plan_file))
    assert status.exit_code == 0 and ": done" in status.stdout, status.stdout + status.stderr
    for tenant, digest in before.items():
        assert tenant_digest(fleet.dsn(fleet.catalog.route(tenant).stamp), layout, tenant) == digest


def test_apply_queue_without_the_queue_grants_is_refused_in_one_line_before_recording_the_plan(
    fleet: Fleet, roles: Roles, tmp_path: Path
) -> None:
    fleet.seed("eu-1", 21, 100)
    plan_file = tmp_path / "drain.yaml"
    assert roles.run("plan", "drain", "eu-1", "--to", "eu-2", "-o", str(plan_file)).exit_code == 0
    as_superuser(
        fleet.server,
        fleet.databases[0],
        sql.SQL("REVOKE INSERT ON procrastinate_jobs FROM {}").format(sql.Identifier(roles.operator)),
    )
    before = catalog_snapshot(fleet)
    result = roles.run("apply", str(plan_file), "--queue", "--yes")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no job queue this role may use" in result.stderr
    assert catalog_snapshot(fleet) == before


def test_stamp_create_as_a_plain_role_provisions_and_registers_a_new_stamp(fleet: Fleet, roles: Roles) -> None:
    """`stamp create` needs on the new database what a move and the application's migrations need there
    (the grants of docs/privileges.md, and CREATE on its schema for the application's owner), and on the
    catalog only the INSERT into stamps that `stamp add` needs."""
    db = fleet.databases[0].removesuffix("_catalog") + "_created"
    fleet.databases.append(db)
    provision.create_database(fleet.server, db)
    grants = operator_grants(roles.operator, roles.owner, [db], "-")
    statements = [statement for target, statement in grants if target == db]
    as_superuser(
        fleet.server,
        db,
        *statements,
        sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(roles.owner)),
    )

    result = roles.run("stamp", "create", "eu-3", "--dsn", roles.url(roles.operator, db), "--region", "eu")

    assert result.exit_code == 0, result.output + result.stderr
    assert fleet.catalog.stamp("eu-3").region == "eu"
    with dsnlib.connect(fleet.server.dsn(db), autocommit=True) as conn:
        assert read_revision(conn) == "0006_task_checklists"
