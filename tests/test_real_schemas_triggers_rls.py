"""Users' schemas with application triggers and row-level security: a move is exact, or refused before any write.

Each test builds a bespoke plain-SQL schema (no Alembic) on two fresh stamp databases, owned by a
plain application owner role, and runs migrator as README's least-privileged role (a member of that
owner with exactly README's grants), plus the optional grant a test is about:
- `notes` has a BEFORE INSERT OR UPDATE trigger stamping `updated_at` with the clock, an AFTER INSERT
  trigger writing a row into the tenant table `audit`, and an AFTER DELETE trigger; every trigger also
  logs its firing into the global table `fired` (no tenant column: never moved, never deleted), which
  is how a test sees any side effect on either stamp.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from conftest import (
    Bespoke,
    BespokeFactory,
    as_superuser,
    catalog_snapshot,
    stamp_snapshot,
    tenant_digest,
)
from psycopg import sql

from migrator import config as configlib
from migrator.context import Context
from migrator.db import dsn as dsnlib
from migrator.local import pgserver
from migrator.move import MoveOptions, move_tenants
from migrator.move.fence import leftovers
from migrator.progress import Silent
from migrator.stamps.discovery import Layout, discover

STAMPS = ("eu-1", "eu-2")
NOTES = 40  # notes per tenant; the audit table gets one row per insert
_ids = itertools.count(1)

SCHEMA = [
    "CREATE TABLE tenants (id bigint PRIMARY KEY, name text NOT NULL)",
    "CREATE TABLE notes (tenant_id bigint NOT NULL REFERENCES tenants, id bigint PRIMARY KEY, body text NOT NULL,"
    " updated_at timestamptz NOT NULL DEFAULT '2000-01-01')",
    "CREATE TABLE audit (id bigserial PRIMARY KEY, tenant_id bigint NOT NULL REFERENCES tenants,"
    " note_id bigint NOT NULL, what text NOT NULL)",
    "CREATE TABLE fired (n bigserial PRIMARY KEY, trigger_name text NOT NULL, tenant bigint, note bigint)",
    "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
    " NEW.updated_at := clock_timestamp(); INSERT INTO fired (trigger_name, tenant, note)"
    " VALUES (TG_NAME, NEW.tenant_id, NEW.id); RETURN NEW; END $$",
    "CREATE FUNCTION audit_insert() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
    " INSERT INTO audit (tenant_id, note_id, what) VALUES (NEW.tenant_id, NEW.id, 'created ' || NEW.body);"
    " INSERT INTO fired (trigger_name, tenant, note) VALUES (TG_NAME, NEW.tenant_id, NEW.id); RETURN NULL; END $$",
    "CREATE FUNCTION log_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
    " INSERT INTO fired (trigger_name, tenant, note) VALUES (TG_NAME, OLD.tenant_id, OLD.id); RETURN NULL; END $$",
    "CREATE TRIGGER notes_touch BEFORE INSERT OR UPDATE ON notes FOR EACH ROW EXECUTE FUNCTION touch()",
    "CREATE TRIGGER notes_audit AFTER INSERT ON notes FOR EACH ROW EXECUTE FUNCTION audit_insert()",
    "CREATE TRIGGER notes_deleted AFTER DELETE ON notes FOR EACH ROW EXECUTE FUNCTION log_delete()",
]
# Row-level security: the policy hides every note whose body is 'secret' (from anyone it applies to).
RLS_FORCED = [
    "ALTER TABLE notes ENABLE ROW LEVEL SECURITY",
    "ALTER TABLE notes FORCE ROW LEVEL SECURITY",
    "CREATE POLICY visible ON notes USING (body <> 'secret')",
]
RLS_NOT_FORCED = [  # the owner (and its inheriting members) are exempt: migrator sees every row
    "ALTER TABLE audit ENABLE ROW LEVEL SECURITY",
    "CREATE POLICY none_visible ON audit USING (false)",
]


@dataclass
class Shop(Bespoke):
    """A catalog and two stamps of the bespoke schema; migrator connects as `operator`, a plain role, and the
    application as `app`."""

    app: str
    layout: Layout = field(repr=False)

    def app_dsn(self, stamp: str) -> str:
        return self.url(self.app, self.databases[stamp])

    def sql(self, stamp: str, *statements: str | sql.Composable, user: str | None = None) -> None:
        dsn = self.admin(stamp) if user is None else self.url(user, self.databases[stamp])
        with psycopg.connect(dsn, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    def grant(self, statement: str | sql.Composable) -> None:
        """A grant to the operator role by a superuser (role-level: on the server, not a database)."""
        with psycopg.connect(self.server.dsn("postgres"), autocommit=True) as conn:
            conn.execute(statement)

    def seed(self, tenant: int, stamp: str = "eu-1", secret: int = 0, as_app: bool = True) -> None:
        """The tenant's notes written as the application (its triggers fire: audit rows, clock stamps), or
        by a superuser where row-level security would stop the application writing hidden rows."""
        with psycopg.connect(self.app_dsn(stamp) if as_app else self.admin(stamp), autocommit=True) as conn:
            conn.execute("INSERT INTO tenants VALUES (%s, %s)", (tenant, f"tenant {tenant}"))
            conn.execute(
                "INSERT INTO notes (tenant_id, id, body) SELECT %s, %s * 1000 + i,"
                " CASE WHEN i <= %s THEN 'secret' ELSE 'note ' || i END FROM generate_series(1, %s) i",
                (tenant, tenant, secret, NOTES),
            )
        self.catalog.set_route(str(tenant), stamp)

    def count(self, stamp: str, query: str, params: tuple[Any, ...] = ()) -> int:
        with psycopg.connect(self.admin(stamp), autocommit=True) as conn:
            row = conn.execute(query, params).fetchone()
        assert row is not None
        return int(row[0])

    def fired(self, stamp: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.admin(stamp), autocommit=True) as conn:
            return conn.execute("SELECT * FROM fired ORDER BY n").fetchall()

    def snapshot(self) -> tuple[Any, ...]:
        with dsnlib.connect(self.catalog.url, autocommit=True) as conn:
            plans = conn.execute("SELECT * FROM plans ORDER BY 1").fetchall()
        return (catalog_snapshot(self), plans, *(stamp_snapshot(self.admin(s)) for s in STAMPS))  # type: ignore[arg-type]  # duck-typed: catalog


ShopFactory = Callable[..., Shop]


@pytest.fixture
def shop_factory(pg: pgserver.LocalServer, bespoke: BespokeFactory) -> ShopFactory:
    """Builds a Shop with extra DDL per stamp; `bespoke` drops its databases and roles afterwards."""

    def build(extra: tuple[str, ...] = ()) -> Shop:
        prefix = f"trg{next(_ids)}"
        app = f"{prefix}_app"

        def schema(made: Bespoke, stamp: str) -> None:
            owned = [
                sql.SQL("ALTER TABLE {} OWNER TO {}").format(sql.Identifier(t), sql.Identifier(made.owner))
                for t in ("tenants", "notes", "audit", "fired")
            ]
            as_superuser(
                pg,
                made.databases[stamp],
                *SCHEMA,
                *extra,
                *owned,
                # stamps hand out distinct keys
                f"ALTER SEQUENCE audit_id_seq RESTART WITH {STAMPS.index(stamp) * 1_000_000 + 1}",
                sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}").format(
                    sql.Identifier(app)
                ),
                sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}").format(sql.Identifier(app)),
            )

        made = bespoke(prefix, STAMPS, schema, app)
        shop = Shop(**vars(made), app=app, layout=Layout((), (), ()))
        with dsnlib.connect(shop.admin("eu-1"), autocommit=True) as conn:
            shop.layout = discover(conn, configlib.Tenancy())
        assert {t.name for t in shop.layout.tables} == {"tenants", "audit", "notes"}
        assert shop.layout.global_tables == ("fired",)
        return shop

    return build


def _grant_replica(shop: Shop) -> None:
    shop.grant(sql.SQL("GRANT SET ON PARAMETER session_replication_role TO {}").format(sql.Identifier(shop.operator)))


def _audit_rows(shop: Shop, stamp: str, tenant: int) -> int:
    return shop.count(stamp, "SELECT count(*) FROM audit WHERE tenant_id = %s", (tenant,))


def _triggers_enabled(shop: Shop, stamp: str) -> dict[str, str]:
    with psycopg.connect(shop.admin(stamp), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT tgname::text, tgenabled::text FROM pg_trigger"
            " WHERE tgrelid = 'notes'::regclass AND NOT tgisinternal"
        ).fetchall()
    return dict(rows)


class AppWritesDuringCopy(Silent):
    """Once the copy has committed its first batch, the application (its own role, its triggers firing on
    the source) inserts, updates and deletes the moving tenant's notes, so catch-up replays them."""

    def __init__(self, shop: Shop, tenant: int) -> None:
        self.shop, self.tenant, self.done = shop, tenant, False

    def advance(self, table: str, rows: int) -> None:
        if self.done:
            return
        self.done = True
        t = self.tenant
        self.shop.sql(
            "eu-1",
            sql.SQL(
                "INSERT INTO notes (tenant_id, id, body) VALUES ({t}, {t} * 1000 + 999, 'written during the copy')"
            ).format(t=sql.Literal(t)),
            sql.SQL("UPDATE notes SET body = 'edited' WHERE tenant_id = {t} AND id = {t} * 1000 + 5").format(
                t=sql.Literal(t)
            ),
            sql.SQL("DELETE FROM notes WHERE tenant_id = {t} AND id = {t} * 1000 + 6").format(t=sql.Literal(t)),
            user=self.shop.app,
        )


def test_triggers_with_the_replica_grant_move_exactly_and_fire_for_no_copied_row(
    shop_factory: ShopFactory,
) -> None:
    shop = shop_factory()
    _grant_replica(shop)
    shop.seed(1)
    shop.seed(2, stamp="eu-2")  # a neighbour already on the target
    assert shop.run("stamp", "check", "eu-2").exit_code == 0  # with the grant nothing is missing

    ctx = Context.load(shop.config_path)  # the operator's own configuration: catalog and stamps as the plain role
    try:
        writer = AppWritesDuringCopy(shop, 1)
        outcome = move_tenants(ctx, ("1",), "eu-2", MoveOptions(batch_rows=7), writer)
    finally:
        ctx.catalog.close()
    assert writer.done and [r.stamp for r in outcome.routes] == ["eu-2"]

    source = tenant_digest(shop.admin("eu-1"), shop.layout, "1")
    assert tenant_digest(shop.admin("eu-2"), shop.layout, "1") == source  # byte-exact, updated_at included
    assert source["notes"][0] == NOTES + 1 - 1 and _audit_rows(shop, "eu-2", 1) == _audit_rows(shop, "eu-1", 1)
    assert _audit_rows(shop, "eu-1", 1) == NOTES + 1  # one per application insert, none per copy
    assert [r[2] for r in shop.fired("eu-2")].count(1) == 0  # no trigger fired for tenant 1 on the target
    assert shop.run("verify", "1", "--source", "eu-1", "--target", "eu-2").exit_code == 0

    # The application's triggers are untouched and keep firing for everyone else's writes on the target.
    enabled = {"notes_touch": "O", "notes_audit": "O", "notes_deleted": "O"}
    assert _triggers_enabled(shop, "eu-2") == {**enabled, "migrator_guard": "O"}  # the revert window's, until cleanup
    before = _audit_rows(shop, "eu-2", 2)
    shop.sql("eu-2", "INSERT INTO notes (tenant_id, id, body) VALUES (2, 2999, 'after the move')", user=shop.app)
    assert _audit_rows(shop, "eu-2", 2) == before + 1
    stamped = shop.count("eu-2", "SELECT count(*) FROM notes WHERE id = 2999 AND updated_at > '2000-01-01'")
    assert stamped == 1

    fired_on_source = shop.fired("eu-1")
    result = shop.run("cleanup", "1", "--stamp", "eu-1", "--batch-rows", "9", "--yes")
    assert result.exit_code == 0, result.output + result.stderr
    assert all(rows == 0 for rows, _ in tenant_digest(shop.admin("eu-1"), shop.layout, "1").values())
    assert shop.fired("eu-1") == fired_on_source  # cleanup's deletes fired no DELETE trigger on the source
    assert tenant_digest(shop.admin("eu-2"), shop.layout, "1") == source
    for stamp in STAMPS:
        with dsnlib.connect(shop.admin(stamp), autocommit=True) as conn:
            assert leftovers(conn) == [], stamp


def test_triggers_without_the_grant_are_refused_naming_each_trigger_table_and_grant(shop_factory: ShopFactory) -> None:
    shop = shop_factory()
    shop.seed(1)
    before = shop.snapshot()
    grant = f'GRANT SET ON PARAMETER session_replication_role TO "{shop.operator}";'
    for dry_run in ((), ("--dry-run",)):
        result = shop.run("move", "1", "--to", "eu-2", "--yes", *dry_run)
        assert result.exit_code == 2, result.output + result.stderr
        message = result.stderr.strip()
        assert len(message.splitlines()) == 1, message
        # Every trigger that fires for migrator's writes, on both stamps, in the one error.
        for trigger in ("notes_touch", "notes_audit", "notes_deleted"):
            assert f"table notes on eu-2: trigger {trigger}" in message, message
        assert "table notes on eu-1: trigger notes_deleted (DELETE)" in message  # cleanup's deletes
        assert "notes_touch" not in message.split("on eu-1")[1]  # the source takes no inserts from a move
        assert message.count(grant) == 4 and "--allow-triggers" in message
        assert shop.snapshot() == before

    result = shop.run("stamp", "check", "eu-2")
    assert result.exit_code == 1
    assert "parameter session_replication_role: missing SET (application triggers notes_audit on notes" in (
        result.output
    )
    assert grant in result.output
    shop.sql("eu-2", "ALTER TABLE notes DISABLE TRIGGER USER")
    assert shop.run("stamp", "check", "eu-2").exit_code == 0  # not needed where no trigger fires


def test_allow_triggers_without_the_grant_proceeds_and_verify_catches_what_the_triggers_did(
    shop_factory: ShopFactory,
) -> None:
    """--allow-triggers is for harmless triggers: these are not, so the copy fires them on the target
    (a clock stamp, an audit row per copied note), verify finds the difference and the route stays."""
    shop = shop_factory()
    shop.seed(1)
    source = tenant_digest(shop.admin("eu-1"), shop.layout, "1")
    result = shop.run("move", "1", "--to", "eu-2", "--offline", "--allow-triggers", "--yes")
    assert result.exit_code == 1 and "verification failed" in result.stderr, result.output + result.stderr
    assert "notes" in result.stderr and "audit" in result.stderr
    assert shop.catalog.route("1").stamp == "eu-1"
    assert tenant_digest(shop.admin("eu-1"), shop.layout, "1") == source  # the source is untouched
    fired = [r[1] for r in shop.fired("eu-2")]
    assert fired.count("notes_touch") == NOTES and fired.count("notes_audit") == NOTES
    assert _audit_rows(shop, "eu-2", 1) == 2 * NOTES  # copied audit rows plus one per copied note

    move = shop.catalog.open_move("1")
    assert move is not None
    snapshot = shop.snapshot()
    refused = shop.run("move", "abort", str(move.id), "--yes")  # abort's deletes would fire notes_deleted
    assert refused.exit_code == 2 and "trigger notes_deleted (DELETE)" in refused.stderr, refused.stderr
    assert shop.snapshot() == snapshot
    result = shop.run("move", "abort", str(move.id), "--allow-triggers", "--yes")
    assert result.exit_code == 0, result.output + result.stderr
    assert all(rows == 0 for rows, _ in tenant_digest(shop.admin("eu-2"), shop.layout, "1").values())
    assert [r[1] for r in shop.fired("eu-2")].count("notes_deleted") == NOTES  # it fired, as allowed
    assert tenant_digest(shop.admin("eu-1"), shop.layout, "1") == source


def test_forced_row_level_security_without_bypassrls_is_refused_with_every_problem_at_once(
    shop_factory: ShopFactory,
) -> None:
    shop = shop_factory(extra=(*RLS_FORCED, *RLS_NOT_FORCED))
    shop.seed(1, secret=3, as_app=False)
    before = shop.snapshot()
    result = shop.run("move", "1", "--to", "eu-2", "--dry-run")
    assert result.exit_code == 2, result.output + result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    bypass = f'ALTER ROLE "{shop.operator}" BYPASSRLS;'
    for stamp in STAMPS:
        assert f"table notes on {stamp} has forced row-level security" in message, message
    assert message.count(bypass) == 2 and "NO FORCE ROW LEVEL SECURITY" in message
    assert "table audit" not in message  # not forced: migrator, a member of its owner, is exempt
    assert "trigger notes_audit" in message  # the trigger problems come in the same error
    assert shop.run("move", "1", "--to", "eu-2", "--yes").exit_code == 2
    assert shop.snapshot() == before

    result = shop.run("stamp", "check", "eu-1")
    assert result.exit_code == 1 and f"role {shop.operator}: missing BYPASSRLS" in result.output
    assert bypass in result.output and "audit" not in result.output.split("BYPASSRLS")[1]


def test_row_level_security_with_bypassrls_moves_every_row_exactly(shop_factory: ShopFactory) -> None:
    shop = shop_factory(extra=(*RLS_FORCED, *RLS_NOT_FORCED))
    _grant_replica(shop)
    shop.grant(sql.SQL("ALTER ROLE {} BYPASSRLS").format(sql.Identifier(shop.operator)))
    shop.seed(1, secret=5, as_app=False)
    source = tenant_digest(shop.admin("eu-1"), shop.layout, "1")
    assert source["notes"][0] == NOTES and source["audit"][0] == NOTES
    assert shop.run("stamp", "check", "eu-1").exit_code == 0

    result = shop.run("move", "1", "--to", "eu-2", "--batch-rows", "6", "--yes", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["route"]["stamp"] == "eu-2"
    assert tenant_digest(shop.admin("eu-2"), shop.layout, "1") == source  # the 5 hidden notes too
    assert shop.count("eu-2", "SELECT count(*) FROM notes WHERE body = 'secret'") == 5
    fired_on_source = shop.fired("eu-1")
    assert shop.run("cleanup", "1", "--stamp", "eu-1", "--yes").exit_code == 0
    assert all(rows == 0 for rows, _ in tenant_digest(shop.admin("eu-1"), shop.layout, "1").values())
    assert shop.fired("eu-2") == [] and shop.fired("eu-1") == fired_on_source  # no trigger fired for migrator


def test_row_security_off_turns_rows_hidden_from_migrator_into_an_error_not_a_smaller_count(
    shop_factory: ShopFactory,
) -> None:
    shop = shop_factory(extra=tuple(RLS_FORCED))
    shop.seed(1, secret=4, as_app=False)
    query = "SELECT count(*) FROM notes WHERE tenant_id = 1"
    with psycopg.connect(shop.operator_dsn("eu-1"), autocommit=True) as plain:  # the server's default: on
        row = plain.execute(query).fetchone()
        assert row == (NOTES - 4,)  # the policy silently hides four notes from this role
    with (
        dsnlib.connect(shop.operator_dsn("eu-1"), autocommit=True) as pinned,  # as every migrator session
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"),
    ):
        pinned.execute(query)
    # What runs without preflight fails the same way instead of reporting fewer rows.
    sizes = ("tenant", "list", "--stamp", "eu-1", "--sizes")
    for args in (sizes, ("verify", "1", "--source", "eu-1", "--target", "eu-2")):
        result = shop.run(*args)
        assert result.exit_code == 1 and "row-level security" in result.stderr, (args, result.output, result.stderr)
